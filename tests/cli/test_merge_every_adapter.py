"""``adaptc merge`` writes everything an adapter trained, for every adapter the spec can
express and every way peft writes one: the merged checkpoint, loaded by transformers,
gives the adapter model's outputs.

Each case trains nothing but gives every trainable tensor random values (LoRA factors,
biases under ``bias: all``/``lora_only``, ``modules_to_save`` copies), saves the adapter
(with adaptc or with real peft), merges it with the CLI and compares outputs.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import adaptc
from adaptc.cli import main
from tests.compiler.models import hf_inputs, tiny_hf


def _bert(cls: type, **config: Any) -> nn.Module:
    base = tiny_hf("bert").config
    for key, value in config.items():
        setattr(base, key, value)
    torch.manual_seed(0)
    return cls(base)


# the checkpoints: (how to build the model, the class transformers reloads the merge with)
MODELS: dict[str, Any] = {
    "opt": lambda: tiny_hf("opt"),
    "opt-bare": lambda: tf.OPTModel(tiny_hf("opt").config),
    "gpt2": lambda: tiny_hf("gpt2"),
    "llama": lambda: tiny_hf("llama"),
    "mt5": lambda: tiny_hf("mt5"),
    "bert-cls": lambda: tiny_hf("bert"),
    "bert-token": lambda: _bert(tf.BertForTokenClassification),
    "bert-qa": lambda: _bert(tf.BertForQuestionAnswering, num_labels=2),
    "bert-bare": lambda: _bert(tf.BertModel),
}
FAMILY = {"opt-bare": "opt", "bert-cls": "bert", "bert-token": "bert", "bert-qa": "bert"}
FAMILY["bert-bare"] = "bert"


@dataclass(frozen=True)
class Case:
    name: str
    checkpoint: str  # a key of MODELS: what is saved and merged into
    adapter: dict[str, Any]  # the spec's adapter fields, or peft LoraConfig kwargs
    task_type: str | None = None
    writer: str = "adaptc"  # or "peft"
    trained_on: str | None = None  # a key of MODELS when the adapter was trained on another


def names(*entries: str) -> dict[str, Any]:
    return {"kind": "names", "names": list(entries)}


QV = names("q_proj", "v_proj")
# fmt: off
CASES = [
    Case("opt-causal", "opt", {"targets": names("q_proj", "v_proj", "fc1")}, "CAUSAL_LM"),
    Case("opt-no-task", "opt", {"targets": QV}),
    Case("opt-regex-gaussian", "opt", {
        "targets": {"kind": "regex", "pattern": r".*layers\.1\..*(k|out)_proj"},
        "init": "gaussian"}),
    Case("gpt2-conv1d-lora-bias", "gpt2", {
        "targets": {"kind": "all-linear"}, "r": 2, "lora_bias": True}, "CAUSAL_LM"),
    Case("llama-dora", "llama", {"targets": {"kind": "all-linear"}, "use_dora": True},
         "CAUSAL_LM"),
    Case("llama-pissa", "llama", {"targets": names("q_proj", "down_proj"), "init": "pissa",
                                  "r": 2}),
    Case("llama-olora", "llama", {"targets": names("o_proj"), "init": "olora", "r": 2}),
    Case("llama-rslora-patterns", "llama", {
        "targets": {"kind": "types", "types": ["nn.Linear"]}, "use_rslora": True,
        "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 3},
        "exclude": names("lm_head")}),
    Case("llama-layers-exclude", "llama", {
        "targets": names("q_proj", "gate_proj", "up_proj"), "layers": {"indices": [1]},
        "exclude": {"kind": "regex", "pattern": r".*\.up_proj"}}),
    Case("llama-embedding", "llama", {"targets": names("embed_tokens", "q_proj")}, "CAUSAL_LM"),
    Case("llama-saved-lm-head-bias-all", "llama", {
        "targets": QV, "bias": "all", "modules_to_save": ["lm_head"]}, "CAUSAL_LM"),
    Case("mt5-seq2seq", "mt5", {"targets": names("q", "v", "wo")}, "SEQ_2_SEQ_LM"),
    Case("bert-seq-cls", "bert-cls", {"targets": names("query", "value")}, "SEQ_CLS"),
    Case("bert-seq-cls-bias-lora-only", "bert-cls", {
        "targets": names("query", "dense"), "bias": "lora_only", "lora_bias": True}, "SEQ_CLS"),
    Case("bert-token-cls", "bert-token", {"targets": names("key")}, "TOKEN_CLS"),
    Case("bert-qa", "bert-qa", {"targets": names("value")}, "QUESTION_ANS"),
    Case("bert-feature-extraction", "bert-bare", {"targets": names("query"), "bias": "all"},
         "FEATURE_EXTRACTION"),
    # written by peft, as users bring them
    Case("peft-opt-no-task", "opt", {"target_modules": ["q_proj", "v_proj"]}, writer="peft"),
    Case("peft-opt-feature-extraction-on-a-head", "opt", {"target_modules": ["q_proj"]},
         "FEATURE_EXTRACTION", writer="peft", trained_on="opt-bare"),
    Case("peft-opt-head-adapter-on-a-bare-checkpoint", "opt-bare",
         {"target_modules": ["v_proj"]}, "CAUSAL_LM", writer="peft", trained_on="opt"),
    Case("peft-bert-seq-cls-bias-all", "bert-cls", {
        "target_modules": ["query", "value"], "bias": "all", "modules_to_save": ["classifier"]},
         "SEQ_CLS", writer="peft"),
    Case("peft-bert-seq-cls-on-a-base-checkpoint", "bert-bare", {"target_modules": ["query"]},
         "SEQ_CLS", writer="peft", trained_on="bert-cls"),
    Case("peft-gpt2-lora-only", "gpt2", {
        "target_modules": ["c_attn"], "bias": "lora_only", "fan_in_fan_out": True},
         "CAUSAL_LM", writer="peft"),
]
# fmt: on


@torch.no_grad()
def _randomise_trainable(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _save_checkpoint(case: Case, directory: Path) -> nn.Module:
    model = MODELS[case.checkpoint]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, max_shard_size="40KB")
    return model


def _trained_base(case: Case, base_dir: Path) -> nn.Module:
    """The model the adapter was trained on: the checkpoint reloaded, or another class."""
    if case.trained_on is None:
        cls = type(MODELS[case.checkpoint]())
        return cls.from_pretrained(base_dir).eval()
    cls = type(MODELS[case.trained_on]())
    kwargs = {"num_labels": 3} if case.trained_on == "bert-cls" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(base_dir, **kwargs).eval()


def _adapter_model(case: Case, base: nn.Module, out: Path) -> nn.Module:
    """The adapter model (random trained tensors), saved to ``out``."""
    if case.writer == "peft":
        config = peft.LoraConfig(task_type=case.task_type, r=4, init_lora_weights=False,
                                 **case.adapter)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(base, config)
        _randomise_trainable(model)
        model.save_pretrained(out)
        return model.eval()
    spec: dict[str, Any] = {"version": 1, "adapters": {"default": {"r": 4, **case.adapter}}}
    if case.task_type is not None:
        spec["task_type"] = case.task_type
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = adaptc.compile(base, spec)
    _randomise_trainable(model)
    adaptc.save_adapter(model, out)
    return model.eval()


def _outputs(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**hf_inputs(family))
    for name in ("logits", "start_logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise AssertionError(type(out))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_the_merged_checkpoint_gives_the_adapter_models_outputs(tmp_path, capsys, case):
    _save_checkpoint(case, tmp_path / "base")
    base = _trained_base(case, tmp_path / "base")
    adapter_model = _adapter_model(case, base, tmp_path / "adapter")
    before = copy.deepcopy(sorted(p.name for p in (tmp_path / "base").iterdir()))
    code = main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "out"), "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["merged"] > 0
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == before
    family = FAMILY.get(case.checkpoint, case.checkpoint)
    new_head = case.trained_on == "bert-cls"  # the merge is of the adapter's class
    cls = type(MODELS[case.trained_on if new_head else case.checkpoint]())
    merged = cls.from_pretrained(tmp_path / "out").eval()
    expected, merged_part = adapter_model, merged
    if case.trained_on == "opt":  # a head adapter merged into the bare checkpoint
        expected = adapter_model.base_model.model.model
    if case.trained_on == "opt-bare":  # a bare-model adapter merged into a head checkpoint
        merged_part = merged.model
    got, want = _outputs(merged_part, family), _outputs(expected, family)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_model = cls.from_pretrained(tmp_path / "base").eval()  # the checkpoint alone
    plain = _outputs(plain_model.model if merged_part is not merged else plain_model, family)
    assert not torch.allclose(got, plain, atol=1e-3), "the merge changed nothing"
