"""Trainable tokens (``method: trainable_tokens``, PEFT's ``TrainableTokensConfig``) against
the real ``peft`` 0.21.2, on tiny Llamas with and without tied word embeddings (fp32).

Both sides hold the same rows (PEFT's, drawn at random so that every row counts): the
spec and its PEFT config both ways, the plan's counts (also on the meta device), outputs,
gradients (only the chosen rows train), a few optimiser steps with the tied head in step,
merge, files both ways, the facade's ``TrainableTokensConfig``, the errors, and the
user's model left as it was.
"""

from __future__ import annotations

import copy
import dataclasses
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
from adaptc.compiler import CompileError
from adaptc.methods.trainable_tokens.method import TrainableTokensBranch
from adaptc.methods.trainable_tokens.spec import SPEC as TT_SPEC
from adaptc.methods.trainable_tokens.spec import TrainableTokensAdapter
from adaptc.spec import from_peft_config
from tests.methods.test_ia3_api import assert_same, file_keys, snapshot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXACT: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}
TOKENS = [1, 5, 7, 40]
IDS = torch.tensor([[1, 5, 9, 27, 3, 40, 7, 2], [7, 7, 1, 0, 12, 4, 60, 31]])


def tiny_llama(tie: bool = True, **config: Any) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=tie,
        **config,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def spec(**fields: Any) -> dict[str, Any]:
    adapter = {"method": "trainable_tokens", "token_indices": TOKENS, **fields}
    return {"version": 1, "adapters": {"default": adapter}}


def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits  # type: ignore[no-any-return]


def peft_model(base: nn.Module, **kwargs: Any) -> Any:
    config = peft.TrainableTokensConfig(token_indices=TOKENS, **kwargs)
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def peft_delta(model: Any) -> nn.Parameter:
    return model.base_model.model.model.embed_tokens.trainable_tokens_delta["default"]


def ours_branches(model: nn.Module) -> dict[str, TrainableTokensBranch]:
    return {m.target: m for m in model.modules() if isinstance(m, TrainableTokensBranch)}


def randomize_and_share(theirs: Any, ours: nn.Module) -> None:
    """'Train' PEFT's rows (random values), then give adaptc's the same."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        delta = peft_delta(theirs)
        delta.copy_(torch.randn(delta.shape, generator=gen))
        mine = ours_branches(ours)["model.embed_tokens"].trainable_tokens_delta
        assert mine is not None and mine.shape == delta.shape and mine.dtype == delta.dtype
        mine.copy_(delta)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def pair(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module, Any]:
    base = tiny_llama(tie=request.param)
    ours = adaptc.compile(base, spec())
    theirs = peft_model(base)
    randomize_and_share(theirs, ours)
    return base, ours, theirs


# --- the spec and PEFT's config -----------------------------------------------------------


def test_spec_model_defaults_and_refusals() -> None:
    a = TrainableTokensAdapter.model_validate({"method": "trainable_tokens", "token_indices": [3]})
    assert (a.token_indices, a.targets, a.init) == ((3,), None, "copy")
    assert (a.exclude, a.layers, a.modules_to_save) == (None, None, ())
    for bad, message in [
        ({}, "token_indices: missing required field"),
        ({"token_indices": []}, "token_indices: must have at least 1 item"),
        ({"token_indices": [2, 2]}, "token_indices: token index 2 is listed twice"),
        ({"token_indices": [-1]}, r"token_indices\.0: must be ≥ 0, got -1"),
        ({"token_indices": [1], "r": 8}, "r: unknown field"),
    ]:
        with pytest.raises(adaptc.SpecError, match=message):
            adaptc.load_spec(
                {"version": 1, "adapters": {"x": {"method": "trainable_tokens", **bad}}}
            )


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"init_weights": False}, {"target_modules": ["embed_tokens"]}, {"target_modules": "e.*"}],
)
def test_peft_config_both_ways(kwargs: dict[str, Any]) -> None:
    reference = peft.TrainableTokensConfig(token_indices=TOKENS, **kwargs).to_dict()
    reference["peft_type"] = "TRAINABLE_TOKENS"
    loaded = from_peft_config(reference)
    assert loaded.adapter().method == "trainable_tokens"
    written = loaded.to_peft_config()
    assert list(written) == list(reference)  # PEFT's keys, in its order
    assert written == reference


def test_peft_config_refuses_what_trainable_tokens_does_not_have() -> None:
    cfg = {"peft_type": "TRAINABLE_TOKENS", "token_indices": [1], "modules_to_save": ["lm_head"]}
    with pytest.raises(
        adaptc.SpecError, match="modules_to_save: 'modules_to_save' is not a TrainableTokensConfig"
    ):
        from_peft_config(cfg)
    assert TT_SPEC.peft_type == peft.PeftType.TRAINABLE_TOKENS.value


# --- plan and counts ----------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_plan_counts_match_peft_also_on_the_meta_device(tie: bool) -> None:
    base = tiny_llama(tie=tie)
    theirs = peft_model(base)
    plan = adaptc.build_plan(base, spec())
    assert (plan.trainable_params, plan.total_params) == theirs.get_nb_trainable_parameters()
    paths = [(t.path, t.params, t.settings.tied_to) for t in plan.targets]
    expected = [("model.embed_tokens", len(TOKENS) * 32, None)]
    if tie:  # the tied head reads the embedding's rows: nothing of its own
        expected.append(("lm_head", 0, "model.embed_tokens"))
    assert paths == expected
    assert "tied to model.embed_tokens" in str(plan) or not tie
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(base.config)
    on_meta = adaptc.build_plan(meta, spec())
    assert on_meta.to_dict()["targets"] == plan.to_dict()["targets"]
    assert on_meta.trainable_params == plan.trainable_params


def test_trainable_counts_and_line_match_peft(pair: tuple[nn.Module, nn.Module, Any]) -> None:
    _, ours, theirs = pair
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("trainable_tokens_delta")


# --- outputs, gradients, training ---------------------------------------------------------


def test_outputs_and_gradients_match_peft(pair: tuple[nn.Module, nn.Module, Any]) -> None:
    base, ours, theirs = pair
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(base), atol=1e-3)
    got = logits(ours)
    torch.testing.assert_close(got, expected, **EXACT)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    mine = ours_branches(ours)["model.embed_tokens"].trainable_tokens_delta
    assert mine is not None and mine.grad is not None
    torch.testing.assert_close(mine.grad, peft_delta(theirs).grad, **EXACT)
    # only the chosen rows train: every other parameter is frozen and gets no gradient
    others = [n for n, p in ours.named_parameters() if p.grad is not None and p is not mine]
    assert others == []


def test_rows_of_tokens_not_listed_are_the_base_rows() -> None:
    base = tiny_llama(tie=False)
    ours = adaptc.compile(base, spec(init="random"))
    with torch.no_grad():
        embedded = ours.model.embed_tokens(IDS)
        reference = base.model.embed_tokens(IDS)
    listed = torch.isin(IDS, torch.tensor(TOKENS))
    assert torch.equal(embedded[~listed], reference[~listed])
    assert not torch.equal(embedded[listed], reference[listed])


@pytest.mark.parametrize("tie", [True, False])
def test_training_steps_match_peft_with_the_tied_head_in_step(tie: bool) -> None:
    base = tiny_llama(tie=tie)
    ours = adaptc.compile(base, spec()).train()
    theirs = peft_model(base).train()
    randomize_and_share(theirs, ours)
    branches = ours_branches(ours)
    if tie:  # one tensor: the head reads the very rows the embedding trains
        assert branches["lm_head"].trainable_tokens_delta is branches["model.embed_tokens"].delta
    mine = [p for p in ours.parameters() if p.requires_grad]
    opt_ours = torch.optim.SGD(mine, lr=0.5)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
    torch.testing.assert_close(mine[0], peft_delta(theirs), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_same_seed_same_random_rows_as_peft() -> None:
    base = tiny_llama()
    torch.manual_seed(3)
    ours = adaptc.compile(base, spec(init="random"))
    torch.manual_seed(3)
    theirs = peft_model(base, init_weights=False)
    assert torch.equal(ours_branches(ours)["model.embed_tokens"].delta, peft_delta(theirs))
    copied = adaptc.compile(base, spec())  # init copy: the embedding's own rows, a no-op
    weight = base.model.embed_tokens.weight
    assert torch.equal(ours_branches(copied)["model.embed_tokens"].delta, weight[TOKENS])
    torch.testing.assert_close(logits(copied), logits(base), **EXACT)


def test_an_untied_output_head_as_the_target_matches_peft() -> None:
    base = tiny_llama(tie=False)
    ours = adaptc.compile(base, spec(targets={"kind": "names", "names": ["lm_head"]}))
    theirs = peft_model(base, target_modules=["lm_head"])
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        delta = theirs.base_model.model.lm_head.trainable_tokens_delta["default"]
        delta.copy_(torch.randn(delta.shape, generator=gen))
        ours_branches(ours)["lm_head"].delta.copy_(delta)
    torch.testing.assert_close(logits(ours), logits(theirs), **EXACT)
    torch.testing.assert_close(
        logits(adaptc.merge(ours)), logits(theirs.merge_and_unload()), **EXACT
    )


# --- merge ----------------------------------------------------------------------------------


def test_merge_matches_peft(pair: tuple[nn.Module, nn.Module, Any]) -> None:
    base, ours, theirs = pair
    unmerged = logits(ours)
    merged = adaptc.merge(ours)
    assert type(merged) is type(base)
    assert not any(isinstance(m, TrainableTokensBranch) for m in merged.modules())
    expected = theirs.merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(expected), **EXACT)
    torch.testing.assert_close(logits(merged), unmerged, **EXACT)
    weight = merged.model.embed_tokens.weight
    assert torch.equal(weight, expected.model.embed_tokens.weight)
    tied = base.config.tie_word_embeddings
    assert (merged.lm_head.weight is weight) == tied  # a tied head stays tied, as in PEFT
    assert not torch.equal(weight, base.model.embed_tokens.weight)  # a new tensor …
    assert logits(ours).equal(unmerged)  # … and the unmerged model still works


# --- files ----------------------------------------------------------------------------------


def test_saved_adapter_is_peft_s_and_peft_reads_it(
    pair: tuple[nn.Module, nn.Module, Any], tmp_path: Path
) -> None:
    base, ours, theirs = pair
    adaptc.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(str(tmp_path / "theirs"))
    keys = file_keys(tmp_path / "ours")
    assert keys == file_keys(tmp_path / "theirs")
    expected = ["base_model.model.model.embed_tokens.trainable_tokens_delta"]
    if base.config.tie_word_embeddings:  # PEFT's tied layer shares its dict: saved twice
        expected.insert(0, "base_model.model.lm_head.trainable_tokens_delta")
    assert keys == expected
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    reference = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert config == reference
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(loaded), logits(theirs), **EXACT)


def test_peft_saved_adapter_loads(pair: tuple[nn.Module, nn.Module, Any], tmp_path: Path) -> None:
    base, _, theirs = pair
    theirs.save_pretrained(str(tmp_path))
    loaded = adaptc.load_adapter(base, tmp_path)
    torch.testing.assert_close(logits(loaded), logits(theirs), **EXACT)
    assert adaptc.trainable_parameters(loaded)[0] == 0  # frozen unless asked
    again = adaptc.load_adapter(base, tmp_path, trainable=True)
    assert adaptc.trainable_parameters(again) == theirs.get_nb_trainable_parameters()


# --- the facade -----------------------------------------------------------------------------


def test_facade_config_has_peft_s_fields() -> None:
    mine = [(f.name, f.default) for f in dataclasses.fields(ap.TrainableTokensConfig)]
    theirs = [(f.name, f.default) for f in dataclasses.fields(peft.TrainableTokensConfig)]
    assert mine == theirs
    config = ap.TrainableTokensConfig(token_indices=TOKENS, target_modules=["embed_tokens"])
    assert config.peft_type == ap.PeftType.TRAINABLE_TOKENS
    assert config.target_modules == ["embed_tokens"]  # a list stays a list, as in PEFT
    assert ap.PEFT_TYPE_TO_CONFIG_MAPPING[ap.PeftType.TRAINABLE_TOKENS] is ap.TrainableTokensConfig


def test_facade_get_peft_model_matches_peft(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tiny_llama()
    ours = ap.get_peft_model(base, ap.TrainableTokensConfig(token_indices=TOKENS))
    theirs = peft_model(base)
    randomize_and_share(theirs, ours)
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    line_ours, line_theirs = capsys.readouterr().out.splitlines()
    assert line_ours == line_theirs
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    torch.testing.assert_close(logits(ours), logits(theirs), **EXACT)
    ours.save_pretrained(str(tmp_path))
    read = ap.PeftModel.from_pretrained(base, str(tmp_path))
    assert isinstance(read.peft_config["default"], ap.TrainableTokensConfig)
    torch.testing.assert_close(logits(read), logits(theirs), **EXACT)
    torch.testing.assert_close(
        logits(ours.merge_and_unload()), logits(theirs.merge_and_unload()), **EXACT
    )


# --- errors ---------------------------------------------------------------------------------


def test_errors_say_what_is_wrong() -> None:
    base = tiny_llama()
    with pytest.raises(
        CompileError,
        match=r"^model\.embed_tokens: token index 64 is out of range: the layer has 64 tokens "
        r"\(indices 0 to 63\)$",
    ):
        adaptc.compile(base, spec(token_indices=[3, 64]))
    with pytest.raises(
        ap.NoMatchingPeftModuleError,
        match=r"^targets\.names \[embed_tokenz\] matched no module of LlamaForCausalLM; closest "
        r"names: embed_tokens",
    ):
        ap.get_peft_model(
            base, ap.TrainableTokensConfig(token_indices=[1], target_modules=["embed_tokenz"])
        )
    with pytest.raises(CompileError, match=r"^module 'model\.layers\.0\.mlp' \(LlamaMLP\) is"):
        adaptc.compile(base, spec(targets={"kind": "names", "names": ["mlp"]}))
    with pytest.raises(
        CompileError, match=r"^model\.layers\.0\.self_attn\.q_proj: token index 40 is out of"
    ):  # a linear layer's rows are its outputs (32 here)
        adaptc.compile(base, spec(targets={"kind": "names", "names": ["q_proj"]}))


def test_max_norm_embeddings_are_refused() -> None:
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(
        CompileError, match=r"^emb: trainable tokens on an embedding with max_norm are not"
    ):
        adaptc.compile(model, spec(token_indices=[1], targets={"kind": "names", "names": ["emb"]}))


# --- the user's model -----------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_original_model_is_untouched(tie: bool, tmp_path: Path) -> None:
    base = tiny_llama(tie=tie)
    before = snapshot(base)
    reference = logits(base).detach()
    ours = adaptc.compile(base, spec(init="random")).train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0)
    ours(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    merged = adaptc.merge(ours)
    adaptc.save_adapter(ours, tmp_path)
    assert_same(before, snapshot(base))
    assert torch.equal(logits(base), reference)
    assert (base.lm_head.weight is base.model.embed_tokens.weight) == tie
    # shared, not copied: the compiled model's frozen embedding is the user's storage
    embedding = ours.model.embed_tokens.base_layer.weight
    assert embedding is not base.model.embed_tokens.weight
    assert embedding.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    assert not embedding.requires_grad
    assert merged.model.embed_tokens.weight.data_ptr() != embedding.data_ptr()
