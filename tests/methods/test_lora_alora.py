"""Activated LoRA (``alora_invocation_tokens``) against peft 0.21.2 on the same weights:
the adapter applies from the invocation tokens' last occurrence on, in ``forward`` and
through ``generate``'s cache; outputs, gradients, files and refusals as peft's."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import adaptc
import adaptc.peft as ap
from tests.compiler.models import tiny_hf

TOKENS = [7, 8]
CONFIG = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "init_lora_weights": False,
          "target_modules": ["q_proj", "v_proj"], "alora_invocation_tokens": TOKENS}  # fmt: skip
TOL = {"rtol": 1e-5, "atol": 1e-6}
# sample 0: the invocation at positions 3-4; sample 1: twice (the last one counts);
# sample 2: absent (the base model's outputs)
IDS = torch.tensor([[2, 3, 4, 7, 8, 5, 6, 9], [7, 8, 2, 3, 7, 8, 4, 5], [2, 3, 4, 5, 6, 9, 10, 11]])


@pytest.fixture
def pair(tmp_path):
    """(base, peft's model, adaptc's model) with the same trained aLoRA adapter."""
    torch.manual_seed(0)
    base = tiny_hf("llama").eval()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIG)).eval()
    theirs.save_pretrained(tmp_path / "alora")
    mine = ap.PeftModel.from_pretrained(base, tmp_path / "alora").eval()
    return base, theirs, mine


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_forward_applies_from_the_invocation_on(pair):
    base, theirs, mine = pair
    ours, peft_out, plain = logits(mine), logits(theirs), logits(base)
    torch.testing.assert_close(ours, peft_out, **TOL)
    torch.testing.assert_close(ours[0, :3], plain[0, :3], rtol=0, atol=0)  # before: the base
    assert not torch.allclose(ours[0, 3:], plain[0, 3:])
    torch.testing.assert_close(ours[1, :4], plain[1, :4], rtol=0, atol=0)  # the last occurrence
    torch.testing.assert_close(ours[2], plain[2], rtol=0, atol=0)  # absent: the base model


def test_offsets_given_by_the_caller(pair):
    _, theirs, mine = pair
    offsets = [2, None, 8]
    with torch.no_grad():
        ours = mine(input_ids=IDS, alora_offsets=offsets).logits
        peft_out = theirs(input_ids=IDS, alora_offsets=offsets).logits
    torch.testing.assert_close(ours, peft_out, **TOL)


def test_generate_keeps_the_adapter_on_for_new_tokens(pair):
    _, theirs, mine = pair
    prompt = IDS[:2]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ours = mine.generate(input_ids=prompt, **kwargs)
        peft_out = theirs.generate(input_ids=prompt, **kwargs)
    assert torch.equal(ours, peft_out)
    for model in (theirs, mine):
        with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
            model.generate(input_ids=prompt, num_beams=2, **kwargs)


def test_gradients_equal_peft(pair):
    _, theirs, mine = pair
    grads = []
    for model in (theirs, mine):
        model.train()
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        model(input_ids=IDS).logits.pow(2).mean().backward()
        grads.append(sorted((p.grad.norm().item(), p.numel()) for n, p in
                            model.named_parameters() if p.grad is not None))  # fmt: skip
    assert [n for _, n in grads[0]] == [n for _, n in grads[1]]
    for (a, _), (b, _) in zip(grads[0], grads[1], strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def test_files_both_ways(pair, tmp_path):
    base, theirs, mine = pair
    mine.save_pretrained(tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert again.peft_config["default"].alora_invocation_tokens == TOKENS
    torch.testing.assert_close(logits(again), logits(theirs), **TOL)


def test_the_library_api(pair, tmp_path):
    base, theirs, _ = pair
    model = adaptc.load_adapter(base, tmp_path / "alora")
    torch.testing.assert_close(model(input_ids=IDS).logits, logits(base), rtol=0, atol=0)
    assert adaptc.invocation_offsets(IDS, TOKENS) == [5, 4, None]
    with torch.no_grad(), adaptc.activated(model, IDS):
        torch.testing.assert_close(model(input_ids=IDS).logits, logits(theirs), **TOL)
    with torch.no_grad(), adaptc.activated(model, [8, 8, 8]):  # everywhere
        everywhere = model(input_ids=IDS).logits
    with torch.no_grad():
        torch.testing.assert_close(
            everywhere, theirs(input_ids=IDS, alora_offsets=[8, 8, 8]).logits, **TOL
        )


def test_only_inputs_embeds_runs_the_base_model(pair):
    base, theirs, mine = pair
    embeds = base.get_input_embeddings()(IDS)
    outs = []
    for model in (theirs, mine):
        with pytest.warns(UserWarning, match="Cannot calculate aLoRA offsets"), torch.no_grad():
            outs.append(model(inputs_embeds=embeds).logits)
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    torch.testing.assert_close(outs[1], logits(base), rtol=0, atol=0)


def test_alora_cannot_merge(pair):
    _, theirs, mine = pair
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        theirs.merge_and_unload()
    with pytest.raises(ValueError, match=r"aLoRA adapter .* cannot be merged"):
        mine.merge_and_unload()
    with pytest.raises(ValueError, match="cannot be merged"):
        mine.merge_adapter()
    torch.testing.assert_close(logits(mine), logits(theirs), **TOL)  # nothing changed


def test_refusals():
    with pytest.raises(adaptc.SpecError, match="cannot be combined with use_dora"):
        adaptc.load_spec({"version": 1, "adapters": {"a": {"use_dora": True,
                          "alora_invocation_tokens": [1]}}})  # fmt: skip
    with pytest.raises(adaptc.SpecError, match="alora_invocation_tokens"):
        adaptc.load_spec({"version": 1, "adapters": {"a": {"alora_invocation_tokens": []}}})
    spec = {"version": 1, "adapters": {"a": {"alora_invocation_tokens": [1],
            "targets": {"kind": "names", "names": ["embed_tokens"]}}}}  # fmt: skip
    with pytest.raises(adaptc.CompileError, match=r"aLoRA|alora"):
        adaptc.compile(tiny_hf("llama"), spec)


def test_a_plain_adapter_beside_it_mixes(pair, tmp_path):
    _, theirs, mine = pair
    for lib, model in ((peft, theirs), (ap, mine)):
        model.add_adapter("plain", lib.LoraConfig(r=2, init_lora_weights=False,
                          target_modules=["q_proj"]))  # fmt: skip
    torch.manual_seed(1)
    with torch.no_grad():
        for (_, p), (_, q) in zip(
            sorted((n, p) for n, p in theirs.named_parameters() if ".plain." in n),
            sorted((n.replace("lora_plain.", ""), p) for n, p in mine.named_parameters()
                   if "lora_plain" in n), strict=True):  # fmt: skip
            q.copy_(p.copy_(torch.randn_like(p)))
    names = ["plain", "__base__", "plain"]
    with torch.no_grad():
        ours = mine(input_ids=IDS, adapter_names=names).logits
        peft_out = theirs(input_ids=IDS, adapter_names=names).logits
    torch.testing.assert_close(ours, peft_out, **TOL)
