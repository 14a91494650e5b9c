"""LoRA on parameters (``target_parameters``) of mixture-of-experts models, against peft 0.21.2.

transformers 5 stores experts as fused 3-D parameters (``mlp.experts.gate_up_proj``,
``down_proj``); PEFT's ``lora.ParamWrapper`` adds ``s·B_e·A_e`` to each expert's matrix
where the module reads it. Every MoE family below builds tiny from a config in
transformers 5.24; for each, the same seed gives the same factors as peft, and the same
logits, gradients and counts. On Qwen3-MoE (experts stored (E, out, in)) and GPT-OSS
((E, in, out), ``is_transposed``) the tests go further: files both ways (PEFT's nested
``base_layer`` keys), several adapters, switching, merging, the original untouched, and
the errors.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import adaptc
from adaptc.adapters.keys import adapter_state_dict, adapter_tensors
from adaptc.compiler import CompileError, NoTargetsError
from adaptc.plan.plan import build_plan

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CLOSE: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6}
DIMS = {
    "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64, "head_dim": 8,
}  # fmt: skip
# model_type -> its MoE settings (4 experts, 2 per token), and where its experts live
QWEN = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
LOCAL = {"num_local_experts": 4, "num_experts_per_tok": 2}
# model_type -> its MoE settings (4 experts, 2 per token), and where its experts live
FAMILIES: dict[str, tuple[dict[str, Any], str]] = {
    "qwen3_moe": (QWEN, "mlp"),
    "qwen2_moe": ({**QWEN, "shared_expert_intermediate_size": 16}, "mlp"),
    "mixtral": (LOCAL, "mlp"),
    "gpt_oss": (LOCAL, "mlp"),
    "olmoe": ({"num_experts": 4, "num_experts_per_tok": 2}, "mlp"),
    "granitemoe": (LOCAL, "block_sparse_moe"),
    "phimoe": (LOCAL, "mlp"),
    "llama4_text": ({"num_local_experts": 4, "num_experts_per_tok": 1}, "feed_forward"),
    "minimax": (LOCAL, "mlp"),
    "glm4_moe": (
        {
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "first_k_dense_replace": 0,
        },
        "mlp",
    ),
    "hunyuan_v1_moe": ({"num_experts": 4, "moe_topk": 2}, "mlp"),
}


def tiny_moe(family: str, seed: int = 0) -> nn.Module:
    settings, _ = FAMILIES[family]
    config = AutoConfig.for_model(family, **DIMS, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # routers start at zero in some families: give them a choice
        for name, p in model.named_parameters():
            if "gate" in name and p.dim() == 2 and "proj" not in name:
                p.normal_(0, 0.5)
    return model


def experts(family: str) -> list[str]:
    return [f"{FAMILIES[family][1]}.experts.{p}" for p in ("gate_up_proj", "down_proj")]


def spec(family: str, *, modules: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    adapter: dict[str, Any] = {"r": 2, "lora_alpha": 4, "init": "random", **fields}
    adapter.setdefault("target_parameters", experts(family))
    adapter["targets"] = {"kind": "names", "names": modules} if modules else {"kind": "none"}
    return {"version": 1, "task_type": "CAUSAL_LM", "adapters": {"default": adapter}}


def peft_config(family: str, *, modules: list[str] | None = None, **fields: Any) -> Any:
    fields = {"r": 2, "lora_alpha": 4, "target_parameters": experts(family), **fields}
    return peft.LoraConfig(
        task_type="CAUSAL_LM", init_lora_weights=False, target_modules=modules or [], **fields
    )


IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29], [2, 6, 10, 14, 18, 22, 26, 30]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # type: ignore[no-any-return]


def both(family: str, **kw: Any) -> tuple[nn.Module, nn.Module, Any]:
    """``(base, ours, theirs)``: one base model adapted by each from the same seed."""
    base = tiny_moe(family)
    torch.manual_seed(11)
    ours = adaptc.compile(base, spec(family, **kw))
    torch.manual_seed(11)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(family, **kw))
    return base, ours, theirs


def lora_tensors(model: nn.Module, adapter: str = "default") -> dict[str, torch.Tensor]:
    return adapter_state_dict(model, adapter)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_factors_logits_gradients_and_counts_as_peft(family: str) -> None:
    base, ours, theirs = both(family, modules=["q_proj"])
    mine = lora_tensors(ours)
    peft_state = peft.get_peft_model_state_dict(theirs)
    assert sorted(mine) == sorted(peft_state)
    for key, value in peft_state.items():
        torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)
    reference = logits(base)
    assert not torch.allclose(logits(ours), reference)  # the adapters do something
    torch.testing.assert_close(logits(ours), logits(theirs), **CLOSE)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    for model in (ours, theirs):
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for key, param in adapter_tensors(ours, "default"):
        peft_name = key.removesuffix(".weight") + ".default.weight"
        assert param.grad is not None, key
        torch.testing.assert_close(param.grad, grads[peft_name], rtol=1e-4, atol=1e-6, msg=key)


def test_plan_lists_each_parameter_with_its_experts_rank() -> None:
    model = tiny_moe("qwen3_moe")
    plan = build_plan(model, spec("qwen3_moe", modules=["q_proj"]))
    rows = {t.path: t for t in plan.targets}
    gate_up = rows["model.layers.0.mlp.experts.gate_up_proj"]
    shape = (gate_up.layer_type, gate_up.in_features, gate_up.out_features)
    assert shape == ("nn.Parameter", 32, 32)
    assert gate_up.params == 2 * 4 * 32 + 32 * 2 * 4  # A (r·E, in) and B (out, r·E)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft_config("qwen3_moe", modules=["q_proj"]))
    assert plan.trainable_params == theirs.get_nb_trainable_parameters()[0]
    assert plan.total_params == theirs.get_nb_trainable_parameters()[1]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_files_both_ways_with_peft_nested_keys(family: str, tmp_path: Path) -> None:
    base, ours, theirs = both(family, modules=["q_proj"])
    adaptc.save_adapter(ours, tmp_path / "ours")
    written = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    where = f"base_model.model.model.layers.0.{FAMILIES[family][1]}.experts"
    # PEFT nests one wrapper per parameter, the first registered innermost
    assert f"{where}.base_layer.lora_A.weight" in written  # gate_up_proj
    assert f"{where}.lora_A.weight" in written  # down_proj
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == experts(family)
    assert config["target_modules"] == ["q_proj"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(loaded), logits(ours), **CLOSE)

    theirs.save_pretrained(tmp_path / "theirs")
    back = adaptc.load_adapter(base, tmp_path / "theirs")
    torch.testing.assert_close(logits(back), logits(theirs), **CLOSE)


def test_parameters_only_and_default_targets() -> None:
    _, ours, theirs = both("qwen3_moe")
    torch.testing.assert_close(logits(ours), logits(theirs), **CLOSE)
    # targets omitted: PEFT's default targets for the model type as well (Mixtral: q, v)
    model = tiny_moe("mixtral")
    only = spec("mixtral")
    del only["adapters"]["default"]["targets"]
    paths = [t.path for t in build_plan(model, only).targets]
    assert "model.layers.0.self_attn.q_proj" in paths
    assert "model.layers.0.mlp.experts.gate_up_proj" in paths
    # Qwen3-MoE has no PEFT default targets: the parameters alone
    qwen = spec("qwen3_moe")
    del qwen["adapters"]["default"]["targets"]
    plan = build_plan(tiny_moe("qwen3_moe"), qwen)
    assert {t.layer_type for t in plan.targets} == {"nn.Parameter"}


def test_several_adapters_switching_and_merge() -> None:
    base = tiny_moe("qwen3_moe")
    both_spec = spec("qwen3_moe", modules=["q_proj"])
    second = dict(both_spec["adapters"]["default"], r=3)
    both_spec["adapters"]["other"] = second
    torch.manual_seed(3)
    ours = adaptc.compile(base, both_spec)
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config("qwen3_moe", modules=["q_proj"]))
    theirs.add_adapter("other", peft_config("qwen3_moe", modules=["q_proj"], r=3))
    for key, value in peft.get_peft_model_state_dict(theirs, adapter_name="other").items():
        torch.testing.assert_close(lora_tensors(ours, "other")[key], value, rtol=0, atol=0)
    torch.testing.assert_close(logits(ours), logits(theirs), **CLOSE)
    adaptc.set_active(ours, "other")
    theirs.set_adapter("other")
    torch.testing.assert_close(logits(ours), logits(theirs), **CLOSE)
    adaptc.set_active(ours, ["default", "other"])
    theirs.base_model.set_adapter(["default", "other"])
    torch.testing.assert_close(logits(ours), logits(theirs), **CLOSE)

    unmerged = logits(ours)
    merged = adaptc.merge(ours)
    experts_module = merged.model.layers[0].mlp.experts
    assert type(experts_module).__name__ == "Qwen3MoeExperts"  # the module itself again
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), unmerged, **CLOSE)
    peft_merged = theirs.merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(peft_merged), **CLOSE)
    torch.testing.assert_close(logits(ours), unmerged, rtol=0, atol=0)  # still unmerged


def test_the_original_is_untouched() -> None:
    base = tiny_moe("gpt_oss")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    structure = repr(base)
    ours = adaptc.compile(base, spec("gpt_oss", modules=["q_proj"]))
    ours.train()
    ours(input_ids=IDS, labels=IDS).loss.backward()
    adaptc.merge(ours)
    assert repr(base) == structure
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(not p.requires_grad or p.grad is None for p in base.parameters())
    # the base weights are shared, not copied
    mine = ours.model.layers[0].mlp.experts.base_layer.gate_up_proj
    assert mine.data_ptr() == base.model.layers[0].mlp.experts.gate_up_proj.data_ptr()


def test_bf16_base_matches_peft() -> None:
    base = tiny_moe("qwen3_moe").to(torch.bfloat16)
    torch.manual_seed(5)
    ours = adaptc.compile(base, spec("qwen3_moe"))
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config("qwen3_moe"))
    for key, value in peft.get_peft_model_state_dict(theirs).items():
        torch.testing.assert_close(lora_tensors(ours)[key], value, rtol=0, atol=0)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lora_dropout": 0.1}, "target_parameters cannot be combined with lora_dropout"),
        ({"use_dora": True}, "target_parameters cannot be combined with use_dora"),
        ({"init": "pissa"}, "target_parameters cannot be combined with init 'pissa'"),
    ],
)
def test_options_peft_refuses_are_spec_errors(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(adaptc.SpecError, match=message):
        adaptc.load_spec(spec("qwen3_moe", **fields))


def test_targeting_errors() -> None:
    model = tiny_moe("qwen3_moe")
    close = r"matched no parameter.*did you mean 'mlp\.experts\.gate_up_proj'"
    with pytest.raises(NoTargetsError, match=close):
        adaptc.compile(model, spec("qwen3_moe", target_parameters=["mlp.experts.gate_up"]))
    typo = ["mlp.experts.down_proj", "mlp.experts.up"]
    with pytest.warns(adaptc.AdaptcWarning, match=r"'mlp\.experts\.up' matched no parameter"):
        adaptc.compile(model, spec("qwen3_moe", target_parameters=typo))
    with pytest.raises(NoTargetsError, match="which targets also selects"):
        adaptc.compile(
            model, spec("qwen3_moe", modules=["q_proj"], target_parameters=["q_proj.weight"])
        )
    with pytest.raises(NoTargetsError, match="needs a 2-D or 3-D parameter"):
        adaptc.compile(model, spec("qwen3_moe", target_parameters=["input_layernorm.weight"]))
    with pytest.raises(adaptc.SpecError, match="targets kind 'none' selects nothing"):
        adaptc.load_spec({"version": 1, "adapters": {"a": {"targets": {"kind": "none"}}}})
    _ = CompileError


def test_a_2d_parameter_of_a_linear_layer() -> None:
    kw: dict[str, Any] = {"target_parameters": ["self_attn.v_proj.weight"]}
    _, ours, theirs = both("qwen3_moe", **kw)
    torch.testing.assert_close(logits(ours), logits(theirs), **CLOSE)
    merged = adaptc.merge(ours)
    torch.testing.assert_close(logits(merged), logits(ours), **CLOSE)


def test_peft_config_round_trip() -> None:
    from adaptc.spec import from_peft_config

    config = peft_config("qwen3_moe").to_dict()
    loaded = from_peft_config(config)
    adapter = loaded.adapters["default"]
    assert adapter.target_parameters == tuple(experts("qwen3_moe"))
    assert adapter.targets is not None and adapter.targets.kind == "none"
    back = loaded.to_peft_config("default")
    assert back["target_modules"] == [] and back["target_parameters"] == experts("qwen3_moe")


def test_facade_get_peft_model_and_in_place_merge_equal_peft() -> None:
    import adaptc.peft as facade

    base = tiny_moe("qwen3_moe")
    kw: dict[str, Any] = {"modules": ["q_proj"]}
    torch.manual_seed(4)
    ours = facade.get_peft_model(copy.deepcopy(base), facade.LoraConfig(**_facade_kwargs(**kw)))
    torch.manual_seed(4)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config("qwen3_moe", **kw))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.targeted_parameter_names == theirs.targeted_parameter_names
    assert sorted(ours.targeted_module_names) == sorted(theirs.targeted_module_names)
    torch.testing.assert_close(logits(ours), logits(theirs), **CLOSE)
    unmerged = logits(ours)
    ours.merge_adapter()
    theirs.merge_adapter()
    torch.testing.assert_close(logits(ours), logits(theirs), **CLOSE)
    torch.testing.assert_close(logits(ours), unmerged, **CLOSE)
    ours.unmerge_adapter()
    torch.testing.assert_close(logits(ours), unmerged, rtol=0, atol=0)  # exact: PEFT subtracts
    ours.add_adapter("two", facade.LoraConfig(**_facade_kwargs(**kw)))
    theirs.add_adapter("two", peft_config("qwen3_moe", **kw))
    ours.set_adapter("two")
    theirs.set_adapter("two")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def _facade_kwargs(modules: list[str]) -> dict[str, Any]:
    return {
        "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "init_lora_weights": False,
        "target_modules": modules, "target_parameters": experts("qwen3_moe"),
    }  # fmt: skip


def test_what_a_targeted_parameter_cannot_do_is_refused() -> None:
    model = adaptc.compile(tiny_moe("qwen3_moe"), spec("qwen3_moe"))
    where = "model.layers.0.mlp.experts.gate_up_proj"
    refused = f"{where}: a targeted parameter cannot mix"
    with (
        pytest.raises(adaptc.MixedBatchError, match=refused),
        adaptc.mixed_batch(model, ["default", "__base__"]),
    ):
        model(input_ids=IDS)
    with pytest.raises(adaptc.HotswapError, match=f"{where}: hotswapping adapters of a targeted"):
        adaptc.prepare_hotswap(model, max_rank=8)
    with pytest.raises(CompileError, match=f"{where}: combining adapters of a targeted"):
        adaptc.combine_adapters(model, ["default"], [1.0], "both")
    other = {"version": 1, "adapters": {"x": dict(spec("qwen3_moe")["adapters"]["default"])}}
    other["adapters"]["x"]["target_parameters"] = ["self_attn.v_proj.weight"]
    with pytest.raises(CompileError, match="a parameter the model does not adapt yet"):
        adaptc.add_adapter(model, other)


def test_adaptc_merge_writes_a_checkpoint_transformers_loads(tmp_path: Path) -> None:
    from adaptc.cli import main

    base = tiny_moe("qwen3_moe")
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    ours = adaptc.compile(base, spec("qwen3_moe", modules=["q_proj"]))
    adaptc.save_adapter(ours, tmp_path / "adapter")
    out = tmp_path / "out"
    assert (
        main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), "--out", str(out)]) == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(merged), logits(ours), **CLOSE)


def test_plan_of_a_30b_a3b_moe_on_meta_equals_peft_count() -> None:
    """Qwen3-30B-A3B's shape (128 experts of 768, hidden 2048): two of its 48 layers built
    on the meta device by both libraries give the same counts (the 48-layer plan:
    tests/cli)."""
    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, vocab_size=151936,
    )  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    adapter = {"r": 16, "lora_alpha": 32, "targets": {"kind": "names", "names": ["q_proj"]},
               "target_parameters": experts("qwen3_moe")}  # fmt: skip
    plan = build_plan(model, {"version": 1, "adapters": {"default": adapter}})
    config_peft = peft.LoraConfig(
        r=16, lora_alpha=32, target_modules=["q_proj"], target_parameters=experts("qwen3_moe")
    )
    theirs = peft.get_peft_model(model, config_peft, low_cpu_mem_usage=True)
    assert (plan.trainable_params, plan.total_params) == theirs.get_nb_trainable_parameters()
    gate_up = next(t for t in plan.targets if t.path.endswith("0.mlp.experts.gate_up_proj"))
    assert gate_up.params == 16 * 128 * (2048 + 1536)


def test_an_adapter_added_after_moving_the_model_follows_its_dtype() -> None:
    model = adaptc.compile(tiny_moe("qwen3_moe"), spec("qwen3_moe")).to(torch.float64)
    adaptc.add_adapter(
        model, {"version": 1, "adapters": {"x": spec("qwen3_moe")["adapters"]["default"]}}
    )
    added = lora_tensors(model, "x")
    assert {t.dtype for t in added.values()} == {torch.float64}  # built as the moved base
