"""QLoRA: LoRA on bitsandbytes' 4-bit layers (a tiny Llama loaded with
``BitsAndBytesConfig(load_in_4bit=True)`` on the CPU) against peft 0.21.2 on the same
quantized base: outputs, LoRA gradients, counts, files both ways, DoRA, the dequantized
merge, the shared weights (compiling adds only the adapter), and bitsandbytes' CPU
repacking hazard.

The hazard: on a CPU with AVX-512-BF16, bitsandbytes repacks a ``Linear4bit`` weight in
place at its first eval-mode forward on an input without grad. :func:`avx512bf16` turns
that path on for a model's layers (bitsandbytes' own flag), so the tests reproduce it on
any CPU; on such a CPU it is on by default.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from torch import nn

import adaptc
import adaptc.peft as ap
from tests.compiler.models import save_llama, tiny_hf

bnb = pytest.importorskip("bitsandbytes")

TOL = {"rtol": 1e-5, "atol": 1e-6}
CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
          "init_lora_weights": False}  # fmt: skip
SPEC = {"version": 1, "adapters": {"default": {"r": 4, "init": "random", "targets": {
    "kind": "names", "names": ["q_proj", "v_proj"]}}}}  # fmt: skip
IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 7, 3], [4, 8, 15, 16, 23, 42, 0, 11]])

# (quant type, double quant, compute dtype, model dtype): the settings users pick
SETTINGS = {
    "nf4-double-fp32": ("nf4", True, torch.float32, torch.float32),
    "fp4-single-fp32": ("fp4", False, torch.float32, torch.float32),
    "nf4-double-bf16-compute": ("nf4", True, torch.bfloat16, torch.float32),
    "nf4-bf16-model": ("nf4", True, torch.bfloat16, torch.bfloat16),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose layers bitsandbytes' CPU kernel could repack (in_features ≥ 64,
    out_features a multiple of 32; scales of several blocks per row)."""
    return save_llama(tmp_path_factory.mktemp("llama4bit"))


def load_4bit(path: Path, setting: str = "nf4-double-fp32") -> nn.Module:
    quant_type, double, compute, dtype = SETTINGS[setting]
    config = tf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=compute,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tf.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=config, device_map="cpu", dtype=dtype
        ).eval()


def avx512bf16(model: nn.Module) -> nn.Module:
    """Turn on bitsandbytes' AVX-512-BF16 repacking for ``model``'s 4-bit layers."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    return model


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(IDS).logits


def lora_grads(model: nn.Module) -> torch.Tensor:
    model.train()
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(IDS).logits.float().square().mean().backward()
    named = sorted(model.named_parameters())
    return torch.cat([p.grad.flatten() for _, p in named if p.grad is not None])


def dequantized(layer: nn.Module) -> torch.Tensor:
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def base_of(layer: nn.Module) -> nn.Module:
    return getattr(layer, "base_layer", layer)


def pair(checkpoint: Path, tmp_path: Path, setting: str, **extra) -> tuple[nn.Module, nn.Module]:
    """(peft's model, adaptc's model) on two loads of one base, with the same adapter."""
    torch.manual_seed(1)
    theirs = peft.get_peft_model(load_4bit(checkpoint, setting), peft.LoraConfig(**CONFIG, **extra))
    theirs.save_pretrained(tmp_path / "adapter")
    mine = ap.PeftModel.from_pretrained(
        load_4bit(checkpoint, setting), tmp_path / "adapter", is_trainable=True
    )
    return theirs, mine


def test_the_4bit_layers_are_their_own_kind(checkpoint):
    layer = load_4bit(checkpoint).model.layers[0].self_attn.q_proj
    assert adaptc.layers.kind_of(layer).name == "bnb.Linear4bit"


@pytest.mark.parametrize("setting", SETTINGS)
def test_outputs_gradients_and_counts_equal_peft(checkpoint, tmp_path, setting):
    theirs, mine = pair(checkpoint, tmp_path, setting)
    out = logits(mine)
    assert out.dtype == SETTINGS[setting][3]
    torch.testing.assert_close(out, logits(theirs), **TOL)
    # the line counts the packed weights as peft does (two 4-bit values per byte)
    assert mine.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    grads = lora_grads(mine)
    assert grads.numel() == 4 * (128 + 128) + 4 * (128 + 64) + 4 * (256 + 128)
    torch.testing.assert_close(grads, lora_grads(theirs), **TOL)


@pytest.mark.parametrize("setting", ["nf4-double-fp32", "nf4-bf16-model"])
def test_dora_equals_peft_and_merges(checkpoint, tmp_path, setting):
    theirs, mine = pair(checkpoint, tmp_path, setting, use_dora=True)
    out = logits(mine)
    torch.testing.assert_close(out, logits(theirs), **TOL)
    torch.testing.assert_close(lora_grads(mine), lora_grads(theirs), **TOL)
    merged = mine.merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    tol = TOL if out.dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}
    torch.testing.assert_close(logits(merged), out, **tol)


def test_files_both_ways(checkpoint, tmp_path):
    theirs, mine = pair(checkpoint, tmp_path, "nf4-double-fp32")
    mine.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(load_4bit(checkpoint), tmp_path / "ours")
    torch.testing.assert_close(logits(again), logits(theirs), **TOL)


def _storages(model: nn.Module) -> dict[int, int]:
    """{storage address: bytes} of every tensor the model holds, quantization state too."""
    tensors = [*model.parameters(), *model.buffers()]
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            nested = getattr(state, "state2", None)
            tensors += [state.absmax, state.code, *([nested.absmax, nested.code] if nested else [])]
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_the_base_is_shared_and_untouched(checkpoint):
    base = load_4bit(checkpoint)
    layer = base.model.layers[0].self_attn.q_proj
    data, absmax = layer.weight.data.clone(), layer.weight.quant_state.absmax.clone()
    model = adaptc.compile(base, SPEC)
    logits(model)
    lora_grads(model)
    assert torch.equal(layer.weight.data, data)
    assert torch.equal(layer.weight.quant_state.absmax, absmax)
    ours = base_of(model.model.layers[0].self_attn.q_proj)
    assert ours.weight.data_ptr() == layer.weight.data_ptr()
    assert ours.weight.quant_state is not layer.weight.quant_state  # its own, same tensors
    assert ours.weight.quant_state.absmax is layer.weight.quant_state.absmax
    # compiling a 4-bit model adds only the adapter: no dequantized weight stays resident
    before, after = _storages(base), _storages(model)
    added = sum(n for ptr, n in after.items() if ptr not in before)
    adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert added == adapter == 4 * (4 * (128 + 128) + 4 * (128 + 64))  # float32 bytes


def test_merge_dequantizes(checkpoint, tmp_path):
    _, mine = pair(checkpoint, tmp_path, "nf4-double-fp32")
    before = logits(mine)
    merged = mine.merge_and_unload()
    layer = merged.model.layers[0].self_attn.q_proj
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
    original = base_of(mine.get_base_model().model.layers[0].self_attn.q_proj)
    branch = next(m for m in original.children() if hasattr(m, "lora_A"))
    expected = dequantized(original) + branch.scaling * branch.lora_B.weight @ branch.lora_A.weight
    torch.testing.assert_close(layer.weight, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(merged), before, **TOL)


def test_what_is_refused(checkpoint):
    spec = {"version": 1, "adapters": {"default": {
        "init": "pissa", "targets": {"kind": "names", "names": ["q_proj"]}}}}  # fmt: skip
    with pytest.raises(adaptc.CompileError, match=r"not available on bnb\.Linear4bit"):
        adaptc.compile(load_4bit(checkpoint), spec)
    model = ap.get_peft_model(load_4bit(checkpoint), ap.LoraConfig(**CONFIG))
    with pytest.raises(ValueError, match="cannot be merged in place"):
        model.merge_adapter()


def test_all_linear_selects_what_peft_selects(checkpoint):
    names = []
    for lib in (peft, ap):
        model = lib.get_peft_model(
            load_4bit(checkpoint), lib.LoraConfig(target_modules="all-linear")
        )
        names.append(sorted(model.targeted_module_names))
    assert names[1] == names[0] and len(names[0]) == 7  # not lm_head


# --- the repacking hazard -------------------------------------------------------------


def test_the_hazard_bitsandbytes_repacks_and_peft_goes_wrong(checkpoint):
    """What adaptc guards against, reproduced: an eval forward repacks the user's layer,
    peft's LoRA gradients change, and bitsandbytes' undo garbles single-quantized weights."""
    base = avx512bf16(load_4bit(checkpoint, "fp4-single-fp32"))
    layer = base.model.layers[0].mlp.down_proj  # in_features 256: 4 scale blocks per row
    weight = dequantized(layer)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(base, peft.LoraConfig(**CONFIG))
    grads = lora_grads(theirs)
    theirs.eval()
    logits(theirs)
    assert layer.weight.quant_state.packing_format_for_cpu  # repacked in place
    wrong = lora_grads(theirs)
    assert (wrong - grads).norm() > 0.1 * grads.norm()
    base.state_dict()  # bitsandbytes undoes the packing here, leaving the scales transposed
    error = (dequantized(layer) - weight).abs()
    assert (error > 0.01 * weight.abs().max()).float().mean() > 0.1


def compile_seeded(base: nn.Module) -> nn.Module:
    torch.manual_seed(3)  # the same adapter weights each time
    return adaptc.compile(base, SPEC)


def test_repacking_the_users_layers_after_compiling_changes_nothing(checkpoint):
    reference = compile_seeded(load_4bit(checkpoint))
    base = avx512bf16(load_4bit(checkpoint))
    model = compile_seeded(base)
    logits(base)  # the user's eval forward: their layers repack
    assert base.model.layers[0].self_attn.q_proj.weight.quant_state.packing_format_for_cpu
    for _ in range(2):  # eval forwards of the compiled model never repack its copies
        torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=0)
        torch.testing.assert_close(lora_grads(model), lora_grads(reference), rtol=0, atol=0)
        model.eval()
    ours = base_of(model.model.layers[0].self_attn.q_proj)
    assert not getattr(ours.weight.quant_state, "packing_format_for_cpu", False)
    embeds = model.get_input_embeddings()(IDS).detach().requires_grad_()
    model(inputs_embeds=embeds).logits.square().mean().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0  # input grads flow
    merged = adaptc.merge(model)
    torch.testing.assert_close(logits(merged), logits(reference), **TOL)


@pytest.mark.parametrize("setting", ["nf4-double-fp32", "fp4-single-fp32", "nf4-bf16-model"])
def test_a_base_repacked_before_compiling_is_unpacked_correctly(checkpoint, setting):
    reference = compile_seeded(load_4bit(checkpoint, setting))
    base = avx512bf16(load_4bit(checkpoint, setting))
    weight = dequantized(load_4bit(checkpoint, setting).model.layers[0].mlp.down_proj)
    logits(base)  # repacked before compiling: its block scales are bfloat16 now
    with pytest.warns(UserWarning, match="repacked 4-bit weights"):
        model = compile_seeded(base)
    ours = base_of(model.model.layers[0].mlp.down_proj)
    # the codes exactly, the scales as bfloat16 kept them (relative error ≤ 2⁻⁸; a bfloat16
    # model's dequantized weight is rounded once more)
    rtol = 2**-8 if weight.dtype == torch.float32 else 2**-7
    torch.testing.assert_close(dequantized(ours), weight, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(logits(model), logits(reference), rtol=0.01, atol=0.01)
    grads, expected = lora_grads(model), lora_grads(reference)
    assert (grads - expected).norm() < 0.01 * expected.norm()
    state = model.state_dict()  # no undo runs on the copies: the state is what they hold
    assert torch.equal(state["model.layers.0.mlp.down_proj.weight"], ours.weight.data)
    merged = adaptc.merge(model)
    tol = TOL if weight.dtype == torch.float32 else {"rtol": 0.02, "atol": 0.02}
    torch.testing.assert_close(logits(merged), logits(model), **tol)


def test_small_layers_run_where_the_repacked_kernel_fails(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path)  # hidden size 16: too small for the kernel
    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = tf.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=config, device_map="cpu"
        ).eval()
    model = adaptc.compile(avx512bf16(base), SPEC)
    assert logits(model).shape == (2, 8, 64)
    with pytest.raises(Exception):  # noqa: B017 - bitsandbytes' own assertion / shape error
        logits(base)


class _Mlp(nn.Module):
    """A custom model whose graph traces whole, with bitsandbytes layers inside."""

    def __init__(self) -> None:
        super().__init__()
        kw = {"bias": True, "compute_dtype": torch.float32, "quant_type": "nf4"}
        self.up = bnb.nn.Linear4bit(64, 128, **kw)
        self.down = bnb.nn.Linear4bit(128, 64, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_quantized_layers_are_leaves_of_a_whole_graph(tmp_path):
    import copy

    torch.manual_seed(0)
    model = _Mlp().to("cpu")  # bitsandbytes quantizes here
    config = {"target_modules": ["up"], "init_lora_weights": False}
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path)
    mine = ap.PeftModel.from_pretrained(model, tmp_path)
    graph = mine.get_base_model()
    assert isinstance(graph, torch.fx.GraphModule)  # traced whole, `down` a leaf in it
    assert "self.down(" in graph.code
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(x), **TOL)
