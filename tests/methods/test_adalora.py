"""AdaLoRA against the real ``peft`` 0.21.2 on a tiny Llama: outputs, the loss with the
orthogonal regulariser, gradients, training steps with ``update_and_allocate`` (masks,
rank pattern, budget), merge, counts, files both ways, the facade config, and the
``AdaLoraCallback`` driving the allocation in a ``Trainer``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import adaptc
from adaptc.integrations.adalora import AdaLoraCallback, adalora_states, update_and_allocate
from adaptc.methods.adalora.method import AdaLoraBranch
from adaptc.spec import SpecError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLOSE: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6}
TARGETS = ["q_proj", "v_proj"]
SCHEDULE: dict[str, Any] = {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "total_step": 6}
ADAPTER: dict[str, Any] = {
    "method": "adalora",
    "targets": {"kind": "names", "names": TARGETS},
    "init": "random",
    "lora_alpha": 8,
    **SCHEDULE,
}
SPEC: dict[str, Any] = {"version": 1, "adapters": {"default": ADAPTER}}
IDS = torch.tensor([[1, 5, 9, 27, 3, 10, 64, 2], [7, 7, 1, 0, 12, 4, 90, 31]])


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return transformers.LlamaForCausalLM(config).eval()


def peft_config(**extra: Any) -> Any:
    kwargs: dict[str, Any] = {"init_lora_weights": False, "lora_alpha": 8, **SCHEDULE, **extra}
    return peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, **kwargs)


def branches(model: nn.Module) -> dict[str, AdaLoraBranch]:
    return {m.target: m for m in model.modules() if isinstance(m, AdaLoraBranch)}


def peft_layers(model: Any) -> dict[str, Any]:
    inner = model.base_model.model
    return {n: m for n, m in inner.named_modules() if hasattr(m, "lora_E") and "lora_E" in dir(m)}


def pair(base: nn.Module) -> tuple[nn.Module, Any]:
    """adaptc's and peft's models, with peft's random factors copied into adaptc's."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config())
    ours = adaptc.compile(base, SPEC)
    layers = peft_layers(theirs)
    with torch.no_grad():
        for path, b in branches(ours).items():
            for name in ("lora_A", "lora_E", "lora_B"):
                getattr(b, name).copy_(getattr(layers[path], name)["default"])
    return ours, theirs


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return tiny_llama()


def test_outputs_loss_and_gradients(base: nn.Module) -> None:
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ours, theirs = pair(base)
    ours.train()
    theirs.train()
    torch.testing.assert_close(logits(ours), logits(theirs), **CLOSE)
    loss_ours = ours(input_ids=IDS, labels=IDS).loss
    loss_theirs = theirs(input_ids=IDS, labels=IDS).loss
    plain = base(input_ids=IDS, labels=IDS).loss
    assert float(loss_ours - plain) != 0.0  # the regulariser is there
    torch.testing.assert_close(loss_ours, loss_theirs, **CLOSE)
    loss_ours.backward()
    loss_theirs.backward()
    layers = peft_layers(theirs)
    for path, b in branches(ours).items():
        for name in ("lora_A", "lora_E", "lora_B"):
            grad = getattr(layers[path], name)["default"].grad
            torch.testing.assert_close(getattr(b, name).grad, grad, **CLOSE)
    for k, v in base.state_dict().items():  # the user's model untouched
        assert torch.equal(v, before[k])


def train(ours: nn.Module, theirs: Any, steps: int) -> list[tuple[Any, ...]]:
    """``steps`` SGD steps on both, each with update_and_allocate; per step what each has."""
    ours.train()
    theirs.train()
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    allocator = theirs.base_model.rankallocator
    seen = []
    for step in range(steps):
        ours(input_ids=IDS, labels=IDS).loss.backward()
        theirs(input_ids=IDS, labels=IDS).loss.backward()
        opt_ours.step()
        opt_theirs.step()
        budget = update_and_allocate(ours, step)
        theirs.base_model.update_and_allocate(step)
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
        init_bgt = allocator.init_bgt
        expected = allocator.budget_schedule(step)[0]
        seen.append((step, budget, expected, init_bgt))
    return seen


def test_training_allocates_as_peft(base: nn.Module, tmp_path: Path) -> None:
    ours, theirs = pair(base)
    seen = train(ours, theirs, 6)
    for step, budget, expected, _ in seen:
        assert budget == expected, step
    assert [s[1] for s in seen] == [16, 16, 10, 8, 8, 8]
    layers = peft_layers(theirs)
    for path, b in branches(ours).items():
        for name in ("lora_A", "lora_E", "lora_B"):
            theirs_p = getattr(layers[path], name)["default"]
            torch.testing.assert_close(getattr(b, name), theirs_p, rtol=1e-4, atol=1e-6)
        assert torch.equal(b.lora_E == 0, layers[path].lora_E["default"] == 0)
    pattern = theirs.peft_config["default"].rank_pattern
    ours_pattern = ours.__dict__["_adaptc"].spec.adapters["default"].rank_pattern
    assert ours_pattern == {k.removesuffix(".lora_E.default"): tuple(v) for k, v in pattern.items()}
    assert sum(sum(m) for m in ours_pattern.values()) == 8
    assert adalora_states(ours)["default"].budget == 8
    torch.testing.assert_close(logits(ours.eval()), logits(theirs.eval()), rtol=1e-4, atol=1e-5)

    # files both ways, with rank_pattern in adapter_config.json and the factors cut to it
    adaptc.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA"
    assert config["rank_pattern"] == {f"{k}.lora_E": list(v) for k, v in ours_pattern.items()}
    read = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(read), logits(ours), rtol=1e-4, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = adaptc.load_adapter(base, tmp_path / "theirs")
    for path, b in branches(loaded).items():
        assert b.lora_E.shape[0] == sum(ours_pattern[path])
        assert float(b.ranknum) == 4.0
    torch.testing.assert_close(logits(loaded), logits(theirs), rtol=1e-4, atol=1e-5)
    again = adaptc.load_adapter(base, tmp_path / "ours")
    torch.testing.assert_close(logits(again), logits(ours), rtol=1e-4, atol=1e-5)


def test_merge_and_counts(base: nn.Module) -> None:
    ours, theirs = pair(base)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    unmerged = logits(ours)
    torch.testing.assert_close(logits(adaptc.merge(ours)), unmerged, **CLOSE)
    torch.testing.assert_close(logits(theirs.merge_and_unload()), unmerged, **CLOSE)


def test_default_init_matches_peft_seed(base: nn.Module) -> None:
    spec = {"version": 1, "adapters": {"default": {**ADAPTER, "init": "default"}}}
    torch.manual_seed(3)
    ours = adaptc.compile(base, spec)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(init_lora_weights=True))
    layers = peft_layers(theirs)
    for path, b in branches(ours).items():
        for name in ("lora_A", "lora_E", "lora_B"):
            assert torch.equal(getattr(b, name), getattr(layers[path], name)["default"])


def test_facade_config(base: nn.Module) -> None:
    from adaptc.peft import AdaLoraConfig, get_peft_model

    config = AdaLoraConfig(
        target_modules=TARGETS, init_lora_weights=False, lora_alpha=8, **SCHEDULE
    )
    assert config.peft_type == "ADALORA"
    model = get_peft_model(base, config)
    assert len(branches(model.get_base_model())) == 4
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    model.base_model.update_and_allocate(0)  # as peft's: budget 16 at step 0, no mask yet
    assert adalora_states(model)["default"].budget == 16
    with pytest.raises(ValueError, match="total_step"):
        AdaLoraConfig(target_modules=TARGETS)


def test_errors(base: nn.Module) -> None:
    no_step = {k: v for k, v in ADAPTER.items() if k != "total_step"}
    with pytest.raises(SpecError, match="total_step"):
        adaptc.compile(base, {"version": 1, "adapters": {"default": no_step}})
    bad = {**ADAPTER, "tinit": 5}
    with pytest.raises(SpecError, match="no budgeting phase"):
        adaptc.compile(base, {"version": 1, "adapters": {"default": bad}})
    with pytest.raises(ValueError, match="AdaLoRA adapter"):
        lora_targets = {"kind": "names", "names": TARGETS}
        lora = {"version": 1, "adapters": {"default": {"method": "lora", "targets": lora_targets}}}
        update_and_allocate(adaptc.compile(base, lora), 0)


def test_trainer_callback_drives_allocation(base: nn.Module, tmp_path: Path) -> None:
    model = adaptc.compile(base, SPEC)
    data = [{"input_ids": IDS[i % 2], "labels": IDS[i % 2]} for i in range(4)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=1,
        max_steps=3,
        learning_rate=0.05,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[AdaLoraCallback()]
    )
    trainer.train()
    state = adalora_states(model)["default"]
    assert state.budget == 10  # steps 0, 1, 2: budgets 16, 16 (tinit), 10
    pattern = model.__dict__["_adaptc"].spec.adapters["default"].rank_pattern
    assert pattern is not None and sum(sum(m) for m in pattern.values()) == 10
    for path, b in branches(model).items():
        assert int((b.lora_E != 0).sum()) == sum(pattern[path])


def test_merge_in_place_is_exact(base: nn.Module) -> None:
    ours, _ = pair(base)
    unmerged = logits(ours)
    weight = branches(ours)["model.layers.0.self_attn.q_proj"]
    assert weight is not None
    adaptc.merge_in_place(ours)
    torch.testing.assert_close(logits(ours), unmerged, **CLOSE)
    adaptc.unmerge_in_place(ours)
    assert torch.equal(logits(ours), unmerged)


class TinyGPT2Mlp(nn.Module):
    """transformers' ``Conv1D`` layers (weights stored (in, out): fan_in_fan_out)."""

    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(16, 8)
        self.c_proj = Conv1D(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)))  # type: ignore[no-any-return]


def test_conv1d_fan_in_fan_out() -> None:
    torch.manual_seed(0)
    mlp = TinyGPT2Mlp()
    kwargs = {"init_lora_weights": False, "init_r": 3, "target_r": 2, "total_step": 4}
    config = peft.AdaLoraConfig(target_modules=["c_fc", "c_proj"], fan_in_fan_out=True, **kwargs)
    theirs = peft.get_peft_model(copy.deepcopy(mlp), config)
    adapter = {"method": "adalora", "targets": {"kind": "names", "names": ["c_fc", "c_proj"]}}
    adapter |= {"init": "random", "init_r": 3, "target_r": 2, "total_step": 4}
    ours = adaptc.compile(mlp, {"version": 1, "adapters": {"default": adapter}})
    inner = theirs.base_model.model
    with torch.no_grad():
        for path, b in branches(ours).items():
            assert b.fan_in_fan_out
            for name in ("lora_A", "lora_E", "lora_B"):
                getattr(b, name).copy_(getattr(inner.get_submodule(path), name)["default"])
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        expected = theirs(x)
        torch.testing.assert_close(ours(x), expected, **CLOSE)
        torch.testing.assert_close(adaptc.merge(ours)(x), expected, **CLOSE)
        torch.testing.assert_close(theirs.merge_and_unload()(x), expected, **CLOSE)


def test_mixed_with_lora(base: nn.Module) -> None:
    lora = peft.LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ada = peft.AdaLoraConfig(
        target_modules=["q_proj", "k_proj"], init_lora_weights=False, init_r=4, total_step=5
    )
    mixed = peft.PeftMixedModel(copy.deepcopy(base), lora, "a")
    mixed.add_adapter("b", ada)
    mixed.set_adapter(["a", "b"])
    names = {"kind": "names", "names": ["q_proj", "v_proj"]}
    spec = {
        "version": 1,
        "adapters": {
            "a": {"method": "lora", "targets": names},
            "b": {**ADAPTER, "targets": {"kind": "names", "names": ["q_proj", "k_proj"]}},
        },
    }
    ours = adaptc.compile(base, spec)
    theirs = {n.replace(".base_layer", ""): p for n, p in mixed.named_parameters()}
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".lora_a." in n or ".lora_b." in n:
                path, _, rest = n.replace(".base_layer", "").partition(".lora_")
                adapter, _, tensor = rest.partition(".")
                if tensor == "ranknum":
                    continue
                factor, _, suffix = tensor.partition(".")
                key = f"base_model.model.{path}.{factor}.{adapter}" + (
                    f".{suffix}" if suffix else ""
                )
                p.copy_(theirs[key])
    adaptc.set_active(ours, ["a", "b"])
    both = logits(ours)
    torch.testing.assert_close(both, logits(mixed), **CLOSE)
    adaptc.set_active(ours, ["a"])
    assert not torch.allclose(logits(ours), both)
