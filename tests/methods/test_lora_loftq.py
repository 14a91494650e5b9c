"""LoftQ against the real ``peft`` 0.21.2: ``init: loftq`` on a float Llama (PEFT's
``init_lora_weights="loftq"`` with ``loftq_config``) and ``adaptc.initialize_loftq`` on a
bitsandbytes 4-bit base (PEFT's ``replace_lora_weights_loftq``).

PEFT's LoftQ computes on ``"cuda"`` (or ``"xpu"``) whatever the weight's device, so on a
machine without a GPU it cannot run as shipped: :func:`peft_on_cpu` runs PEFT's own
functions with that device name replaced by ``"cpu"`` (their code object's constant), so
the reference is PEFT's code, on the CPU. LoftQ is deterministic given the weight: the
factors, the quantized base, the outputs and the files must match PEFT's, and the
approximation ``Q + s·B·A ≈ W`` must be better than ``Q`` alone.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import peft
import peft.tuners.lora.layer as peft_layer
import peft.utils.loftq_utils as peft_loftq
import pytest
import torch
import transformers as tf
from torch import nn

import adaptc
import adaptc.peft as facade
from adaptc.adapters.keys import adapter_state_dict
from adaptc.methods.lora.branch import LoraBranch
from adaptc.spec import SpecError, from_peft_config
from tests.compiler.models import save_llama, tiny_hf

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXACT: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}
TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 7, 3], [4, 8, 15, 16, 23, 42, 0, 11]])


def _on_cpu(function: Any) -> Any:
    """PEFT's ``function`` (a ``torch.no_grad`` wrapper) computing on the CPU."""
    inner = function.__wrapped__
    consts = tuple("cpu" if c == "cuda" else c for c in inner.__code__.co_consts)
    code = inner.__code__.replace(co_consts=consts)
    plain = types.FunctionType(code, inner.__globals__, inner.__name__, inner.__defaults__)
    return torch.no_grad()(plain)


@pytest.fixture
def peft_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    on_cpu = _on_cpu(peft_loftq.loftq_init)
    monkeypatch.setattr(peft_loftq, "loftq_init", on_cpu)
    monkeypatch.setattr(peft_layer, "loftq_init", on_cpu)
    monkeypatch.setattr(peft_loftq, "_loftq_init_new", _on_cpu(peft_loftq._loftq_init_new))


def llama() -> nn.Module:
    """A float Llama whose weights bitsandbytes can quantize in blocks of 64."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    return tf.LlamaForCausalLM(config).eval()


def spec(bits: int = 4, iterations: int = 1, **fields: Any) -> dict[str, Any]:
    adapter = {
        "r": 4,
        "lora_alpha": 4,
        "init": "loftq",
        "targets": {"kind": "names", "names": TARGETS},
    }
    adapter["loftq"] = {"bits": bits, "iterations": iterations}
    return {"version": 1, "adapters": {"default": {**adapter, **fields}}}


def peft_config(bits: int = 4, iterations: int = 1, **fields: Any) -> peft.LoraConfig:
    loftq = peft.LoftQConfig(loftq_bits=bits, loftq_iter=iterations)
    fields = {"r": 4, "lora_alpha": 4, "target_modules": TARGETS, **fields}
    return peft.LoraConfig(init_lora_weights="loftq", loftq_config=loftq, **fields)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(IDS).logits


def layers(model: nn.Module, suffix: str = "") -> dict[str, nn.Module]:
    """``{path: layer}`` of the targets, in PEFT's and in adaptc's models alike."""
    out = {}
    for name, module in model.named_modules():
        name = name.removeprefix("base_model.model.")
        if name.split(".")[-1] in TARGETS:
            out[name] = getattr(module, "base_layer", module)
    return out


def assert_same_adapter(ours: nn.Module, theirs: Any, **tol: float) -> None:
    mine, ref = adapter_state_dict(ours, "default"), peft.get_peft_model_state_dict(theirs)
    assert sorted(mine) == sorted(ref)
    for key, value in ref.items():
        if tol:
            torch.testing.assert_close(mine[key], value, **tol)
        else:
            assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "modules": [(n, id(m), type(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "params": {n: (id(p), p.requires_grad, p.clone()) for n, p in model.named_parameters()},
        "hooks": [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()],
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
    }


def assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before["modules"] == after["modules"]
    assert before["hooks"] == after["hooks"] and before["attrs"] == after["attrs"]
    for name, (pid, grad, value) in before["params"].items():
        pid2, grad2, value2 = after["params"][name]
        assert (pid, grad) == (pid2, grad2) and torch.equal(value, value2), name


# --- the spec and PEFT's config ---------------------------------------------------------


@pytest.mark.parametrize(("bits", "iterations"), [(4, 1), (8, 3)])
def test_peft_config_both_ways(bits: int, iterations: int) -> None:
    expected = peft_config(bits, iterations).to_dict()
    expected = {k: sorted(v) if isinstance(v, set) else v for k, v in expected.items()}
    assert expected["loftq_config"] == {"loftq_bits": bits, "loftq_iter": iterations}
    loaded = from_peft_config(expected)
    assert loaded.adapter().loftq.bits == bits and loaded.adapter().loftq.iterations == iterations
    assert loaded.to_peft_config() == expected
    assert (
        adaptc.load_spec(spec(bits, iterations)).to_peft_config()["loftq_config"]
        == (expected["loftq_config"])
    )
    config = facade.LoraConfig(
        r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq",
        loftq_config=facade.LoftQConfig(loftq_bits=bits, loftq_iter=iterations),
    )  # fmt: skip
    assert config.loftq_config == expected["loftq_config"]  # a dict, as PEFT keeps it
    assert config.to_spec().to_peft_config() == expected


def test_loftq_settings_default_to_peft_s_loftq_config() -> None:
    adapter = spec()["adapters"]["default"]
    del adapter["loftq"]
    cfg = adaptc.load_spec({"version": 1, "adapters": {"default": adapter}}).to_peft_config()
    assert cfg["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}


# --- the float base: init: loftq -------------------------------------------------------


@pytest.mark.parametrize(("bits", "iterations"), [(4, 1), (4, 3), (8, 1), (8, 2)])
def test_factors_base_and_outputs_equal_peft(peft_on_cpu: None, bits: int, iterations: int) -> None:
    base = llama()
    ours = adaptc.compile(base, spec(bits, iterations)).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(bits, iterations)).eval()
    assert_same_adapter(ours, theirs)  # bit for bit
    mine, ref = layers(ours), layers(theirs)
    for path, layer in ref.items():  # the base weight is PEFT's quantized one, Q
        torch.testing.assert_close(mine[path].weight, layer.weight, rtol=0, atol=0)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()


def test_the_factors_are_the_svd_of_the_quantization_error(peft_on_cpu: None) -> None:
    base = llama()
    ours = adaptc.compile(base, spec(4, 1))
    original = layers(base)
    for path, layer in layers(ours).items():
        W, Q = original[path].weight.detach(), layer.weight.detach()
        branch = next(m for m in layer.children() if isinstance(m, LoraBranch))
        A, B = branch.factors()
        # B·A is the best rank-4 approximation of W - Q: its singular values are W - Q's top 4
        torch.testing.assert_close(
            torch.linalg.svdvals(B @ A)[:4], torch.linalg.svdvals(W - Q)[:4], rtol=1e-4, atol=1e-6
        )
        assert not torch.equal(W, Q)  # Q is quantized: on NF4's 16 levels per block
        assert Q.dtype == W.dtype == torch.float32


def test_the_approximation_error_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    base = llama()
    with caplog.at_level(logging.INFO, logger="adaptc.methods.lora.loftq"):
        ours = adaptc.compile(base, spec(4, 2))
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 * len(TARGETS)
    assert logged[0].startswith("model.layers.0.self_attn.q_proj: LoftQ |W - Q| / |W| = ")
    errors = adaptc.loftq_errors(ours, base)
    assert sorted(errors) == sorted(layers(base))
    for path, error in errors.items():
        assert 0.05 < error.quantized / error.weight < 0.2, path  # NF4's error on this weight
        assert error.relative < 0.95, path  # the update removes part of it
        assert str(error) in "\n".join(logged)


def test_a_scaling_other_than_1_is_warned_about() -> None:
    """PEFT factors ``W - Q`` without the scaling: with ``s = 2`` the update overshoots."""
    with pytest.warns(adaptc.AdaptcWarning) as record:
        ours = adaptc.compile(llama(), spec(lora_alpha=8))
    messages = [str(w.message) for w in record]
    assert (
        "model.layers.0.self_attn.q_proj: init 'loftq' factors W - Q as B·A, but the branch "
        "adds s·B·A with s = 2 (lora_alpha / r): set lora_alpha = r for Q + s·B·A to "
        "approximate W (PEFT computes the same factors)"
    ) in messages
    for error in adaptc.loftq_errors(ours, llama()).values():
        assert error.relative == pytest.approx(1.0, abs=1e-4)  # ‖R - 2·R_r‖ = ‖R‖


def test_the_original_model_is_untouched(tmp_path: Path) -> None:
    base = llama()
    before = snapshot(base)
    ours = adaptc.compile(base, spec(4, 2))
    merged = adaptc.merge(ours)
    adaptc.save_adapter(ours, tmp_path)
    assert_same_snapshot(before, snapshot(base))
    for path, layer in layers(ours).items():  # Q is the compiled model's own tensor
        assert layer.weight.data_ptr() != layers(base)[path].weight.data_ptr()
    torch.testing.assert_close(logits(merged), logits(ours), rtol=1e-5, atol=1e-5)


def test_merging_gives_q_plus_the_update() -> None:
    base = llama()
    ours = adaptc.compile(base, spec(4, 1))
    merged = adaptc.merge(ours)
    for path, layer in layers(ours).items():
        A, B = next(m for m in layer.children() if isinstance(m, LoraBranch)).factors()
        expected = layer.weight + B @ A  # s = 1
        torch.testing.assert_close(layers(merged)[path].weight, expected, rtol=0, atol=1e-6)


def test_dora_on_loftq_matches_peft(peft_on_cpu: None) -> None:
    """DoRA's magnitude is initialised from ``Q + s·B·A``, after LoftQ replaced the base."""
    base = llama()
    ours = adaptc.compile(base, spec(4, 1, use_dora=True)).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(4, 1, use_dora=True)).eval()
    assert_same_adapter(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_files_both_ways(peft_on_cpu: None, tmp_path: Path) -> None:
    base = llama()
    ours = adaptc.compile(base, spec(4, 2)).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(4, 2)).eval()
    adaptc.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    for name in ("ours", "theirs"):
        written = json.loads((tmp_path / name / "adapter_config.json").read_text())
        assert written["init_lora_weights"] == "loftq", name
        assert written["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}, name
    # loading runs LoftQ on the float base again, in both (it is deterministic)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(loaded), logits(ours), rtol=1e-5, atol=1e-5)
    back = adaptc.load_adapter(base, tmp_path / "theirs")
    torch.testing.assert_close(logits(back), logits(theirs), rtol=1e-5, atol=1e-5)
    through = facade.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs").eval()
    torch.testing.assert_close(logits(through), logits(theirs), rtol=1e-5, atol=1e-5)


def test_the_facade_equals_peft(peft_on_cpu: None) -> None:
    base = llama()
    kwargs = {"r": 4, "lora_alpha": 4, "target_modules": TARGETS, "init_lora_weights": "loftq"}
    ours = facade.get_peft_model(
        copy.deepcopy(base),
        facade.LoraConfig(**kwargs, loftq_config={"loftq_bits": 4, "loftq_iter": 1}),
    ).eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(4, 1)).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.peft_config["default"].to_dict()["loftq_config"] == {
        "loftq_bits": 4,
        "loftq_iter": 1,
    }


# --- what LoftQ refuses ---------------------------------------------------------------------


def _spec_error(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as info:
        adaptc.load_spec(data)
    return str(info.value)


def test_wrong_bits_and_iterations_are_spec_errors() -> None:
    assert (
        _spec_error(spec(bits=3)) == "adapters.default.loftq.bits: expected 4 or 8, got integer 3"
    )
    assert _spec_error(spec(iterations=0)) == (
        "adapters.default.loftq.iterations: must be > 0, got 0"
    )
    no_init = spec()
    no_init["adapters"]["default"]["init"] = "default"
    assert _spec_error(no_init) == "adapters.default.loftq: loftq needs init 'loftq', not 'default'"


def test_peft_configs_that_peft_refuses_are_refused() -> None:
    config = peft_config().to_dict()
    config["loftq_config"] = {}
    with pytest.raises(SpecError, match="`loftq_config` must be specified when"):
        from_peft_config(config)
    with pytest.raises(ValueError, match="`loftq_config` must be specified when"):
        facade.LoraConfig(init_lora_weights="loftq", target_modules=TARGETS)


def test_without_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    with pytest.raises(adaptc.CompileError) as info:
        adaptc.compile(llama(), spec())
    assert str(info.value) == (
        "model.layers.0.self_attn.q_proj: init 'loftq' needs bitsandbytes, which quantizes the "
        "base weight (pip install bitsandbytes)"
    )


def test_layers_peft_s_loftq_cannot_initialise() -> None:
    gpt2 = {"version": 1, "adapters": {"default": {"init": "loftq", "lora_alpha": 8, "targets": {
        "kind": "names", "names": ["c_attn"]}}}}  # fmt: skip
    with pytest.raises(adaptc.CompileError) as info:
        adaptc.compile(tiny_hf("gpt2"), gpt2)
    assert str(info.value) == (
        "transformer.h.0.attn.c_attn: init 'loftq' is not available on transformers.Conv1D "
        "layers: their weight is stored (in, out), and PEFT's LoftQ factors it as stored, "
        "giving factors of the wrong shapes"
    )
    embedding = spec()
    embedding["adapters"]["default"]["targets"]["names"] = ["embed_tokens"]
    with pytest.raises(adaptc.CompileError) as info:
        adaptc.compile(llama(), embedding)
    assert str(info.value) == (
        "model.embed_tokens: init 'loftq' is not available on nn.Embedding layers (PEFT's "
        "LoftQ fails on them); linear layers only"
    )
    big = spec(r=128)
    with pytest.raises(adaptc.CompileError, match="r=128 is larger than the layer allows"):
        adaptc.compile(llama(), big)


# --- a quantized base: initialize_loftq / replace_lora_weights_loftq ---------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("llama-loftq"))


def load_4bit(path: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    config = tf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tf.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, device_map="cpu", dtype=dtype
        ).eval()


QLORA = {"r": 4, "lora_alpha": 4, "target_modules": TARGETS}
QLORA_SPEC = {"version": 1, "adapters": {"default": {"r": 4, "lora_alpha": 4, "targets": {
    "kind": "names", "names": TARGETS}}}}  # fmt: skip


def test_the_4bit_base_gets_peft_s_factors(peft_on_cpu: None, checkpoint: Path) -> None:
    theirs = peft.get_peft_model(load_4bit(checkpoint), peft.LoraConfig(**QLORA))
    peft.replace_lora_weights_loftq(theirs, model_path=str(checkpoint))
    quantized = load_4bit(checkpoint)
    before = snapshot(quantized)
    ours = adaptc.compile(quantized, QLORA_SPEC)
    errors = adaptc.initialize_loftq(ours, checkpoint)
    assert_same_snapshot(before, snapshot(quantized))
    assert_same_adapter(ours, theirs)  # bit for bit
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    float_model = tf.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    assert sorted(errors) == sorted(layers(float_model))
    for path, error in errors.items():
        assert error.relative < 0.99, path  # rank 4 of 128: a small part of NF4's error
        assert error == adaptc.loftq_errors(ours, float_model)[path]
    # closer to the float model's outputs than the quantized base with a no-op adapter
    plain = logits(adaptc.compile(quantized, QLORA_SPEC))
    target = logits(float_model)
    assert (logits(ours) - target).norm() < (plain - target).norm()


def test_the_facade_and_a_state_dict_give_the_same(peft_on_cpu: None, checkpoint: Path) -> None:
    theirs = peft.get_peft_model(load_4bit(checkpoint), peft.LoraConfig(**QLORA))
    peft.replace_lora_weights_loftq(theirs, model_path=str(checkpoint))
    ours = facade.get_peft_model(load_4bit(checkpoint), facade.LoraConfig(**QLORA))
    facade.replace_lora_weights_loftq(ours, model_path=str(checkpoint))
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    float_model = tf.AutoModelForCausalLM.from_pretrained(checkpoint)
    again = adaptc.compile(load_4bit(checkpoint), QLORA_SPEC)
    adaptc.initialize_loftq(again, float_model.state_dict())
    torch.testing.assert_close(logits(again), logits(theirs), rtol=1e-5, atol=1e-5)


def test_a_callback_can_keep_or_undo_each_layer(peft_on_cpu: None, checkpoint: Path) -> None:
    """PEFT's callback: False rolls the layer's factors back; it gets the module's name."""

    def only_q(model: Any, name: str) -> bool:
        seen.append(name)
        return name.endswith("q_proj")

    seen: list[str] = []
    torch.manual_seed(2)
    theirs = peft.get_peft_model(load_4bit(checkpoint), peft.LoraConfig(**QLORA))
    peft.replace_lora_weights_loftq(theirs, model_path=str(checkpoint), callback=only_q)
    theirs_seen, seen[:] = list(seen), []
    torch.manual_seed(2)
    ours = facade.get_peft_model(load_4bit(checkpoint), facade.LoraConfig(**QLORA))
    errors = facade.replace_lora_weights_loftq(ours, model_path=str(checkpoint), callback=only_q)
    assert seen == theirs_seen == list(layers(theirs))  # each target, in the model's order
    assert sorted(errors) == ["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_init_loftq_on_a_quantized_base_is_refused(checkpoint: Path) -> None:
    quantized = spec()
    with pytest.raises(adaptc.CompileError) as info:
        adaptc.compile(load_4bit(checkpoint), quantized)
    assert str(info.value) == (
        "model.layers.0.self_attn.q_proj: init 'loftq' quantizes a float base weight itself: "
        "compile onto the float model, or initialise the LoRA of a quantized base "
        "(bitsandbytes 4-bit) from the float weights with adaptc.initialize_loftq (PEFT's "
        "replace_lora_weights_loftq)"
    )


def test_initialize_loftq_needs_a_quantized_target(checkpoint: Path) -> None:
    ours = adaptc.compile(tf.AutoModelForCausalLM.from_pretrained(checkpoint), QLORA_SPEC)
    with pytest.raises(ValueError) as info:
        adaptc.initialize_loftq(ours, checkpoint)
    assert str(info.value) == (
        "No bnb LoRA module found on the model: adapter 'default' has no target on a "
        "quantized layer (for a float model, use init: loftq)"
    )
    with pytest.raises(FileNotFoundError, match="ensure that there is a \\(sharded\\) safetensors"):
        adaptc.initialize_loftq(ours, checkpoint / "missing")


def test_a_checkpoint_merge_starts_from_q(tmp_path: Path) -> None:
    """``adaptc merge`` on the float checkpoint: LoftQ's Q is recomputed from each weight it
    reads, and the update added to it, as the compiled model's merge does."""
    from adaptc.io.merge_checkpoint import merge_checkpoint

    base = llama()
    base.save_pretrained(tmp_path / "base")
    ours = adaptc.compile(base, spec(4, 2))
    adaptc.save_adapter(ours, tmp_path / "adapter")

    def build(_: Any) -> nn.Module:
        with torch.device("meta"):
            return tf.AutoModelForCausalLM.from_config(base.config)

    merge_checkpoint(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", build_meta_model=build
    )
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    in_memory = adaptc.merge(ours)
    for path, layer in layers(in_memory).items():
        torch.testing.assert_close(layers(merged)[path].weight, layer.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(merged), logits(ours), rtol=1e-5, atol=1e-5)
