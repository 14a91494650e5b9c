"""Mixed-adapter batches: one adapter per sample, each sample as if run alone."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import adaptc
from adaptc.adapters.mixed import MixedBatchError, adapter_ids, adapter_names, mixed_batch
from tests.compiler.models import ConvNet, tiny_hf
from tests.compiler.parity import share_adapter_weights

ALL_LINEAR = {"kind": "all-linear"}
EMBEDDINGS = {"kind": "regex", "pattern": r".*(embed_tokens|wte|shared|word_embeddings)"}

# close to float32 rounding: the batched path sums in another order than a lone sample
TOL = {"rtol": 1e-5, "atol": 1e-5}


def three_adapters(embedding_targets=EMBEDDINGS):
    return {
        "version": 1,
        "adapters": {
            "a": {"r": 8, "init": "random", "targets": ALL_LINEAR},
            "b": {"r": 4, "lora_alpha": 3, "init": "random", "targets": ALL_LINEAR},
            "c": {"r": 2, "init": "random", "targets": embedding_targets},
        },
    }


def inputs(family, batch, seq, seed=1):
    g = torch.Generator().manual_seed(seed)
    kw = {"input_ids": torch.randint(1, 64, (batch, seq), generator=g)}
    if family == "mt5":
        kw["decoder_input_ids"] = torch.randint(1, 64, (batch, 5), generator=g)
    return kw


def alone(model, name, kw):
    """The model's output for one sample with only ``name`` active (or the base)."""
    if name == "__base__":
        with adaptc.disabled(model):
            return model(**kw).logits
    adaptc.set_active(model, [name])
    return model(**kw).logits


def assert_each_sample_alone(model, names, kw):
    with torch.no_grad():
        with mixed_batch(model, names):
            mixed = model(**kw).logits
        for i, name in enumerate(names):
            one = {k: v[i : i + 1] for k, v in kw.items()}
            torch.testing.assert_close(mixed[i : i + 1], alone(model, name, one), **TOL)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "mt5", "bert"])
@pytest.mark.parametrize("seq", [2, 24])  # few rows per sample (masked matmul), many (bmm)
def test_each_sample_equals_running_it_alone(family, seq):
    spec = three_adapters({"kind": "names", "names": ["query"]} if family == "bert" else EMBEDDINGS)
    model = adaptc.compile(tiny_hf(family).eval(), spec)
    names = ["a", "__base__", "b", "c", "a"]
    assert_each_sample_alone(model, names, inputs(family, len(names), seq))


def test_the_model_is_back_to_its_active_adapters_after_the_block():
    original = tiny_hf("llama").eval()
    model = adaptc.compile(original, three_adapters())
    adaptc.set_active(model, ["b"])
    kw = inputs("llama", 3, 5)
    before_original = {k: v.clone() for k, v in original.state_dict().items()}
    with torch.no_grad():
        before = model(**kw).logits
        code_before = model.model.layers[0].mlp.code
        with mixed_batch(model, ["a", "c", "__base__"]):
            model(**kw)
        after = model(**kw).logits
    assert adaptc.active_adapters(model) == ("b",)
    assert model.model.layers[0].mlp.code == code_before
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(value, before_original[key], rtol=0, atol=0)


def test_ids_tensor_and_names_agree():
    model = adaptc.compile(tiny_hf("llama").eval(), three_adapters())
    assert adapter_names(model) == ("a", "b", "c")
    ids = adapter_ids(model, ["c", "__base__", "a"])
    assert ids.tolist() == [2, -1, 0]
    kw = inputs("llama", 3, 6)
    with torch.no_grad():
        with mixed_batch(model, ids):
            by_id = model(**kw).logits
        with mixed_batch(model, ["c", "__base__", "a"]):
            by_name = model(**kw).logits
    torch.testing.assert_close(by_id, by_name, rtol=0, atol=0)


def test_nested_blocks_replace_the_ids():
    model = adaptc.compile(tiny_hf("llama").eval(), three_adapters())
    kw = inputs("llama", 2, 4)
    with torch.no_grad(), mixed_batch(model, ["a", "b"]):
        outer = model(**kw).logits
        with mixed_batch(model, ["b", "a"]):
            inner = model(**kw).logits
        again = model(**kw).logits
    torch.testing.assert_close(again, outer, rtol=0, atol=0)
    torch.testing.assert_close(
        inner[0], alone(model, "b", {k: v[:1] for k, v in kw.items()})[0], **TOL
    )


def test_opt_fc1_sees_rows_flattened_over_batch_and_sequence():
    """PEFT's mixed batches fail on OPT's fc1 (its input is (batch·seq, hidden)); here each
    row is mapped to its sample, so the batch works and each sample is exact."""
    spec = {
        "version": 1,
        "adapters": {
            "a": {"r": 8, "init": "random", "targets": {"kind": "names", "names": ["fc1"]}},
            "b": {"r": 2, "init": "random", "targets": {"kind": "names", "names": ["fc1"]}},
        },
    }
    base = tiny_hf("opt").eval()
    config = peft.LoraConfig(r=8, target_modules=["fc1"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config, "one").eval()
    theirs.add_adapter("two", peft.LoraConfig(r=2, target_modules=["fc1"]))
    kw = inputs("opt", 3, 6)
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        theirs(**kw, adapter_names=["one", "two", "__base__"])
    model = adaptc.compile(base, spec)
    assert_each_sample_alone(model, ["a", "b", "__base__"], kw)


def test_parity_with_peft_adapter_names():
    base = tiny_hf("llama").eval()
    targets = ["q_proj", "v_proj", "gate_proj"]
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=targets), "one"
    )
    theirs.add_adapter("two", peft.LoraConfig(r=4, lora_alpha=3, target_modules=targets[:2]))
    spec = {
        "version": 1,
        "adapters": {
            "one": {"r": 8, "targets": {"kind": "names", "names": targets}},
            "two": {"r": 4, "lora_alpha": 3, "targets": {"kind": "names", "names": targets[:2]}},
        },
    }
    model = adaptc.compile(base, spec)
    share_adapter_weights(theirs, model)
    theirs.eval()
    names = ["two", "__base__", "one", "two"]
    for seq in (1, 16):
        kw = inputs("llama", len(names), seq)
        with torch.no_grad():
            expected = theirs(**kw, adapter_names=names).logits
            with mixed_batch(model, names):
                got = model(**kw).logits
        torch.testing.assert_close(got, expected, **TOL)


def test_generate_with_beams_matches_each_sample_alone():
    model = adaptc.compile(tiny_hf("llama").eval(), three_adapters())
    ids = inputs("llama", 3, 5)["input_ids"]
    names = ["a", "__base__", "b"]
    settings = {"max_new_tokens": 5, "do_sample": False, "num_beams": 3, "pad_token_id": 0}
    with mixed_batch(model, names):
        out = model.generate(ids, **settings)
    for i, name in enumerate(names):
        if name == "__base__":
            with adaptc.disabled(model):
                ref = model.generate(ids[i : i + 1], **settings)
        else:
            adaptc.set_active(model, [name])
            ref = model.generate(ids[i : i + 1], **settings)
        assert torch.equal(out[i : i + 1], ref)


def test_torch_compile_does_not_recompile_when_ids_change():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = adaptc.compile(tiny_hf("llama").eval(), three_adapters())
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    kw = inputs("llama", 3, 4)
    with torch.no_grad():
        with mixed_batch(model, ["a", "b", "c"]):
            first = compiled(**kw).logits
            torch.testing.assert_close(first, model(**kw).logits, rtol=0, atol=0)
        frames = counter.frame_count
        with mixed_batch(model, ["c", "__base__", "a"]):
            second = compiled(**kw).logits
            torch.testing.assert_close(second, model(**kw).logits, rtol=0, atol=0)
    assert counter.frame_count == frames


def test_training_a_mixed_batch_sends_each_sample_to_its_adapter():
    """The gradient of a mixed batch's summed loss is the sum over samples run alone."""
    model = adaptc.compile(tiny_hf("llama"), three_adapters()).train()
    kw = inputs("llama", 3, 6)
    names = ["a", "b", "a"]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with mixed_batch(model, names):
        model(**kw).logits.sum().backward()
    mixed = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    for i, name in enumerate(names):
        adaptc.set_active(model, [name])
        model(**{k: v[i : i + 1] for k, v in kw.items()}).logits.sum().backward()
    alone_grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    unused = {n for n in mixed if ".lora_c." in n}  # no sample used c: its gradient is zero
    assert unused and all(not mixed[n].any() for n in unused)
    assert set(mixed) - unused == set(alone_grads)
    for n in alone_grads:
        torch.testing.assert_close(mixed[n], alone_grads[n], rtol=1e-4, atol=1e-5)


def test_dropout_is_per_adapter_in_training():
    spec = {
        "version": 1,
        "adapters": {
            "wet": {"r": 4, "lora_dropout": 0.5, "init": "random", "targets": ALL_LINEAR},
            "dry": {"r": 4, "init": "random", "targets": ALL_LINEAR},
        },
    }
    model = adaptc.compile(tiny_hf("llama"), spec).train()
    kw = inputs("llama", 2, 6)
    with mixed_batch(model, ["wet", "dry"]):
        torch.manual_seed(0)
        one = model(**kw).logits
        torch.manual_seed(1)
        two = model(**kw).logits
    assert not torch.allclose(one[0], two[0])  # dropout on the "wet" sample
    torch.testing.assert_close(one[1], two[1], rtol=0, atol=0)  # none on the "dry" one


def test_modules_to_save_run_per_sample():
    spec = {
        "version": 1,
        "task_type": "SEQ_CLS",
        "adapters": {
            "a": {"init": "random", "targets": {"kind": "names", "names": ["query"]}},
            "b": {"init": "random", "r": 2, "targets": {"kind": "names", "names": ["value"]}},
        },
    }
    model = adaptc.compile(tiny_hf("bert").eval(), spec)
    with torch.no_grad():  # make the copies differ from the original head
        for name in ("a", "b"):
            model.classifier.modules_to_save[name].weight.normal_()
    assert_each_sample_alone(model, ["b", "a", "__base__"], inputs("bert", 3, 7))


def test_convolutions_mix_too():
    spec = {
        "version": 1,
        "adapters": {
            "a": {"r": 4, "init": "random", "lora_bias": True, "targets": {"kind": "all-linear"}},
            "b": {
                "r": 2,
                "init": "random",
                "targets": {"kind": "names", "names": ["conv", "head"]},
            },
        },
    }
    torch.manual_seed(0)
    model = adaptc.compile(ConvNet().eval(), spec)
    x = torch.randn(3, 3, 5, 5)
    names = ["b", "a", "__base__"]
    with torch.no_grad():
        with mixed_batch(model, names):
            mixed = model(x)
        for i, name in enumerate(names):
            if name == "__base__":
                with adaptc.disabled(model):
                    ref = model(x[i : i + 1])
            else:
                adaptc.set_active(model, [name])
                ref = model(x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], ref, **TOL)


# --- errors -----------------------------------------------------------------------------


def enter(model, ids):
    with mixed_batch(model, ids):
        pass


def test_unknown_name_is_an_error():
    model = adaptc.compile(tiny_hf("llama"), three_adapters())
    message = r"^sample 1: the model has no adapter 'z' \(has: a, b, c, and '__base__' for"
    with pytest.raises(MixedBatchError, match=message):
        enter(model, ["a", "z"])


def test_ids_out_of_range_is_an_error():
    model = adaptc.compile(tiny_hf("llama"), three_adapters())
    with pytest.raises(MixedBatchError, match=r"ids: values must lie in -1\.\.2 .* got -1\.\.3"):
        enter(model, torch.tensor([0, 3, -1]))
    with pytest.raises(MixedBatchError, match="1-d integer tensor"):
        enter(model, torch.tensor([[0.0]]))


def test_a_batch_that_does_not_split_into_samples_is_an_error():
    model = adaptc.compile(tiny_hf("llama").eval(), three_adapters())
    message = (
        r"^model.embed_tokens: input of shape \(3, 4\) does not split into the batch's 2 "
        r"samples \(the batch must come first\)$"
    )
    with (
        pytest.raises(MixedBatchError, match=message),
        torch.no_grad(),
        mixed_batch(model, ["a", "b"]),
    ):
        model(**inputs("llama", 3, 4))
    assert adaptc.active_adapters(model) == ("a",)  # restored after the error
    assert "mixed" not in model.model.layers[0].mlp.code


def test_dora_cannot_mix():
    spec = {"version": 1, "adapters": {"d": {"use_dora": True, "targets": ALL_LINEAR}}}
    model = adaptc.compile(tiny_hf("llama"), spec)
    with pytest.raises(MixedBatchError, match="uses DoRA, which mixed batches do not support"):
        enter(model, ["d"])


def test_a_merged_model_cannot_mix():
    model = adaptc.compile(tiny_hf("llama"), three_adapters())
    with pytest.raises(
        adaptc.CompileError, match=r"mixed_batch\(\) takes a model returned by adaptc\.compile"
    ):
        enter(adaptc.merge(model), ["a"])


def test_prepare_hotswap_is_refused_inside_a_mixed_block():
    model = adaptc.compile(tiny_hf("llama"), three_adapters())
    with (
        pytest.raises(adaptc.HotswapError, match=r"cannot run inside adaptc\.mixed_batch"),
        mixed_batch(model, ["a"]),
    ):
        adaptc.prepare_hotswap(model, max_rank=8)


def test_hotswapped_weights_reach_a_mixed_batch(tmp_path):
    """The stacked factors are rebuilt when a hotswap writes new weights in place."""
    base = tiny_hf("llama").eval()
    model = adaptc.compile(base, three_adapters())
    other = adaptc.compile(
        base,
        {
            "version": 1,
            "adapters": {"a": {"r": 8, "init": "random", "targets": ALL_LINEAR, "lora_alpha": 5}},
        },
    )
    adaptc.save_adapter(other, tmp_path / "new")
    adaptc.prepare_hotswap(model, max_rank=8)
    kw = inputs("llama", 2, 4)
    with torch.no_grad(), mixed_batch(model, ["a", "b"]):  # one block: the cache is stale
        before = model(**kw).logits
        adaptc.hotswap(model, tmp_path / "new", adapter="a")
        after = model(**kw).logits
    with torch.no_grad():
        expected = other(**{k: v[:1] for k, v in kw.items()}).logits
    assert not torch.allclose(before[:1], after[:1])
    torch.testing.assert_close(after[:1], expected, **TOL)
