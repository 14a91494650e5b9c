"""``add_weighted_adapter`` through the facade, against real peft: config, outputs, training."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import adaptc.peft as ap
from adaptc.peft.combine import add_weighted_adapter
from tests.compiler.models import hf_inputs, tiny_hf
from tests.compiler.parity import output_tensor, share_adapter_weights

TOL = {"rtol": 1e-6, "atol": 1e-6}
CONFIGS = {
    "one": {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8},
    "two": {"target_modules": ["v_proj", "fc1"], "r": 2, "lora_alpha": 16, "use_rslora": True},
}


def pair() -> tuple[peft.PeftModel, ap.PeftModel]:
    base = tiny_hf("opt").eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIGS["one"]), "one")
    ours = ap.get_peft_model(base, ap.LoraConfig(**CONFIGS["one"]), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(**CONFIGS["two"]))
    ours.add_adapter("two", ap.LoraConfig(**CONFIGS["two"]))
    share_adapter_weights(theirs, ours.get_base_model())
    return theirs.eval(), ours.eval()


def mix_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The new adapter's tensors: peft's ``lora_A.mix.weight``, our ``lora_mix.lora_A.weight``."""
    return [p for n, p in model.named_parameters() if {"mix", "lora_mix"} & set(n.split("."))]


def check(theirs: peft.PeftModel, ours: ap.PeftModel) -> None:
    for key in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora"):
        assert getattr(ours.peft_config["mix"], key) == getattr(theirs.peft_config["mix"], key)
    assert ours.active_adapters == theirs.active_adapters == ["one"]
    ours_mix, theirs_mix = mix_params(ours.get_base_model()), mix_params(theirs)
    assert len(ours_mix) == len(theirs_mix) > 0
    assert not any(p.requires_grad for p in ours_mix + theirs_mix)  # frozen, as in peft
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    assert all(p.requires_grad for p in ours_mix + theirs_mix)
    x = hf_inputs("opt")
    with torch.no_grad():
        torch.testing.assert_close(output_tensor(ours(**x)), output_tensor(theirs(**x)), **TOL)


@pytest.mark.parametrize(("kind", "kwargs"), [("cat", {}), ("dare_ties_svd", {"density": 0.6})])
def test_add_weighted_adapter_function_matches_peft(kind, kwargs):
    theirs, ours = pair()
    torch.manual_seed(3)
    theirs.add_weighted_adapter(["one", "two"], [0.6, -0.4], "mix", kind, **kwargs)
    torch.manual_seed(3)
    add_weighted_adapter(ours, ["one", "two"], [0.6, -0.4], "mix", kind, **kwargs)
    check(theirs, ours)


def test_existing_name_is_ignored_and_unknown_adapter_refused():
    _, ours = pair()
    before = {n: p.clone() for n, p in ours.named_parameters()}
    add_weighted_adapter(ours, ["one", "two"], [1.0, 1.0], "two", "cat")  # peft: a no-op
    assert list(ours.peft_config) == ["one", "two"]
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())
    with pytest.raises(ValueError, match="Adapter three does not exist"):
        add_weighted_adapter(ours.base_model, ["one", "three"], [1.0, 1.0], "mix")


@pytest.mark.parametrize("on", ["PeftModel", "LoraModel"])
def test_facade_method_matches_peft(on):
    theirs, ours = pair()
    facade = ours if on == "PeftModel" else ours.base_model
    assert isinstance(facade, getattr(ap, on))
    theirs.add_weighted_adapter(["one", "two"], [0.5, 0.5], "mix", "svd", svd_rank=3)
    facade.add_weighted_adapter(["one", "two"], [0.5, 0.5], "mix", "svd", svd_rank=3)
    check(theirs, ours)
