"""adaptc on a CUDA device against real peft, in fp32 and bf16.

The same tiny Llama, the same adapter weights (copied from peft's layers into adaptc's
branches), on the GPU: outputs, adapter gradients, the merged model, the adapter files and
``torch.compile`` (inductor, which generates Triton kernels on CUDA). Skipped where there is
no CUDA device, so CI on CPU skips the module; ``ADAPTC_TEST_DEVICE=cpu`` runs the same
checks on the CPU (a dry run of the script that runs them on a GPU machine).
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings

import peft
import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file

import adaptc
from adaptc.methods.lora.branch import LoraBranch
from tests.compiler.models import hf_inputs, tiny_hf
from tests.compiler.parity import adapter_grads, build_pair, output_tensor, peft_grads

DEVICE = os.environ.get("ADAPTC_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(not DEVICE, reason="needs a CUDA device")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# dtype of the base, autocast on/off, tolerances for outputs and adapter gradients
MODES = {
    "fp32": (torch.float32, False, {"rtol": 1e-5, "atol": 1e-5}, {"rtol": 1e-4, "atol": 1e-5}),
    "bf16": (torch.bfloat16, False, {"rtol": 1.6e-2, "atol": 1e-2}, {"rtol": 1.6e-2, "atol": 1e-2}),
    "fp32-autocast-bf16": (
        torch.float32, True, {"rtol": 1.6e-2, "atol": 1e-2}, {"rtol": 1.6e-2, "atol": 1e-2},
    ),
}  # fmt: skip
OPTIONS = {
    "plain": {"r": 4, "lora_alpha": 8},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True},
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _spec(option: str = "plain") -> dict:
    adapter = {"targets": {"kind": "names", "names": TARGETS}, **OPTIONS[option]}
    return {"version": 1, "task_type": "CAUSAL_LM", "adapters": {"default": adapter}}


def _base(dtype: torch.dtype) -> torch.nn.Module:
    return tiny_hf("llama").to(device=DEVICE, dtype=dtype).eval()


def _inputs() -> dict[str, torch.Tensor]:
    return {k: v.to(DEVICE) for k, v in hf_inputs("llama").items()}


def _autocast(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16)


def _out(model: torch.nn.Module, autocast: bool = False) -> torch.Tensor:
    with torch.no_grad(), _autocast(autocast):
        return output_tensor(model(**_inputs()))


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str) -> None:
    diff = (actual.float() - expected.float()).abs().max().item()
    print(f"{what}: max abs diff {diff:.3g} (scale {expected.float().abs().max().item():.3g})")
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def _on_device(model: torch.nn.Module) -> None:
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    assert devices == {torch.device(DEVICE).type}, devices


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("mode", list(MODES))
def test_forward_and_backward_match_peft(mode, option):
    dtype, autocast, tol, grad_tol = MODES[mode]
    peft_model, compiled = build_pair(_base(dtype), _spec(option))
    _on_device(compiled)
    trainable = [p for p in compiled.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # as peft's
    peft_model.eval()
    compiled.eval()
    inputs = _inputs()
    with _autocast(autocast):
        ours = output_tensor(compiled(**inputs))
        theirs = output_tensor(peft_model(**inputs))
    assert ours.device == theirs.device and ours.dtype == theirs.dtype
    _close(ours, theirs, tol, f"{mode}/{option} logits")
    ours.float().pow(2).mean().backward()
    theirs.float().pow(2).mean().backward()
    grads = adapter_grads(compiled)
    assert len(grads) == len(trainable)
    for key, expected in peft_grads(peft_model, grads).items():
        got = grads[key]
        assert got.dtype == torch.float32 and got.device == expected.device, key
        assert torch.isfinite(got).all() and got.abs().sum() > 0, key
        torch.testing.assert_close(got, expected, **grad_tol, msg=lambda m, k=key: f"{k}: {m}")


def test_compile_shares_the_base_weights_on_the_device():
    base = _base(torch.bfloat16)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    compiled = adaptc.compile(base, _spec())
    ours = {p.data_ptr() for p in compiled.parameters()}
    assert {p.data_ptr() for p in base.parameters()} <= ours  # shared, not copied
    assert not any(p.requires_grad for n, p in compiled.named_parameters() if "lora_" not in n)
    assert all(p.requires_grad for p in base.parameters())  # the input model is untouched
    for key, value in base.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_merged_model_matches_the_unmerged_one(mode):
    dtype, _, tol, _ = MODES[mode]
    _, compiled = build_pair(_base(dtype), _spec())
    compiled.eval()
    unmerged = _out(compiled)
    merged = adaptc.merge(compiled).eval()
    _on_device(merged)
    assert not any(isinstance(m, LoraBranch) for m in merged.modules())
    assert all(p.dtype == dtype for p in merged.parameters())
    # bf16: W + s·ΔW is rounded to bf16 once, so allow twice the parity tolerance
    merged_tol = tol if dtype == torch.float32 else {k: 2 * v for k, v in tol.items()}
    _close(_out(merged), unmerged, merged_tol, f"{mode} merged vs unmerged")
    assert torch.equal(_out(compiled), unmerged)  # the unmerged model is still valid


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_adapter_files_round_trip_on_the_device(mode, tmp_path):
    dtype, _, tol, _ = MODES[mode]
    base = _base(dtype)
    peft_model, compiled = build_pair(base, _spec())
    compiled.eval()
    expected = _out(compiled)
    adaptc.save_adapter(compiled, tmp_path / "adaptc")
    saved = load_file(str(tmp_path / "adaptc" / "adapter_model.safetensors"))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(theirs)
    for key, value in saved.items():
        assert value.device.type == "cpu" and value.dtype == theirs[key].dtype, key
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0)

    loaded = adaptc.load_adapter(base, tmp_path / "adaptc").eval()  # base is on the device
    _on_device(loaded)
    _close(_out(loaded), expected, tol, f"{mode} adaptc reload")  # the same kernels: ~exact
    from_peft = adaptc.load_adapter(base, tmp_path / "peft").eval()
    _close(_out(from_peft), expected, tol, f"{mode} adaptc loads peft's")
    by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adaptc"))
    _close(_out(by_peft.eval()), expected, tol, f"{mode} peft loads adaptc's")


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_torch_compile_trains_like_eager(mode):
    dtype, _, _, grad_tol = MODES[mode]
    _, compiled = build_pair(_base(dtype), _spec())
    eager = copy.deepcopy(compiled)
    compiled.train()
    eager.train()
    inputs = _inputs()
    torch._dynamo.reset()
    try:
        fast = torch.compile(compiled)  # inductor: Triton kernels on CUDA
        loss = fast(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        want = eager(**inputs, labels=inputs["input_ids"]).loss
        want.backward()
        # inductor fuses and reorders: a little looser than eager-vs-eager parity
        loose = {k: 10 * v for k, v in grad_tol.items()}
        _close(loss, want, loose, f"{mode} torch.compile loss")
        grads, expected = adapter_grads(compiled), adapter_grads(eager)
        for key, g in grads.items():
            assert torch.isfinite(g).all() and g.abs().sum() > 0, key
            torch.testing.assert_close(g, expected[key], **loose, msg=lambda m, k=key: f"{k}: {m}")
        opt = torch.optim.AdamW([p for p in compiled.parameters() if p.requires_grad], lr=1e-2)
        losses = [loss.item()]
        for _ in range(3):
            opt.step()
            opt.zero_grad()
            loss = fast(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            losses.append(loss.item())
        assert losses[-1] < losses[0], losses
    finally:
        torch._dynamo.reset()


def test_generate_matches_peft():
    peft_model, compiled = build_pair(_base(torch.float32), _spec())
    ids = _inputs()["input_ids"][:1]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ours = compiled.eval().generate(ids, **kwargs)
        theirs = peft_model.eval().generate(input_ids=ids, **kwargs)
    assert ours.device.type == torch.device(DEVICE).type
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_mixed_batch_matches_each_sample_alone(mode):
    """One adapter per sample (the base included) on the device, both mixed-batch paths:
    a short and a long sequence."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    all_linear = {"kind": "all-linear"}
    spec = {
        "version": 1,
        "adapters": {
            "a": {"r": 8, "init": "random", "targets": all_linear},
            "b": {"r": 4, "lora_alpha": 3, "init": "random", "targets": all_linear},
        },
    }
    model = adaptc.compile(_base(dtype), spec)
    names = ["a", "__base__", "b", "a"]
    tol = {"rtol": 1e-5, "atol": 1e-5} if mode == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    for seq in (1, 24):
        ids = torch.randint(1, 64, (len(names), seq), device=DEVICE)
        with torch.no_grad():
            with adaptc.mixed_batch(model, names):
                mixed = model(input_ids=ids).logits
            for i, name in enumerate(names):
                if name == "__base__":
                    with adaptc.disabled(model):
                        alone = model(input_ids=ids[i : i + 1]).logits
                else:
                    adaptc.set_active(model, [name])
                    alone = model(input_ids=ids[i : i + 1]).logits
                _close(mixed[i : i + 1], alone, tol, f"{mode} mixed seq {seq} sample {i}")
