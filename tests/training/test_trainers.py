"""A compiled model trains as a PEFT model does: a plain loop, ``Trainer``, ``SFTTrainer``.

Only adapter weights (and ``modules_to_save`` copies) get gradients and optimizer state;
checkpoints and ``save_model`` hold only the adapter, in PEFT's files; resuming continues
the same run; a saved adapter loads for more training or for inference.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import datasets
import peft
import pytest
import torch
import transformers
from torch import nn

import adaptc
from adaptc.adapters.keys import adapter_state_dict
from adaptc.peft import LoraConfig, get_peft_model
from tests.compiler.models import tiny_hf
from tests.conftest import ROOT

SPEC: dict[str, Any] = {
    "version": 1,
    "task_type": "CAUSAL_LM",
    "adapters": {
        "default": {
            "r": 4,
            "lora_alpha": 8,
            "targets": {"kind": "all-linear"},
            "modules_to_save": ["lm_head"],
        }
    },
}
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json", "adaptc_spec.yaml"}
FULL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
SEQ = 12


def counting_dataset(n: int = 64) -> datasets.Dataset:
    """Rows ``s, s+1, …`` (mod 60, from 2): each next token is the current one plus one."""
    rows = [[2 + (start + i) % 60 for i in range(SEQ)] for start in range(n)]
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})


def adapted(kind: str, base: nn.Module) -> nn.Module:
    """The model a user trains: ``adaptc.compile``'s, or the ``adaptc.peft`` facade's."""
    if kind == "compile":
        return adaptc.compile(base, SPEC)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules="all-linear",
        modules_to_save=["lm_head"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def compiled_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(type(model), "get_base_model") else model


def arguments(out: Path, steps: int, **overrides: Any) -> transformers.TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": steps,
        "per_device_train_batch_size": 8,
        "learning_rate": 2e-2,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": steps,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "data_seed": 0,
        "disable_tqdm": True,
        **overrides,
    }
    return transformers.TrainingArguments(**settings)


def losses(trainer: transformers.Trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def is_adapter_name(name: str) -> bool:
    return ".lora_" in name or "modules_to_save" in name


def assert_adapter_only(directory: Path) -> None:
    files = {p.name for p in directory.iterdir()}
    assert files >= ADAPTER_FILES, files
    assert not files & FULL_FILES, files


def same_adapter(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    sa, sb = (
        adapter_state_dict(compiled_of(a), "default"),
        adapter_state_dict(compiled_of(b), "default"),
    )
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=1e-5, msg=key)


def test_plain_loop_trains_only_the_adapter():
    base = tiny_hf("llama")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = adaptc.compile(base, SPEC)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable_names(model) and all(is_adapter_name(n) for n in trainable_names(model))
    optimizer = torch.optim.AdamW(trainable, lr=2e-2)
    batch = {k: torch.tensor(v) for k, v in counting_dataset(16)[:16].items()}
    history = []
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0]
    for name, p in base.named_parameters():  # the base is shared, frozen and untouched
        assert torch.equal(p, before[name]) and p.grad is None, name


@pytest.mark.parametrize("kind", ["compile", "facade"])
def test_trainer_saves_only_the_adapter(kind, tmp_path):
    base = tiny_hf("llama")
    model = adapted(kind, base)
    args = arguments(tmp_path / "run", 24, save_steps=12)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=counting_dataset())
    trainer.train()

    history = losses(trainer)
    assert history[-1] < 0.7 * history[0], history
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in trainer.optimizer.state} <= optimized
    assert all(is_adapter_name(n) for n in trainable_names(model))

    for step in (12, 24):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert_adapter_only(checkpoint)
        assert {"optimizer.pt", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_only(tmp_path / "final")

    # real peft reads the trainer's adapter and computes what the trained model computes
    ids = torch.tensor(counting_dataset(2)["input_ids"])
    theirs = peft.PeftModel.from_pretrained(tiny_hf("llama"), str(tmp_path / "final")).eval()
    ours = adaptc.load_adapter(tiny_hf("llama"), tmp_path / "final").eval()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(theirs(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["compile", "facade"])
def test_resume_continues_the_same_run(kind, tmp_path):
    full = adapted(kind, tiny_hf("llama"))
    trainer = transformers.Trainer(
        model=full,
        args=arguments(tmp_path / "a", 12, save_steps=6),
        train_dataset=counting_dataset(),
    )
    trainer.train()

    torch.manual_seed(123)  # a different initial adapter: resuming must replace it
    resumed = adapted(kind, tiny_hf("llama"))
    trainer = transformers.Trainer(
        model=resumed,
        args=arguments(tmp_path / "b", 12, save_steps=6),
        train_dataset=counting_dataset(),
    )
    assert_adapter_only(tmp_path / "a" / "checkpoint-6")  # resumed from the adapter alone
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert trainer.state.global_step == 12
    same_adapter(resumed, full)


def test_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["red", "green", "blue", "cat", "dog", "bird", "sits", "runs", "flies", "the", "a"]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    texts = [
        f"the {c} {a} {v}"
        for c in ("red", "green", "blue")
        for a, v in (("cat", "sits"), ("dog", "runs"), ("bird", "flies"))
    ]
    data = datasets.Dataset.from_dict({"text": texts * 4})
    model = adaptc.compile(tiny_hf("llama"), SPEC)
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=20,
        per_device_train_batch_size=9,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=10,
        max_length=16,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    history = losses(trainer)
    assert history[-1] < 0.7 * history[0], history
    assert config.gradient_checkpointing  # trl's default: gradients still reach every layer
    for name, tensor in adapter_state_dict(model, "default").items():
        if "lora_B" in name:  # starts at zero
            assert tensor.abs().sum() > 0, name
    for step in (10, 20):
        assert_adapter_only(tmp_path / "sft" / f"checkpoint-{step}")
    trainer.save_model()
    assert_adapter_only(tmp_path / "sft")
    assert (tmp_path / "sft" / "tokenizer.json").is_file()
    peft.PeftModel.from_pretrained(tiny_hf("llama"), str(tmp_path / "sft"))


def test_load_adapter_for_more_training_and_for_inference(tmp_path):
    model = adaptc.compile(tiny_hf("llama"), SPEC)
    trainer = transformers.Trainer(
        model=model, args=arguments(tmp_path / "first", 8), train_dataset=counting_dataset()
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))

    # more training: a one-liner, then a Trainer as before
    more = adaptc.load_adapter(tiny_hf("llama"), tmp_path / "adapter", trainable=True)
    same_adapter(more, model)
    assert trainable_names(more) == trainable_names(model)
    trainer = transformers.Trainer(
        model=more, args=arguments(tmp_path / "more", 8), train_dataset=counting_dataset()
    )
    trainer.train()
    changed = adapter_state_dict(more, "default")
    start = adapter_state_dict(model, "default")
    assert any(not torch.equal(changed[k], start[k]) for k in start)
    assert_adapter_only(tmp_path / "more" / "checkpoint-8")

    # inference: frozen (the default), evaluated by a Trainer
    frozen = adaptc.load_adapter(tiny_hf("llama"), tmp_path / "adapter")
    assert adaptc.trainable_parameters(frozen)[0] == 0
    evaluator = transformers.Trainer(model=frozen, args=arguments(tmp_path / "eval", 1))
    metrics = evaluator.evaluate(counting_dataset(16))
    model.eval()
    batch = {k: torch.tensor(v) for k, v in counting_dataset(16)[:16].items()}
    with torch.no_grad():
        expected = model(**batch).loss.item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_load_best_model_at_end_loads_the_adapter(tmp_path):
    model = adaptc.compile(tiny_hf("llama"), SPEC)
    args = arguments(
        tmp_path / "run",
        8,
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=counting_dataset(), eval_dataset=counting_dataset(8)
    )
    trainer.train()
    best = adaptc.load_adapter(tiny_hf("llama"), trainer.state.best_model_checkpoint)
    same_adapter(model, best, atol=0)


def test_save_pretrained_writes_the_adapter_and_merge_saves_in_full(tmp_path):
    base = tiny_hf("llama")
    model = adaptc.compile(base, SPEC)
    model.save_pretrained(tmp_path / "adapter")
    assert_adapter_only(tmp_path / "adapter")
    assert "save_pretrained" not in base.__dict__  # the input model is untouched

    merged = adaptc.merge(model)
    assert "save_pretrained" not in merged.__dict__
    merged.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor(counting_dataset(2)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_trainer_imported_after_compiling_is_taught_too():
    code = (
        "import sys, adaptc\n"
        "from tests.compiler.models import tiny_hf\n"
        "m = adaptc.compile(tiny_hf('llama'), {'version': 1, 'adapters': {'default': {'r': 2}}})\n"
        "assert 'transformers.trainer' not in sys.modules\n"
        "from transformers import Trainer\n"
        "assert Trainer.__dict__.get('_adaptc_patched'), 'Trainer not patched'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
