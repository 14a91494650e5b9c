"""``adaptc.peft`` against the real ``peft``: same arguments, counts, files and outputs."""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from torch import nn

import adaptc
import adaptc.peft as ap
from adaptc.io.load import AdapterLoadError
from tests.compiler.models import DummyModel, hf_inputs, tiny_hf
from tests.compiler.parity import output_tensor
from tests.compiler.test_untouched import assert_same, snapshot

# (family, LoraConfig kwargs): each a PEFT workflow the facade must reproduce
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "opt-causal": ("opt", {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 16}),
    "llama-all-linear-rslora": (
        "llama",
        {"task_type": "CAUSAL_LM", "target_modules": "all-linear", "use_rslora": True},
    ),
    "gpt2-default-targets": ("gpt2", {"task_type": "CAUSAL_LM", "lora_alpha": 32}),
    "mt5-seq2seq": ("mt5", {"task_type": "SEQ_2_SEQ_LM", "r": 8, "lora_alpha": 32}),
    "bert-seq-cls": ("bert", {"task_type": "SEQ_CLS", "target_modules": ["query", "value"]}),
    "opt-dora-patterns": (
        "opt",
        {
            "target_modules": ["q_proj", "v_proj", "fc1"],
            "use_dora": True,
            "rank_pattern": {"fc1": 2},
            "alpha_pattern": {"v_proj": 4},
        },
    ),
    "opt-bias-save": (
        "opt",
        {"target_modules": ["q_proj"], "bias": "lora_only", "modules_to_save": ["lm_head"]},
    ),
}


def randomize(model: nn.Module, seed: int = 0) -> None:
    """'Train' the adapter: random values for every trainable tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def out(model: nn.Module, family: str) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(**hf_inputs(family)))


@pytest.fixture
def adapted(request) -> tuple[nn.Module, ap.PeftModel, str]:
    family, kwargs = CASES[request.param]
    base = tiny_hf(family).eval()
    model = ap.get_peft_model(base, ap.LoraConfig(**kwargs))
    randomize(model)
    return base, model.eval(), family


# --- LoraConfig ------------------------------------------------------------------------------


def _defaults(cls: type) -> dict[str, Any]:
    """Each dataclass field's default (a factory's product; nested dataclasses as dicts)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def test_lora_config_has_peft_argument_names_order_and_defaults():
    ours = inspect.signature(ap.LoraConfig).parameters
    theirs = inspect.signature(peft.LoraConfig).parameters
    assert list(ours) == list(theirs)
    assert _defaults(ap.LoraConfig) == _defaults(peft.LoraConfig)


def test_every_plain_lora_argument_is_supported():
    plain = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules"}
    plain |= {"fan_in_fan_out", "bias", "use_rslora", "modules_to_save", "init_lora_weights"}
    plain |= {"layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern"}
    plain |= {"use_dora", "lora_bias", "task_type", "inference_mode"}
    plain |= {"base_model_name_or_path", "revision"}
    assert plain <= ap.config.SUPPORTED_ARGUMENTS


def _non_default(field: dataclasses.Field[Any]) -> Any:
    if field.name == "runtime_config":
        return ap.LoraRuntimeConfig(ephemeral_gpu_offload=True)
    default = field.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default * 2
    if isinstance(default, str):
        return default + ".other"
    return {"something": 1} if field.name.endswith("config") else [1]


UNSUPPORTED = [
    f for f in dataclasses.fields(ap.LoraConfig) if f.name not in ap.config.SUPPORTED_ARGUMENTS
]


@pytest.mark.parametrize("field", UNSUPPORTED, ids=[f.name for f in UNSUPPORTED])
def test_unsupported_arguments_are_refused_by_name(field):
    with pytest.raises(NotImplementedError, match=f"{field.name} is not supported by adaptc"):
        ap.LoraConfig(**{field.name: _non_default(field)})
    with pytest.raises(ValueError):  # NotSupportedError is both
        ap.LoraConfig(**{field.name: _non_default(field)})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r: must be > 0"),
        ({"lora_dropout": 1.5}, "lora_dropout"),
        ({"init_lora_weights": "corda"}, "init_lora_weights='corda' is not supported by adaptc"),
        ({"layers_pattern": "layers"}, "layers_pattern needs layers_to_transform"),
        ({"bias": "some"}, "bias"),
        ({"task_type": "CAUSAL"}, "task_type"),
        ({"use_dora": True, "lora_bias": True}, "lora_bias cannot be combined with use_dora"),
    ],
)
def test_invalid_values_give_adaptc_one_line_errors_with_peft_keys(kwargs, message):
    with pytest.raises(adaptc.SpecError, match=message) as info:
        ap.LoraConfig(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"task_type": ap.TaskType.CAUSAL_LM, "r": 16, "target_modules": ["q_proj", "v_proj"]},
        {
            "target_modules": r".*\.q_proj",
            "exclude_modules": ["x"],
            "init_lora_weights": "gaussian",
        },
        {"layers_to_transform": [0, 1], "layers_pattern": "layers", "modules_to_save": ["head"]},
    ],
)
def test_to_dict_equals_peft(kwargs):
    theirs = {**kwargs, "task_type": kwargs["task_type"].value} if "task_type" in kwargs else kwargs
    assert ap.LoraConfig(**kwargs).to_dict() == peft.LoraConfig(**theirs).to_dict()


def test_config_files_round_trip_with_peft(tmp_path):
    ours = ap.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], use_rslora=True)
    ours.save_pretrained(tmp_path)
    assert peft.LoraConfig.from_pretrained(tmp_path).to_dict() == ours.to_dict()
    peft.LoraConfig(r=2, target_modules=["fc1"]).save_pretrained(tmp_path / "p")
    assert ap.PeftConfig.from_pretrained(tmp_path / "p").to_dict()["target_modules"] == {"fc1"}
    assert ap.get_peft_config({"peft_type": "LORA", "r": 2}).r == 2
    spec = adaptc.load_spec(ap.LoraConfig(task_type=ap.TaskType.CAUSAL_LM, r=4))
    assert (spec.task_type, spec.adapter().r) == ("CAUSAL_LM", 4)


# --- get_peft_model / inject_adapter_in_model -------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_get_peft_model_counts_equal_peft_and_input_is_untouched(case, capsys):
    family, kwargs = CASES[case]
    base = tiny_hf(family)
    config = ap.LoraConfig(**kwargs)
    before, config_before = snapshot(base), copy.deepcopy(config)
    model = ap.get_peft_model(base, config)
    assert_same(before, snapshot(base))
    assert config == config_before  # the caller's config is not filled in either
    assert model.get_base_model() is not base
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    assert model.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    model.print_trainable_parameters()
    reference.print_trainable_parameters()
    mine, theirs = capsys.readouterr().out.splitlines()
    assert mine == theirs
    assert type(model).__name__ == type(reference).__name__


def test_inference_mode_freezes_the_adapter():
    model = ap.get_peft_model(tiny_hf("opt"), ap.LoraConfig(inference_mode=True))
    assert model.get_nb_trainable_parameters()[0] == 0


def test_inject_adapter_in_model_returns_a_new_plain_model():
    base = DummyModel()
    before = snapshot(base)
    model = ap.inject_adapter_in_model(ap.LoraConfig(target_modules=["linear"], r=4), base)
    assert not isinstance(model, ap.PeftModel) and model is not base
    assert_same(before, snapshot(base))
    assert adaptc.trainable_parameters(model)[0] == 4 * (10 + 10)


# --- files: real peft reads what adaptc.peft writes, and the other way round ------------------


@pytest.mark.parametrize("adapted", list(CASES), indirect=True)
def test_save_pretrained_loads_in_real_peft_with_identical_outputs(adapted, tmp_path):
    base, model, family = adapted
    model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(out(model, family), out(reference, family), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out(model, family), out(base, family), atol=1e-4)


@pytest.mark.parametrize("adapted", ["opt-causal", "bert-seq-cls"], indirect=True)
def test_from_pretrained_reads_its_own_files(adapted, tmp_path):
    base, model, family = adapted
    model.save_pretrained(tmp_path)
    before = snapshot(base)
    loaded = ap.PeftModel.from_pretrained(base, tmp_path)
    assert_same(before, snapshot(base))
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.get_nb_trainable_parameters()[0] == 0
    assert loaded.peft_config["default"].inference_mode
    torch.testing.assert_close(out(loaded, family), out(model, family), rtol=0, atol=0)
    trainable = ap.PeftModel.from_pretrained(base, tmp_path, "mine", is_trainable=True)
    assert trainable.active_adapter == "mine"
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
    torch.testing.assert_close(out(trainable.eval(), family), out(model, family), rtol=0, atol=0)


def test_base_model_name_is_saved_and_auto_peft_model_reloads_it(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = ap.get_peft_model(base, ap.LoraConfig(task_type="CAUSAL_LM")).eval()
    randomize(model)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")
    loaded = ap.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    assert isinstance(loaded, ap.PeftModelForCausalLM)
    torch.testing.assert_close(out(loaded, "llama"), out(model, "llama"), rtol=0, atol=0)


def test_peft_adapter_on_embeddings_loads_without_touching_the_base(tmp_path):
    base = tiny_hf("opt").eval()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["embed_tokens", "q_proj"])
    )
    randomize(theirs)
    with torch.no_grad():  # PEFT saves the embedding weights with the adapter
        theirs.base_model.model.model.decoder.embed_tokens.base_layer.weight.mul_(1.5)
    theirs.save_pretrained(tmp_path)
    before = snapshot(base)
    loaded = ap.PeftModel.from_pretrained(base, tmp_path)
    assert_same(before, snapshot(base))
    torch.testing.assert_close(out(loaded, "opt"), out(theirs.eval(), "opt"), rtol=1e-6, atol=1e-6)


# --- running ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adapted", ["opt-causal", "bert-seq-cls", "opt-bias-save"], indirect=True)
def test_merge_and_unload_is_a_new_plain_model_with_equal_outputs(adapted):
    base, model, family = adapted
    expected = out(model, family)
    merged = model.merge_and_unload()
    assert type(merged) is type(base)
    assert merged.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(out(merged, family), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out(model, family), expected, rtol=0, atol=0)  # still valid
    again = ap.get_peft_model(merged, ap.LoraConfig())  # the model type's default targets
    assert again.get_nb_trainable_parameters()[0] > 0  # a merged model can be adapted again
    unloaded = model.unload()
    assert unloaded.state_dict().keys() == base.state_dict().keys()


@pytest.mark.parametrize("adapted", ["opt-causal", "mt5-seq2seq", "bert-seq-cls"], indirect=True)
def test_disable_adapter_gives_the_base_outputs(adapted):
    base, model, family = adapted
    with model.disable_adapter():
        torch.testing.assert_close(out(model, family), out(base, family), rtol=0, atol=0)
    assert not torch.allclose(out(model, family), out(base, family), atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_generate_equals_peft_generate(family, tmp_path):
    base = tiny_hf(family).eval()
    model = ap.get_peft_model(base, ap.LoraConfig(task_type="CAUSAL_LM", r=4)).eval()
    randomize(model, seed=3)
    model.save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = hf_inputs(family)["input_ids"][:1]
    mine = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    theirs = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(mine, theirs) and mine.shape == (1, ids.shape[1] + 8)
    positional = model(ids).logits  # forward with positional input_ids, as PEFT's task models
    torch.testing.assert_close(positional, reference(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_style_forward_with_labels_gives_a_loss_and_gradients(checkpointing):
    base = tiny_hf("opt")
    if checkpointing:
        base.gradient_checkpointing_enable()
    before = snapshot(base)
    model = ap.get_peft_model(base, ap.LoraConfig(task_type="CAUSAL_LM")).train()
    assert "labels" in inspect.signature(model.forward).parameters  # Trainer keeps the column
    ids = hf_inputs("opt")["input_ids"]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    base.train(before["training"])
    assert_same(before, snapshot(base))  # the input-gradient hook went on the new model only


# --- several adapters ----------------------------------------------------------------------


def test_load_set_and_delete_adapters_as_peft(tmp_path):
    base = tiny_hf("opt").eval()
    for i, targets in enumerate((["q_proj"], ["v_proj", "fc2"])):
        one = ap.get_peft_model(base, ap.LoraConfig(target_modules=targets, r=2 + i))
        randomize(one, seed=i)
        one.save_pretrained(tmp_path / str(i))
    mine = ap.PeftModel.from_pretrained(base, tmp_path / "0")
    mine.load_adapter(tmp_path / "1", adapter_name="other")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "0")
    theirs.load_adapter(tmp_path / "1", adapter_name="other")
    assert mine.active_adapter == "default" and set(mine.peft_config) == {"default", "other"}
    torch.testing.assert_close(out(mine, "opt"), out(theirs, "opt"), rtol=1e-6, atol=1e-6)
    mine.set_adapter("other")
    theirs.set_adapter("other")
    torch.testing.assert_close(out(mine, "opt"), out(theirs, "opt"), rtol=1e-6, atol=1e-6)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()

    mine.save_pretrained(tmp_path / "only-other", selected_adapters=["other"])
    with pytest.raises(AdapterLoadError, match="holds no adapter at its top"):  # peft: no config
        ap.PeftModel.from_pretrained(base, tmp_path / "only-other", adapter_name="other")
    # peft's layout: an adapter other than "default" is in the sub-directory of its name
    again = ap.PeftModel.from_pretrained(base, tmp_path / "only-other" / "other", "other")
    torch.testing.assert_close(out(again, "opt"), out(mine, "opt"), rtol=0, atol=0)

    mine.delete_adapter("default")
    assert list(mine.peft_config) == ["other"] and mine.active_adapter == "other"
    torch.testing.assert_close(out(mine, "opt"), out(theirs, "opt"), rtol=1e-6, atol=1e-6)


def test_add_adapter_keeps_the_trained_one():
    model = ap.get_peft_model(tiny_hf("opt").eval(), ap.LoraConfig(r=2)).eval()
    randomize(model)
    expected = out(model, "opt")
    model.add_adapter("second", ap.LoraConfig(r=4, target_modules=["fc1"]))
    torch.testing.assert_close(out(model, "opt"), expected, rtol=0, atol=0)
    assert json.loads(json.dumps(model.peft_config["second"].to_dict(), default=list))["r"] == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_adapters_added_after_moving_to_the_gpu_follow_the_model(tmp_path):
    base = tiny_hf("opt").eval()
    model = ap.get_peft_model(base, ap.LoraConfig(r=2)).eval().to("cuda")
    model.add_adapter("second", ap.LoraConfig(r=4, target_modules=["fc1"]))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {p.device.type for p in base.parameters()} == {"cpu"}
    inputs = {k: v.cuda() for k, v in hf_inputs("opt").items()}
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs).logits.cpu(), out(base, "opt"), atol=1e-4, rtol=1e-4
        )


# --- what adaptc does not do is refused by name ------------------------------------------------


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda m, d: ap.get_peft_model(m, ap.LoraConfig(), mixed=True), "mixed"),
        (lambda m, d: ap.inject_adapter_in_model(ap.LoraConfig(), m, state_dict={}), "state_dict"),
        (lambda m, d: ap.PeftModel.from_pretrained(m, d, key_mapping={"a": "b"}), "key_mapping"),
        (lambda m, d: ap.PeftModel.from_pretrained(m, d, ephemeral_gpu_offload=True), "ephemeral"),
        (lambda m, d: ap.PeftModel.from_pretrained(m, d, weird=1), "weird"),
        (lambda m, d: _peft(m).save_pretrained(d, save_embedding_layers=True), "save_embedding"),
    ],
)
def test_unsupported_method_arguments_are_refused_by_name(call, argument, tmp_path):
    base = tiny_hf("opt")
    _peft(base).save_pretrained(tmp_path / "saved")
    with pytest.raises(NotImplementedError, match=f"{argument}.* not supported by adaptc"):
        call(base, tmp_path / "saved")


def _peft(model: nn.Module) -> ap.PeftModel:
    return ap.get_peft_model(model, ap.LoraConfig(task_type="CAUSAL_LM"))


def test_the_package_does_not_import_peft():
    for file in Path(ap.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "peft" for a in node.names), file.name
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "peft", file.name


def test_delete_adapter_keeps_the_other_adapters_parameters():
    model = ap.get_peft_model(tiny_hf("opt"), ap.LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("other", ap.LoraConfig(target_modules=["v_proj"]))
    kept = {n: p for n, p in model.named_parameters() if "lora_default" in n}
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]
    assert not any("lora_other" in n for n, _ in model.named_parameters())
    after = {n: p for n, p in model.named_parameters() if "lora_default" in n}
    assert kept.keys() == after.keys() and all(kept[n] is after[n] for n in kept)  # optimizer-safe


@pytest.mark.parametrize("lib", [peft, ap], ids=["peft", "adaptc.peft"])
def test_disabled_adapter_layers_do_not_train_and_enabling_restores_them(lib):
    torch.manual_seed(0)
    model = lib.get_peft_model(
        nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), lib.LoraConfig(target_modules=["0"])
    )

    def trainable() -> set[bool]:
        return {p.requires_grad for name, p in model.named_parameters() if "lora_" in name}

    assert trainable() == {True}
    model.base_model.disable_adapter_layers()
    assert trainable() == {False}
    model.base_model.enable_adapter_layers()
    assert trainable() == {True}


@pytest.mark.parametrize("lib", [peft, ap], ids=["peft", "adaptc.peft"])
def test_a_json_that_is_not_a_peft_config_is_refused(lib, tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"foo": 1}', encoding="utf-8")
    with pytest.raises(TypeError, match=r"missing required keys: \{'peft_type'\}"):
        lib.LoraConfig.from_pretrained(str(tmp_path))
