"""EVA against the real ``peft`` 0.21.2: ``init: eva`` and ``adaptc.initialize_eva`` (PEFT's
``init_lora_weights="eva"`` and ``initialize_lora_eva_weights``) on a tiny Llama.

PEFT's EVA is deterministic given the batches (its low-rank SVD draws from a fixed seed):
the same batches must give the same ``A`` bit for bit, the same redistributed ranks (and
layers left out at rank 0), the same config PEFT rewrites (targets, ``rank_pattern``,
``alpha_pattern``), trainable counts, outputs and files. Also: what happens without
``initialize_eva`` (as in PEFT: the branch trains from its first draw), and the errors,
including the two places adaptc departs from PEFT (a dataloader with no usable batch is
an error instead of an endless loop; ``whiten`` divides each layer's components once).
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import adaptc
import adaptc.peft as facade
from adaptc.adapters.keys import adapter_state_dict
from adaptc.methods.lora.branch import LoraBranch
from adaptc.spec import SpecError, from_peft_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXACT: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}


def llama(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def make_batches(n: int = 6, tokens: int = 12) -> list[dict[str, torch.Tensor]]:
    """Language-modelling batches with padding and masked labels (both leave tokens out)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (4, tokens), generator=g)
        mask = torch.ones_like(ids)
        mask[0, tokens - 3 :] = 0
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


BATCHES = make_batches()

# name -> (spec fields, LoraConfig arguments): the same adapter in both
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({}, {}),
    "rho-1": ({"eva": {"rho": 1.0, "tau": 0.9}}, {"eva_config": peft.EvaConfig(rho=1.0, tau=0.9)}),
    "no-adjust": (
        {"eva": {"tau": 0.9, "adjust_scaling_factors": False}},
        {"eva_config": peft.EvaConfig(tau=0.9, adjust_scaling_factors=False)},
    ),
    "no-label-mask": (
        {"eva": {"tau": 0.9, "use_label_mask": False}},
        {"eva_config": peft.EvaConfig(tau=0.9, use_label_mask=False)},
    ),
    "rslora": ({"use_rslora": True}, {"use_rslora": True}),
    "dora": ({"use_dora": True}, {"use_dora": True}),
    "rank-0": (  # r = 1, rho = 8: four layers get no rank and lose their branch
        {"r": 1, "eva": {"rho": 8.0, "tau": 0.9}},
        {"r": 1, "eva_config": peft.EvaConfig(rho=8.0, tau=0.9)},
    ),
}


def spec(**fields: Any) -> dict[str, Any]:
    adapter = {"r": 4, "lora_alpha": 8, "init": "eva", "eva": {"tau": 0.9}}
    adapter["targets"] = {"kind": "all-linear"}
    return {"version": 1, "adapters": {"default": {**adapter, **fields}}}


def peft_config(**kwargs: Any) -> peft.LoraConfig:
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
              "eva_config": peft.EvaConfig(tau=0.9), **kwargs}  # fmt: skip
    return peft.LoraConfig(init_lora_weights="eva", **kwargs)


@functools.cache
def both(case: str = "default", layers: int = 2, seed: int = 3) -> tuple[Any, ...]:
    """``(base, ours, theirs)``, each initialised by EVA from :data:`BATCHES` (computed once
    per case: the tests only read them)."""
    base = llama(layers)
    fields, kwargs = CASES[case]
    torch.manual_seed(seed)
    ours = adaptc.compile(base, spec(**fields))
    adaptc.initialize_eva(ours, BATCHES)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(**kwargs))
    peft.initialize_lora_eva_weights(theirs, BATCHES, show_progress_bar=False)
    return base, ours, theirs


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**BATCHES[0]).logits  # type: ignore[no-any-return]


def assert_same_adapter(ours: nn.Module, theirs: Any) -> None:
    mine, ref = adapter_state_dict(ours, "default"), peft.get_peft_model_state_dict(theirs)
    assert sorted(mine) == sorted(ref)
    for key, value in ref.items():
        assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key


def rewritten(config: dict[str, Any]) -> dict[str, Any]:
    """The keys PEFT rewrites after EVA (targets as a sorted list: PEFT keeps a set)."""
    keys = ("target_modules", "rank_pattern", "alpha_pattern", "r", "lora_alpha", "eva_config")
    out = {k: config[k] for k in keys}
    out["target_modules"] = sorted(out["target_modules"])
    return out


def ours_config(model: nn.Module) -> dict[str, Any]:
    return model.__dict__["_adaptc"].spec.to_peft_config()  # type: ignore[no-any-return]


def theirs_config(model: Any) -> dict[str, Any]:
    return model.peft_config["default"].to_dict()  # type: ignore[no-any-return]


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "params": {n: (id(p), p.requires_grad, p.clone()) for n, p in model.named_parameters()},
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "training": [m.training for m in model.modules()],
    }


def assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["modules"] == after["modules"] and before["training"] == after["training"]
    assert before["hooks"] == after["hooks"] and before["attrs"] == after["attrs"]
    for name, (pid, grad, value) in before["params"].items():
        pid2, grad2, value2 = after["params"][name]
        assert (pid, grad) == (pid2, grad2) and torch.equal(value, value2), name


# --- the spec and PEFT's config ---------------------------------------------------------


def test_peft_config_both_ways() -> None:
    config = peft_config(eva_config=peft.EvaConfig(rho=1.5, tau=0.95, whiten=True))
    config.target_modules = ["q_proj", "v_proj"]
    expected = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    assert expected["eva_config"] == {
        "rho": 1.5, "tau": 0.95, "use_label_mask": True, "label_mask_value": -100,
        "whiten": True, "adjust_scaling_factors": True,
    }  # fmt: skip
    loaded = from_peft_config(expected)
    assert loaded.adapter().eva.rho == 1.5 and loaded.adapter().eva.whiten
    assert loaded.to_peft_config() == expected
    ours = facade.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="eva", target_modules=["q_proj", "v_proj"],
        eva_config={"rho": 1.5, "tau": 0.95, "whiten": True},
    )  # fmt: skip
    assert isinstance(ours.eva_config, facade.EvaConfig)  # a dict becomes PEFT's class
    assert ours.to_spec().to_peft_config() == expected


def test_without_eva_settings_peft_s_defaults_are_used() -> None:
    with pytest.warns(UserWarning, match="Using default EVA config"):
        theirs = peft.LoraConfig(init_lora_weights="eva", target_modules=["q_proj"]).to_dict()
    with pytest.warns(UserWarning, match="Using default EVA config"):
        ours = facade.LoraConfig(init_lora_weights="eva", target_modules=["q_proj"]).to_dict()
    adapter = spec()["adapters"]["default"]
    del adapter["eva"]
    written = adaptc.load_spec({"version": 1, "adapters": {"default": adapter}}).to_peft_config()
    assert written["eva_config"] == theirs["eva_config"] == ours["eva_config"]


def test_spec_errors() -> None:
    def error(**fields: Any) -> str:
        with pytest.raises(SpecError) as info:
            adaptc.load_spec(spec(**fields))
        return str(info.value)

    assert error(eva={"rho": 0.5}) == "adapters.default.eva.rho: must be ≥ 1.0, got 0.5"
    assert error(eva={"tau": 1.5}) == "adapters.default.eva.tau: must be ≤ 1.0, got 1.5"
    assert error(init="default") == "adapters.default.eva: eva needs init 'eva', not 'default'"
    with pytest.raises(ValueError, match=r"`rho` must be >= 1\.0"):
        facade.EvaConfig(rho=0.5)


# --- initialize_eva: PEFT's result --------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_initialize_eva_equals_peft(case: str) -> None:
    _, ours, theirs = both(case)
    assert_same_adapter(ours, theirs)  # A bit for bit, B zero, every rank
    assert rewritten(ours_config(ours)) == rewritten(theirs_config(theirs))
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    torch.testing.assert_close(logits(ours), logits(theirs), **EXACT)
    plan = ours.__dict__["_adaptc"].plan
    assert (plan.trainable_params, plan.total_params) == theirs.get_nb_trainable_parameters()


def test_ranks_are_redistributed_and_rank_0_drops_the_branch() -> None:
    _, ours, theirs = both("rank-0")
    config = ours_config(ours)
    assert config["rank_pattern"] == theirs_config(theirs)["rank_pattern"]
    ranks = {m.target: m.r for m in ours.modules() if isinstance(m, LoraBranch)}
    assert sum(ranks.values()) == 14  # the budget: 14 targets of rank 1
    assert len(ranks) == 10 and sorted(config["target_modules"]) == sorted(ranks)
    assert {k: v for k, v in ranks.items() if v != 1} == config["rank_pattern"]
    # the scaling stays alpha / r: alpha grew with the rank (adjust_scaling_factors)
    for branch in ours.modules():
        if isinstance(branch, LoraBranch):
            assert branch.scaling == 8.0
    assert set(config["alpha_pattern"]) == set(config["rank_pattern"])


def test_twenty_targets_are_written_as_peft_s_short_suffixes() -> None:
    """With 20 targets and more PEFT writes the shortest suffixes that select them."""
    _, ours, theirs = both("rho-1", layers=3)
    expected = sorted(theirs_config(theirs)["target_modules"])
    assert expected == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert sorted(ours_config(ours)["target_modules"]) == expected
    assert_same_adapter(ours, theirs)


def test_the_state_dicts_equal_peft_s() -> None:
    base = llama()
    ours = adaptc.compile(base, spec())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config())
    reference = peft.get_eva_state_dict(theirs, BATCHES, show_progress_bar=False)
    mine = adaptc.eva_state_dict(ours, BATCHES)
    assert ["base_model.model." + k for k in mine] == list(reference)
    for key, value in mine.items():
        assert torch.equal(value, reference["base_model.model." + key]), key
    wrapped = facade.get_peft_model(copy.deepcopy(base), facade.LoraConfig(**_kwargs()))
    through = facade.get_eva_state_dict(wrapped, BATCHES, show_progress_bar=False)
    assert list(through) == list(reference)
    assert all(torch.equal(through[k], v) for k, v in reference.items())
    # a plain model and a config: PEFT runs it as it is, adaptc a compiled copy
    plain = facade.get_eva_state_dict(
        base, BATCHES, peft_config=facade.LoraConfig(**_kwargs()), show_progress_bar=False
    )
    assert list(plain) == list(mine) and all(torch.equal(plain[k], mine[k]) for k in mine)


def _kwargs() -> dict[str, Any]:
    return {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": "eva",
            "eva_config": {"tau": 0.9}}  # fmt: skip


def test_the_facade_equals_peft() -> None:
    base = llama()
    torch.manual_seed(3)
    ours = facade.get_peft_model(copy.deepcopy(base), facade.LoraConfig(**_kwargs()))
    facade.initialize_lora_eva_weights(ours, BATCHES, show_progress_bar=False)
    _, _, theirs = both()
    torch.testing.assert_close(logits(ours), logits(theirs), **EXACT)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert rewritten(ours.peft_config["default"].to_dict()) == rewritten(theirs_config(theirs))
    state = peft.get_peft_model_state_dict(theirs)
    mine = facade.get_peft_model_state_dict(ours)
    assert all(torch.equal(mine[k], v) for k, v in state.items()) and sorted(mine) == sorted(state)


def test_whiten_divides_each_layer_s_components_once() -> None:
    """PEFT's whitening divides the SVD that equal-input layers share once per layer (an
    in-place division of a shared view); adaptc divides once. Layers with inputs of their
    own are PEFT's bit for bit."""
    own = ["o_proj", "down_proj"]  # inputs no other target shares
    fields = {"eva": {"tau": 0.9, "whiten": True}, "targets": {"kind": "names", "names": own}}
    base = llama()
    torch.manual_seed(3)
    ours = adaptc.compile(base, spec(**fields))
    adaptc.initialize_eva(ours, BATCHES)
    torch.manual_seed(3)
    kwargs = {"target_modules": own, "eva_config": peft.EvaConfig(tau=0.9, whiten=True)}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(**kwargs))
    peft.initialize_lora_eva_weights(theirs, BATCHES, show_progress_bar=False)
    assert_same_adapter(ours, theirs)
    # q, k and v share their input: one SVD, each layer its first rows divided once
    plain = adaptc.eva_state_dict(adaptc.compile(base, spec()), BATCHES)
    white = adaptc.eva_state_dict(
        adaptc.compile(base, spec(eva={"tau": 0.9, "whiten": True})), BATCHES
    )
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    scale = white[q].norm(dim=1) / plain[q].norm(dim=1)  # 1 / √S, decreasing
    torch.testing.assert_close(white[q], plain[q] * scale[:, None], **EXACT)
    torch.testing.assert_close(white[k], white[q][: len(white[k])], rtol=0, atol=0)
    assert torch.all(scale[1:] >= scale[:-1])


# --- files, training, the original -----------------------------------------------------------


def test_files_both_ways(tmp_path: Path) -> None:
    base, ours, theirs = both("rank-0")
    adaptc.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    written = {
        n: json.loads((tmp_path / n / "adapter_config.json").read_text())
        for n in ("ours", "theirs")
    }
    assert rewritten(written["ours"]) == rewritten(written["theirs"])
    assert written["ours"]["init_lora_weights"] == "eva"
    loaded = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), str(tmp_path / "ours"), is_trainable=True
    ).eval()
    torch.testing.assert_close(logits(loaded), logits(ours), **EXACT)
    assert loaded.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    back = adaptc.load_adapter(base, tmp_path / "theirs", trainable=True)
    torch.testing.assert_close(logits(back), logits(theirs), **EXACT)
    assert adaptc.trainable_parameters(back) == theirs.get_nb_trainable_parameters()
    through = facade.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(through), logits(theirs), **EXACT)


def train_step(model: nn.Module) -> None:
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    batch = BATCHES[1]
    model(**batch).loss.backward()
    optimiser.step()
    optimiser.zero_grad()


def test_without_initialize_eva_it_trains_and_saves_as_peft(tmp_path: Path) -> None:
    """PEFT neither warns nor refuses: ``A`` keeps ``nn.Linear``'s draw and ``B = 0``."""
    base = llama()
    torch.manual_seed(4)
    ours = adaptc.compile(base, spec())
    torch.manual_seed(4)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config())
    assert_same_adapter(ours, theirs)
    torch.testing.assert_close(logits(ours), logits(base), rtol=0, atol=0)  # B = 0
    train_step(ours)
    train_step(theirs)
    mine, ref = adapter_state_dict(ours, "default"), peft.get_peft_model_state_dict(theirs)
    for key, value in ref.items():
        torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-6)
    adaptc.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    written = {
        n: json.loads((tmp_path / n / "adapter_config.json").read_text())
        for n in ("ours", "theirs")
    }
    assert rewritten(written["ours"]) == rewritten(written["theirs"])


def test_the_original_model_is_untouched_and_no_hook_is_left() -> None:
    base = llama().train()
    before = snapshot(base)
    ours = adaptc.compile(base, spec()).train()
    hooks = [len(m._forward_hooks) for m in ours.modules()]
    adaptc.initialize_eva(ours, BATCHES)
    assert_same_snapshot(before, snapshot(base))
    assert ours.training and all(m.training for m in ours.modules())  # its mode restored
    assert [len(m._forward_hooks) for m in ours.modules()] == hooks[: len(list(ours.modules()))]
    assert all(not m._forward_hooks for m in ours.modules())


def test_embeddings_keep_the_default_init_as_in_peft() -> None:
    """EVA initialises linear layers; an embedding target is initialised again as PEFT does
    (drawing the same numbers in the same order), with a warning."""
    names = ["embed_tokens", "q_proj", "down_proj"]
    base = llama()
    torch.manual_seed(3)
    with pytest.warns(adaptc.AdaptcWarning, match="init 'eva' does not apply to embeddings"):
        ours = adaptc.compile(base, spec(targets={"kind": "names", "names": names}))
    with pytest.warns(adaptc.AdaptcWarning) as record:
        adaptc.initialize_eva(ours, BATCHES)
    assert [str(w.message) for w in record] == [
        "the following layers were initialized with init 'eva' because they were not found in "
        "the eva state_dict: ['model.embed_tokens'] (EVA initialises linear layers only)"
    ]
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(target_modules=names))
    peft.initialize_lora_eva_weights(theirs, BATCHES, show_progress_bar=False)
    assert_same_adapter(ours, theirs)


def test_a_4bit_base_equals_peft(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from tests.compiler.models import save_llama

    path = save_llama(tmp_path / "llama", hidden=64)

    def load() -> nn.Module:
        config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.AutoModelForCausalLM.from_pretrained(
                path, quantization_config=config, device_map="cpu"
            ).eval()

    torch.manual_seed(3)
    ours = adaptc.compile(load(), spec(targets={"kind": "names", "names": ["q_proj", "o_proj"]}))
    adaptc.initialize_eva(ours, BATCHES)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(load(), peft_config(target_modules=["q_proj", "o_proj"]))
    peft.initialize_lora_eva_weights(theirs, BATCHES, show_progress_bar=False)
    assert_same_adapter(ours, theirs)
    assert rewritten(ours_config(ours)) == rewritten(theirs_config(theirs))


# --- errors ------------------------------------------------------------------------------


def test_a_dataloader_without_usable_batches_is_an_error() -> None:
    """Each batch leaves fewer tokens than the 8 components (r·rho) of the SVD: PEFT skips
    every batch and loops forever; adaptc stops after the dataloader's first pass."""
    batches = make_batches(n=3)
    for batch in batches:
        batch["attention_mask"] = torch.zeros_like(batch["attention_mask"])
        batch["attention_mask"][0, :2] = 1  # 2 tokens per batch
    ours = adaptc.compile(llama(), spec())
    with pytest.raises(ValueError) as info:
        adaptc.initialize_eva(ours, batches)
    assert str(info.value) == (
        "EVA found no usable batch for model.layers.0.self_attn.q_proj: every batch of the "
        "dataloader gives it fewer than 8 token positions (round(r * rho) = 8); use batches "
        "with more (unmasked) tokens, or a smaller r or rho (PEFT would loop forever here)"
    )
    assert all(not m._forward_hooks for m in ours.modules())
    with pytest.raises(ValueError, match=r"^dataloader is empty$"):
        adaptc.initialize_eva(ours, [])
    one_pass = iter(make_batches(n=1))
    with pytest.raises(ValueError, match="the dataloader gave no batches after its first one"):
        adaptc.initialize_eva(ours, one_pass)


def test_initialize_eva_needs_init_eva_and_one_active_adapter() -> None:
    other = spec(init="default")
    del other["adapters"]["default"]["eva"]
    ours = adaptc.compile(llama(), other)
    with pytest.raises(adaptc.CompileError) as info:
        adaptc.initialize_eva(ours, BATCHES)
    assert str(info.value) == (
        "adapter 'default' has init 'default': initialize_eva() needs an adapter with init "
        "'eva' (PEFT's init_lora_weights='eva')"
    )
    wrapped = facade.get_peft_model(llama(), facade.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError) as info:
        facade.initialize_lora_eva_weights(wrapped, BATCHES)
    assert str(info.value) == (
        "`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`"
    )
    two = spec()
    two["adapters"]["other"] = dict(two["adapters"]["default"])
    model = adaptc.compile(llama(), two)
    adaptc.set_active(model, ["default", "other"])
    with pytest.raises(adaptc.CompileError) as info:
        adaptc.initialize_eva(model, BATCHES)
    assert str(info.value) == (
        "initialize_eva() works with a single active adapter, as PEFT's "
        "initialize_lora_eva_weights (active: default, other)"
    )


def test_layer_input_functions_by_name() -> None:
    ours = adaptc.compile(llama(), spec())
    with pytest.raises(ValueError) as info:
        adaptc.eva_state_dict(ours, BATCHES, prepare_layer_inputs_fn={"no.such.layer": None})
    assert str(info.value) == (
        "prepare_layer_inputs_fn is a mapping but the following module names were not found "
        "in the model: dict_keys(['no.such.layer'])"
    )


def test_convolutions_refuse_eva() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    data = {"version": 1, "adapters": {"default": {"init": "eva", "targets": {"kind": "names",
            "names": ["0"]}}}}  # fmt: skip
    with pytest.raises(adaptc.CompileError) as info:
        adaptc.compile(model, data)
    assert str(info.value) == (
        "0: init 'eva' is not supported for Conv2d (PEFT only has default, gaussian and "
        "random init for convolutions)"
    )


def test_gpt2_conv1d_layers_equal_peft() -> None:
    """transformers' ``Conv1D`` (weight stored (in, out)) takes its inputs as a linear does."""
    from tests.compiler.models import tiny_hf

    names = ["c_attn", "c_fc", "c_proj"]
    base = tiny_hf("gpt2").eval()
    torch.manual_seed(1)
    ours = adaptc.compile(base, spec(targets={"kind": "names", "names": names}))
    adaptc.initialize_eva(ours, BATCHES)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(target_modules=names))
    peft.initialize_lora_eva_weights(theirs, BATCHES, show_progress_bar=False)
    assert_same_adapter(ours, theirs)
    assert rewritten(ours_config(ours)) == rewritten(theirs_config(theirs))


def test_a_state_dict_of_the_wrong_shape_is_refused() -> None:
    ours = adaptc.compile(llama(), spec())
    state = adaptc.eva_state_dict(ours, BATCHES)
    q = "model.layers.0.self_attn.q_proj"
    state[q] = state[q][:, :16]
    before = adapter_state_dict(ours, "default")
    with pytest.raises(ValueError) as info:
        adaptc.initialize_eva(ours, state_dict=state)
    assert str(info.value) == (
        f"{q}: the EVA state dict holds a (4, 16) tensor; the layer's A is (rank, 32)"
    )
    after = adapter_state_dict(ours, "default")  # nothing changed
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
