"""Target resolution: the modules adaptc adapts are the modules real PEFT adapts.

Each case builds a tiny model, resolves the spec with adaptc, and applies the same config
with ``peft.get_peft_model``; the ``LoraLayer`` paths and ``ModulesToSaveWrapper`` paths
must be equal, in ``named_modules`` order.
"""

from __future__ import annotations

import copy
import functools
import re
import time
import warnings
from typing import Any

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from adaptc.layers import kind_names
from adaptc.plan.defaults import LORA_TARGET_MODULES
from adaptc.plan.match import (
    TargetError,
    TargetMatch,
    layer_type_name,
    resolve_targets,
)
from adaptc.spec import Spec, load_spec
from adaptc.spec.model import LAYER_TYPES

# --- tiny models ------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.proj = nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})
        self.act = nn.ReLU()


class MLP(nn.Module):
    """Top-level ``blocks.N`` (no layer index for PEFT) and nested ``stack.layers.N``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.stack = nn.ModuleDict({"layers": nn.ModuleList([Block() for _ in range(3)])})
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 2)


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 4, 1)  # a 1×1 "fc": all-linear picks it up by name, as PEFT does


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.blocks = nn.ModuleList([ConvBlock(), ConvBlock()])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)


class Attention(nn.Module):
    """An ``nn.MultiheadAttention`` and one ``nn.Linear`` registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.shared = nn.Linear(8, 8)
        self.alias = self.shared
        self.out = nn.Linear(8, 2)


_BERT = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
_BERT |= {"intermediate_size": 32, "vocab_size": 50, "max_position_embeddings": 64}
FACTORIES: dict[str, Any] = {
    "opt": lambda: tf.AutoModelForCausalLM.from_config(
        tf.OPTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            vocab_size=50,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
        )
    ),
    "gpt2": lambda: tf.GPT2LMHeadModel(
        tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=64)
    ),
    "llama": lambda: tf.AutoModelForCausalLM.from_config(
        tf.LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=50,
        )
    ),
    "mt5": lambda: tf.MT5ForConditionalGeneration(
        tf.MT5Config(d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, vocab_size=50)
    ),
    "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**_BERT)),
    "bert-tok": lambda: tf.BertForTokenClassification(tf.BertConfig(**_BERT)),
    "bert-qa": lambda: tf.BertForQuestionAnswering(tf.BertConfig(**_BERT)),
    "mlp": MLP,
    "cnn": CNN,
    "attention": Attention,
}


@functools.cache
def model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FACTORIES[name]()


# --- the two sides ----------------------------------------------------------------------


def spec_of(fields: dict[str, Any], task_type: str | None = None) -> Spec:
    data: dict[str, Any] = {"version": 1, "adapters": {"default": fields}}
    if task_type:
        data["task_type"] = task_type
    return load_spec(data)


def resolve(name: str, fields: dict[str, Any], task_type: str | None = None) -> TargetMatch:
    return resolve_targets(model(name), spec_of(fields, task_type).adapter(), task_type=task_type)


_WRAPPING = re.compile(r"\.(base_layer|original_module|modules_to_save\.default)(?=\.|$)")


def peft_paths(name: str, cfg: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(targeted paths, ModulesToSaveWrapper paths) after ``get_peft_model``.

    The targeted paths are PEFT's ``targeted_module_names``, checked against the paths of its
    ``LoraLayer`` modules (PEFT prefix, ``base_layer`` and wrapper segments removed): every
    target is one, and every other one lies inside a target (MHA's inner ``out_proj``).
    """
    skip = ("peft_type", "peft_version", "auto_mapping", "runtime_config")
    config = LoraConfig(**{k: v for k, v in cfg.items() if k not in skip})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(model(name)), config)
    found: dict[type, list[str]] = {LoraLayer: [], ModulesToSaveWrapper: []}
    for path, module in peft_model.named_modules():
        for cls, paths in found.items():
            if isinstance(module, cls):
                paths.append(_WRAPPING.sub("", path.removeprefix("base_model.model.")))
    targeted = tuple(peft_model.base_model.targeted_module_names)
    lora = set(found[LoraLayer])
    assert lora >= set(targeted)
    assert all(any(p.startswith(t + ".") for t in targeted) for p in lora - set(targeted))
    return targeted, tuple(dict.fromkeys(found[ModulesToSaveWrapper]))


def names(*entries: str) -> dict[str, Any]:
    return {"kind": "names", "names": list(entries)}


def regex(pattern: str) -> dict[str, Any]:
    return {"kind": "regex", "pattern": pattern}


def lay(indices: list[int], *pattern: str) -> dict[str, Any]:
    return {"indices": indices, "pattern": list(pattern)} if pattern else {"indices": indices}


ALL = {"kind": "all-linear"}
T, X, L, S = "targets", "exclude", "layers", "modules_to_save"

# (name, model, adapter fields, task_type)
PARITY: list[tuple[str, str, dict[str, Any], str | None]] = [
    ("opt-names", "opt", {T: names("q_proj", "v_proj")}, None),
    ("opt-dotted-name", "opt", {T: names("self_attn.out_proj")}, None),
    ("opt-full-path", "opt", {T: names("model.decoder.layers.1.fc2")}, None),
    ("opt-regex", "opt", {T: regex(r".*layers\.1\..*_proj")}, None),
    ("opt-all-linear", "opt", {T: ALL}, None),
    ("opt-all-linear-causal-lm", "opt", {T: ALL}, "CAUSAL_LM"),
    ("opt-all-linear-exclude-names", "opt", {T: ALL, X: names("fc2", "self_attn.k_proj")}, None),
    ("opt-all-linear-exclude-regex", "opt", {T: ALL, X: regex(r".*self_attn\.(k|v)_proj")}, None),
    ("opt-layers", "opt", {T: names("q_proj", "fc1"), L: lay([1])}, None),
    ("opt-layers-pattern", "opt", {T: names("q_proj"), L: lay([0], "layers")}, None),
    ("opt-layers-full-path-skips", "opt", {T: names("q_proj", "model.decoder.layers.0.fc1"), L: lay([1])}, None),  # noqa: E501
    ("opt-defaults", "opt", {}, None),
    ("opt-defaults-layers", "opt", {L: lay([0])}, None),
    ("opt-save-fc1", "opt", {T: ALL, S: ["fc1"]}, None),
    ("opt-save-layer-unescaped", "opt", {T: names("q_proj"), S: ["layers.0"]}, None),
    ("opt-save-nested", "opt", {T: names("q_proj"), S: ["layers.0", "fc1"]}, None),
    ("opt-save-lm-head", "opt", {T: names("q_proj"), S: ["lm_head"]}, None),
    ("gpt2-defaults", "gpt2", {}, None),
    ("gpt2-all-linear", "gpt2", {T: ALL}, None),
    ("gpt2-layers-pattern-h", "gpt2", {T: names("c_fc"), L: lay([1], "h")}, None),
    ("llama-defaults", "llama", {}, None),
    ("llama-all-linear", "llama", {T: ALL}, None),
    ("llama-mlp-layer0", "llama", {T: names("gate_proj", "up_proj", "down_proj"), L: lay([0])}, None),  # noqa: E501
    ("llama-exclude-dotted", "llama", {T: ALL, X: names("mlp.down_proj")}, None),
    ("mt5-defaults", "mt5", {}, None),
    ("mt5-all-linear", "mt5", {T: ALL}, "SEQ_2_SEQ_LM"),
    ("mt5-first-index-is-block", "mt5", {T: names("wi_0", "wo"), L: lay([1])}, None),
    ("mt5-pattern-layer", "mt5", {T: names("wi_0", "o"), L: lay([1], "layer")}, None),
    ("mt5-regex-encoder", "mt5", {T: regex(r".*encoder.*\.(q|v)")}, None),
    ("bert-defaults", "bert", {}, None),
    ("bert-all-linear-no-task", "bert", {T: ALL}, None),
    ("bert-all-linear-seq-cls", "bert", {T: ALL}, "SEQ_CLS"),
    ("bert-defaults-seq-cls", "bert", {}, "SEQ_CLS"),
    ("bert-save-suffix", "bert", {T: names("dense"), S: ["output.dense"]}, None),
    ("bert-layers-pattern", "bert", {T: names("query"), L: lay([1], "layer")}, None),
    ("bert-tok-defaults", "bert-tok", {}, "TOKEN_CLS"),
    ("bert-qa-defaults", "bert-qa", {T: names("dense")}, "QUESTION_ANS"),
    ("mlp-names", "mlp", {T: names("fc")}, None),
    ("mlp-moduledict-name", "mlp", {T: names("proj.up")}, None),
    ("mlp-regex", "mlp", {T: regex(r"stack\.layers\.[02]\.(fc|proj\.\w+)")}, None),
    ("mlp-all-linear", "mlp", {T: ALL}, None),
    ("mlp-all-linear-save-head", "mlp", {T: ALL, S: ["head"]}, None),
    ("mlp-layers-top-level-has-no-index", "mlp", {T: names("fc"), L: lay([1])}, None),
    ("mlp-two-patterns", "mlp", {T: names("up", "down"), L: lay([1], "blocks", "layers")}, None),
    ("mlp-exclude-regex", "mlp", {T: names("fc", "embed"), X: regex(r"blocks\..*")}, None),
    ("cnn-all-linear-suffix-quirk", "cnn", {T: ALL}, None),
    ("cnn-names-conv", "cnn", {T: names("conv", "stem")}, None),
    ("mha-all-linear", "attention", {T: ALL}, None),
    ("mha-whole", "attention", {T: names("attn")}, None),
    ("mha-and-inner-linear", "attention", {T: names("attn", "out_proj")}, None),
    ("shared-first-path-only", "attention", {T: names("alias", "out")}, None),
    ("shared-second-path-saved", "attention", {T: names("shared"), S: ["alias"]}, None),
]  # fmt: skip


@pytest.mark.parametrize(("name", "arch", "fields", "task"), PARITY, ids=[c[0] for c in PARITY])
def test_targets_match_peft(name: str, arch: str, fields: dict[str, Any], task: str | None) -> None:
    ours = resolve(arch, fields, task)
    targets, saved = peft_paths(arch, spec_of(fields, task).to_peft_config())
    assert ours.targets == targets
    assert ours.modules_to_save == saved
    assert ours.targets, "a parity case that adapts nothing proves little"


# Selectors PEFT cannot express: checked by value, and PEFT given the resolved names agrees.
BY_VALUE: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("types-conv1d", "gpt2", {T: {"kind": "types", "types": ["transformers.Conv1D"]}},
     [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]),  # noqa: E501
    ("types-embedding-linear", "mlp", {T: {"kind": "types", "types": ["nn.Embedding", "nn.Linear"]}, X: regex(r"(blocks|stack)\..*")},  # noqa: E501
     ["embed", "head"]),
    ("types-layers", "cnn", {T: {"kind": "types", "types": ["nn.Conv2d"]}, L: lay([1], "blocks")},
     ["blocks.1.conv", "blocks.1.fc"]),
    ("all-linear-layers", "opt", {T: ALL, L: lay([1])},
     [f"model.decoder.layers.1.{m}" for m in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2")]),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "arch", "fields", "expected"), BY_VALUE, ids=[c[0] for c in BY_VALUE]
)
def test_targets_by_value(
    name: str, arch: str, fields: dict[str, Any], expected: list[str]
) -> None:
    ours = resolve(arch, fields)
    assert ours.targets == tuple(expected)
    if fields[T]["kind"] == "types":  # what the compiler writes to adapter_config.json
        cfg = spec_of(fields).to_peft_config(target_modules=list(ours.targets))
        cfg["layers_to_transform"] = cfg["layers_pattern"] = None
        assert peft_paths(arch, cfg)[0] == ours.targets


def test_peft_refuses_all_linear_with_layers() -> None:
    with pytest.raises(ValueError, match="cannot be used when `target_modules` is a str"):
        LoraConfig(target_modules="all-linear", layers_to_transform=[1])


# --- errors: one line, with the context a user needs ------------------------------------

OPT_TYPES = "model has: Embedding×1, OPTLearnedPositionalEmbedding×1, LayerNorm×5, Linear×13, "
OPT_TYPES += "ReLU×2"
ERRORS: list[tuple[str, str, dict[str, Any], str | None, str, bool]] = [
    ("no-match-names", "opt", {T: names("q_prj", "vproj")}, None,
     "targets.names [q_prj, vproj] matched no module of OPTForCausalLM; closest names: q_proj, "
     f"v_proj, k_proj, out_proj; {OPT_TYPES}", True),
    ("no-match-regex", "opt", {T: regex(r".*\.query")}, None,
     f"targets.pattern `.*\\.query` matched no module of OPTForCausalLM; {OPT_TYPES}", True),
    ("no-match-types", "mlp", {T: {"kind": "types", "types": ["nn.Conv2d"]}}, None,
     "targets.types [nn.Conv2d] matched no module of MLP; model has: Embedding×1, "
     "Linear×16, ReLU×5, LayerNorm×1", False),
    ("container", "opt", {T: names("self_attn")}, None,
     "module 'model.decoder.layers.0.self_attn' (OPTAttention) is selected by targets.names "
     "[self_attn], but it is a container, not a layer: select its layers instead (e.g. "
     "'model.decoder.layers.0.self_attn.k_proj'); supported: nn.Linear, nn.Embedding, "
     "nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, transformers.Conv1D, "
     "bnb.Linear8bitLt, bnb.Linear4bit, torchao.Linear, quanto.QLinear, hqq.HQQLinear", True),
    ("unsupported-leaf", "mlp", {T: names("norm")}, None,
     "module 'norm' (LayerNorm) is selected by targets.names [norm], but LoRA does not support "
     "its type; supported: nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, "
     "nn.MultiheadAttention, transformers.Conv1D, bnb.Linear8bitLt, bnb.Linear4bit, "
     "torchao.Linear, quanto.QLinear, hqq.HQQLinear", True),
    ("all-excluded", "opt", {T: names("q_proj"), X: regex(".*")}, None,
     "targets.names [q_proj] matched 2 module(s) of OPTForCausalLM, but none is left: "
     "exclude removed 2", True),
    ("all-saved", "opt", {T: names("q_proj"), S: ["self_attn"]}, None,
     "targets.names [q_proj] matched 2 module(s) of OPTForCausalLM, but none is left: "
     "modules_to_save removed 2", True),
    ("layers-out-of-range", "opt", {T: names("q_proj"), L: lay([5])}, None,
     "targets.names [q_proj] matched 2 module(s) of OPTForCausalLM, but none is left: layers "
     "removed 2 (indices 5; layer indices in their paths: 0, 1)", True),
    ("layers-no-index", "mlp", {T: names("fc"), L: lay([0], "stack")}, None,
     "targets.names [fc] matched 5 module(s) of MLP, but none is left: layers removed 5 "
     "(indices 0; layer indices in their paths: none)", True),
    ("no-default-for-custom", "mlp", {}, None,
     "targets is omitted, but MLP has no config.model_type to look up PEFT's default targets; "
     "set targets (e.g. kind: all-linear)", True),
    ("save-container", "opt", {T: names("lm_head"), S: ["decoder.layers"]}, None,
     "'model.decoder.layers' (ModuleList) is selected by modules_to_save entry 'decoder.layers' "
     "(a plain suffix match, as in PEFT), but a container cannot be trained as a copy: name the "
     "layers inside it instead", True),
    ("save-overlaps-target", "opt", {T: names("q_proj"), S: ["proj"]}, None,
     "module 'model.decoder.layers.0.self_attn.q_proj' is selected by targets.names [q_proj] "
     "and by modules_to_save entry 'proj' (a plain suffix match, as in PEFT); it cannot be "
     "both: exclude it from one of them", True),
    ("task-head-overlaps-target", "bert-tok", {T: ALL}, "TOKEN_CLS",
     "module 'classifier' is selected by targets all-linear and by task_type TOKEN_CLS, which "
     "saves 'classifier' as in PEFT; it cannot be both: exclude it from one of them", True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "arch", "fields", "task", "message", "peft_raises"), ERRORS, ids=[c[0] for c in ERRORS]
)
def test_errors(
    name: str, arch: str, fields: dict[str, Any], task: str | None, message: str, peft_raises: bool
) -> None:
    with pytest.raises(TargetError) as info:
        resolve(arch, fields, task)
    assert str(info.value) == message
    assert "\n" not in message
    if peft_raises:  # PEFT refuses the same config (with a less helpful message)
        with pytest.raises((ValueError, TypeError)):
            peft_paths(arch, spec_of(fields, task).to_peft_config())


def test_unknown_model_type() -> None:
    custom = MLP()
    custom.config = {"model_type": "my-net"}  # type: ignore[assignment]
    with pytest.raises(TargetError, match=r"^targets is omitted, but PEFT has no default targets "):
        resolve_targets(custom, spec_of({}).adapter())


def test_supported_callback_and_its_names() -> None:
    adapter = spec_of({T: {"kind": "types", "types": ["nn.Embedding", "nn.Linear"]}}).adapter()
    with pytest.raises(TargetError) as info:
        resolve_targets(
            model("mlp"),
            adapter,
            supported=lambda m: type(m) is nn.Linear,
            supported_names=["nn.Linear"],
        )
    assert str(info.value) == (
        "module 'embed' (Embedding) is selected by targets.types [nn.Embedding, nn.Linear], "
        "but LoRA does not support its type; supported: nn.Linear"
    )


# --- warnings ---------------------------------------------------------------------------

WARNINGS: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("unmatched-name", "opt", {T: names("q_proj", "v_prj")},
     ["targets.names entry 'v_prj' matched no module; did you mean 'v_proj'?"]),
    ("unused-exclude", "opt", {T: names("q_proj"), X: names("nothing_here")},
     ["exclude.names [nothing_here] matched no module"]),
    ("unmatched-save", "opt", {T: names("q_proj"), S: ["score"]},
     ["modules_to_save entry 'score' matched no module"]),
    ("full-path-ignores-layers", "opt", {T: names("q_proj", "model.decoder.layers.0.fc1"), L: lay([1])},  # noqa: E501
     ["'model.decoder.layers.0.fc1' is named in full in targets.names [q_proj, "
      "model.decoder.layers.0.fc1], so layers does not filter it (as in PEFT)"]),
    ("clean", "opt", {T: names("q_proj")}, []),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "arch", "fields", "expected"), WARNINGS, ids=[c[0] for c in WARNINGS]
)
def test_warnings(name: str, arch: str, fields: dict[str, Any], expected: list[str]) -> None:
    assert list(resolve(arch, fields).warnings) == expected


def test_regex_defaults_ignore_layers_with_a_warning() -> None:
    layers = [nn.ModuleDict({"q_proj": nn.Linear(2, 2), "k_proj": nn.Linear(2, 2)}) for _ in "ab"]
    vlm = nn.Module()
    vlm.language_model = nn.ModuleDict({"layers": nn.ModuleList(layers)})
    vlm.config = {"model_type": "gemma4"}  # type: ignore[assignment]
    match = resolve_targets(vlm, spec_of({L: lay([0])}).adapter())
    assert match.targets == ("language_model.layers.0.q_proj", "language_model.layers.1.q_proj")
    assert match.warnings == (
        "layers is ignored: PEFT's default targets for model type 'gemma4' "
        "`.*language_model\\..*\\.(q_proj|v_proj)` is a regex (as in PEFT)",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(vlm, LoraConfig(layers_to_transform=[0]))
    lora = [p for p, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)]
    assert tuple(lora) == match.targets


# --- layer types, defaults, speed -------------------------------------------------------


def test_the_spec_names_every_layer_kind() -> None:
    """The spec's `types` vocabulary (spec layer: it cannot import the registry) is the
    registry's kinds."""
    assert set(kind_names()) == set(LAYER_TYPES)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.Linear(2, 2), "nn.Linear"),
        (nn.MultiheadAttention(4, 2).out_proj, "nn.Linear"),  # NonDynamicallyQuantizableLinear
        (nn.MultiheadAttention(4, 2), "nn.MultiheadAttention"),
        (tf.pytorch_utils.Conv1D(2, 2), "transformers.Conv1D"),
        (nn.Conv1d(1, 1, 1), "nn.Conv1d"),
        (nn.Conv3d(1, 1, 1), "nn.Conv3d"),
        (model("opt").model.decoder.embed_positions, "nn.Embedding"),
        (nn.LayerNorm(2), None),
        (nn.Sequential(nn.Linear(2, 2)), None),
    ],
)
def test_layer_type_name(module: nn.Module, expected: str | None) -> None:
    assert layer_type_name(module) == expected


def test_defaults_table_is_peft_s() -> None:
    peft_table = {
        k: v if isinstance(v, str) else tuple(v)
        for k, v in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.items()
    }
    assert peft_table == LORA_TARGET_MODULES


def test_llama_7b_on_meta_resolves_fast() -> None:
    config = tf.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        llama = tf.AutoModelForCausalLM.from_config(config)
    adapter = spec_of({T: ALL}).adapter()
    start = time.perf_counter()
    match = resolve_targets(llama, adapter)
    elapsed = time.perf_counter() - start
    assert len(match.targets) == 32 * 7
    assert "lm_head" not in match.targets
    assert all(p.device.type == "meta" for p in llama.parameters())
    assert elapsed < 0.5, f"all-linear on a 7B-shaped model took {elapsed:.3f} s"
