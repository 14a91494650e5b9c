"""LoRA's ``trainable_token_indices`` and weight tying (``ensure_weight_tying``) against the
real ``peft`` 0.21.2, on tiny Llamas with and without tied word embeddings (fp32).

What PEFT does, case by case (each asserted below), and what adaptc does:

- ``trainable_token_indices`` beside LoRA targets: the rows train as PEFT's
  ``TrainableTokensWrapper`` (file keys ``….token_adapter.trainable_tokens_delta``); a
  head tied to the input embedding reads its rows (and is not saved), unless the mapping
  gives it other indices. Same outputs, gradients, counts, files and merge.
- LoRA on a tied embedding without ``ensure_weight_tying``: the head keeps the base
  weight; PEFT's merge writes into the weight both share, so the merged head changes too
  (the merged model is not the unmerged one). adaptc merges the same way.
- ``ensure_weight_tying``: the head gets a LoRA whose factors are views of the
  embedding's. PEFT's merge adds that update twice into the shared weight; adaptc adds it
  once (its merged model equals the unmerged one): the one deliberate difference.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers
from peft import get_peft_model_state_dict as peft_state
from torch import nn

import adaptc
import adaptc.peft as ap
from adaptc.compiler import AdaptcWarning, CompileError
from adaptc.io.merge_checkpoint import merge_checkpoint
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.embedding import EmbeddingBranch
from adaptc.methods.trainable_tokens.method import TrainableTokensBranch
from adaptc.spec import from_peft_config
from tests.methods.test_ia3_api import assert_same, file_keys, snapshot
from tests.methods.test_trainable_tokens import IDS, logits, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXACT: dict[str, Any] = {"rtol": 1e-6, "atol": 1e-6}
MERGED: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}
# a tied head's logits of the trained tokens are their own product (PEFT multiplies the
# whole weight with the rows in it): the same to float32 rounding, summed up in gradients
GRADS: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}


def pair(tie: bool, seed: int = 3, **kwargs: Any) -> tuple[nn.Module, nn.Module, Any]:
    """(base, adaptc's, PEFT's) for ``LoraConfig(**kwargs)``, the same seed on both sides
    (so that both hold the same weights, which the first test proves)."""
    base = tiny_llama(tie=tie)
    torch.manual_seed(seed)
    ours = ap.get_peft_model(base, ap.LoraConfig(**kwargs))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    return base, ours, theirs.eval()


def randomize(ours: nn.Module, theirs: Any) -> None:
    """'Train' PEFT's adapter (random values), and give adaptc's the same through PEFT's
    state dict (tied factors are written twice: the same values)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    ap.set_peft_model_state_dict(ours, peft_state(theirs))


def peft_trainable(theirs: Any) -> dict[str, nn.Parameter]:
    return {n: p for n, p in theirs.named_parameters() if p.requires_grad}


TOKENS = [1, 5, 7]
CASES = {
    "list": {"target_modules": ["q_proj"], "trainable_token_indices": TOKENS},
    "mapping": {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [2, 9]}},
    "head-same": {
        "target_modules": ["q_proj", "v_proj"],
        "trainable_token_indices": {"embed_tokens": TOKENS, "lm_head": TOKENS},
    },
    "head-other": {
        "target_modules": ["q_proj"],
        "trainable_token_indices": {"embed_tokens": TOKENS, "lm_head": [2, 40]},
    },
    "lora-embedding": {"target_modules": ["embed_tokens", "q_proj"]},
    "lora-head": {"target_modules": ["lm_head", "q_proj"]},
    "tying": {"target_modules": ["embed_tokens", "q_proj"], "ensure_weight_tying": True},
    "tying-head": {"target_modules": ["lm_head"], "ensure_weight_tying": True},
    "tying-regex": {"target_modules": r"embed_tokens|.*\.q_proj", "ensure_weight_tying": True},
    # PEFT ties only when the regex matches a bare embedding name: not here (a warning)
    "tying-regex-not": {
        "target_modules": r".*\.(q_proj|embed_tokens)",
        "ensure_weight_tying": True,
    },
    "tying-tokens": {
        "target_modules": ["q_proj"],
        "trainable_token_indices": {"embed_tokens": TOKENS, "lm_head": TOKENS},
        "ensure_weight_tying": True,
    },
}
DOUBLED = ("tying", "tying-head", "tying-regex")  # PEFT's merge adds the tied LoRA twice
PARAMS = [pytest.param(tie, name, id=f"{name}-{'tied' if tie else 'untied'}")
          for name in CASES for tie in (True, False)]  # fmt: skip


@pytest.mark.parametrize(("tie", "case"), PARAMS)
def test_same_weights_counts_and_structure_as_peft(tie: bool, case: str) -> None:
    _, ours, theirs = pair(tie, **CASES[case])
    mine, reference = ap.get_peft_model_state_dict(ours), peft_state(theirs)
    assert sorted(mine) == sorted(reference)
    for key, value in reference.items():
        assert torch.equal(mine[key], value), key  # the same seed draws the same weights
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize(("tie", "case"), PARAMS)
def test_outputs_gradients_and_merge_match_peft(tie: bool, case: str) -> None:
    base, ours, theirs = pair(tie, init_lora_weights=False, **CASES[case])
    randomize(ours, theirs)
    expected = logits(theirs)
    got = logits(ours)
    torch.testing.assert_close(got, expected, **EXACT)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    grads = {n: p.grad for n, p in peft_trainable(theirs).items()}
    mine = _by_peft_name(ours)
    assert sorted(mine) == sorted(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(mine[name].grad, grad, **GRADS, msg=name)
    frozen = [n for n, p in ours.named_parameters() if not p.requires_grad and p.grad is not None]
    assert frozen == []
    with torch.no_grad():
        unmerged = logits(ours)
        merged = logits(ours.merge_and_unload())
        peft_merged = logits(theirs.merge_and_unload())
    if case in DOUBLED and tie:  # PEFT adds the tied update twice (see the module docstring)
        torch.testing.assert_close(merged, unmerged, **MERGED)
        assert not torch.allclose(peft_merged, expected, atol=1e-2)
    else:
        torch.testing.assert_close(merged, peft_merged, **MERGED)
    changes_the_head = ("lora-embedding", "lora-head", "tying-regex-not", "head-other")
    if case in changes_the_head and tie:  # PEFT's merge changes the tied layer too
        assert not torch.allclose(merged, unmerged, atol=1e-2)
    else:
        torch.testing.assert_close(merged, unmerged, **MERGED)
    del base


def _by_peft_name(ours: nn.Module) -> dict[str, nn.Parameter]:
    """adaptc's trainable parameters under PEFT's parameter names."""
    out = {}
    for name, p in ours.named_parameters():
        if not p.requires_grad:
            continue
        if ".trainable_tokens_default." in name:
            name = name.replace(".base_layer.trainable_tokens_default.", ".token_adapter.")
            name += ".default"
        else:
            name = name.replace(".base_layer.lora_default.", ".")
            for part in ("lora_A", "lora_B"):
                name = name.replace(f".{part}.weight", f".{part}.default.weight")
            for part in ("lora_embedding_A", "lora_embedding_B"):
                name = name.replace(f".{part}", f".{part}.default")
        out[name] = p
    return out


# --- files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("tie", "case"), PARAMS)
def test_files_both_ways(tie: bool, case: str, tmp_path: Path) -> None:
    base, ours, theirs = pair(tie, init_lora_weights=False, **CASES[case])
    randomize(ours, theirs)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "theirs")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("trainable_token_indices", "ensure_weight_tying"):
        assert config[key] == CASES[case].get(key, peft.LoraConfig().to_dict()[key]), key
    read_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(logits(read_by_peft.eval()), logits(theirs), **EXACT)
    read_by_us = adaptc.load_adapter(base, tmp_path / "theirs")
    torch.testing.assert_close(logits(read_by_us), logits(theirs), **EXACT)


def test_saved_keys_of_trainable_tokens() -> None:
    _, ours, _ = pair(True, **CASES["head-other"])
    keys = sorted(ap.get_peft_model_state_dict(ours))
    assert keys == [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    ]
    _, tied, _ = pair(True, **CASES["head-same"])  # the tied head reads the embedding's rows
    assert not any(
        k.startswith("base_model.model.lm_head") for k in ap.get_peft_model_state_dict(tied)
    )


def test_spec_and_peft_config_both_ways() -> None:
    for case in ("mapping", "list", "tying-tokens"):
        reference = peft.LoraConfig(**CASES[case]).to_dict()
        reference = {k: sorted(v) if isinstance(v, set) else getattr(v, "value", v)
                     for k, v in reference.items()}  # fmt: skip
        written = from_peft_config(reference).to_peft_config()
        for key in ("trainable_token_indices", "ensure_weight_tying", "target_modules"):
            assert written[key] == reference[key], (case, key)


# --- tying in detail ------------------------------------------------------------------------


def test_tied_lora_head_views_the_embedding_factors() -> None:
    _, ours, theirs = pair(True, **CASES["tying"])
    embedding = next(m for m in ours.modules() if isinstance(m, EmbeddingBranch))
    head = next(m for m in ours.modules() if isinstance(m, LoraBranch) and m.target == "lm_head")
    assert head.tied_to == "model.embed_tokens"
    A, B = head.lora_A.weight, head.lora_B.weight
    assert A.data_ptr() == embedding.lora_embedding_B.data_ptr() and torch.equal(
        A, embedding.lora_embedding_B.T
    )
    assert B.data_ptr() == embedding.lora_embedding_A.data_ptr()
    assert not embedding.lora_embedding_A.any()  # PEFT's init: A = 0 (a no-op still)
    ours.train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        ours(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    assert torch.equal(head.lora_A.weight, embedding.lora_embedding_B.T)  # still in step
    assert torch.equal(head.lora_B.weight, embedding.lora_embedding_A.T)
    del theirs


def test_peft_merges_the_tied_update_twice_and_adaptc_once() -> None:
    base, ours, theirs = pair(True, init_lora_weights=False, **CASES["tying"])
    randomize(ours, theirs)
    W0 = base.model.embed_tokens.weight.detach().clone()
    delta = theirs.base_model.model.model.embed_tokens.get_delta_weight("default").detach()
    mine = ours.merge_and_unload()
    reference = theirs.merge_and_unload()
    for merged in (mine, reference):
        assert merged.lm_head.weight is merged.model.embed_tokens.weight  # one weight
    torch.testing.assert_close(mine.model.embed_tokens.weight, W0 + delta, **MERGED)
    torch.testing.assert_close(reference.model.embed_tokens.weight, W0 + 2 * delta, **MERGED)


def test_lora_on_a_tied_embedding_merges_into_the_head_as_peft_and_says_so() -> None:
    base, ours, theirs = pair(True, init_lora_weights=False, **CASES["lora-embedding"])
    randomize(ours, theirs)
    with pytest.warns(
        AdaptcWarning, match=r"^merging into model\.embed_tokens also changes lm_head"
    ):
        merged = adaptc.merge(ours.base_model.model)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings
    reference = theirs.merge_and_unload()
    assert torch.equal(merged.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(base.lm_head.weight, base.model.embed_tokens.weight)  # the user's: as was


def test_modules_to_save_on_a_tied_embedding_unties_the_merged_model_as_peft() -> None:
    kwargs = {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}
    base, ours, theirs = pair(True, **kwargs)
    with pytest.warns(AdaptcWarning, match="no longer tied after merging"):
        merged = adaptc.merge(ours.base_model.model)
    reference = theirs.merge_and_unload()
    assert merged.config.tie_word_embeddings is False is reference.config.tie_word_embeddings
    assert base.config.tie_word_embeddings  # the user's config is not the merged model's


def test_plan_warnings_for_tied_layers() -> None:
    base = tiny_llama(True)
    lora = {"targets": {"kind": "names", "names": ["embed_tokens"]}}
    plan = adaptc.build_plan(base, {"version": 1, "adapters": {"default": lora}})
    assert any("ties lm_head to its input embedding" in w for w in plan.warnings)
    tied = {**lora, "ensure_weight_tying": True}
    plan = adaptc.build_plan(base, {"version": 1, "adapters": {"default": tied}})
    assert plan.warnings == ()
    assert [(t.path, t.settings.tied_to) for t in plan.targets] == [
        ("model.embed_tokens", None),
        ("lm_head", "model.embed_tokens"),
    ]
    untied = adaptc.build_plan(tiny_llama(False), {"version": 1, "adapters": {"default": tied}})
    assert untied.warnings == (
        "ensure_weight_tying is set, but no layer of the model is tied to its input embedding",
    )
    assert [t.path for t in untied.targets] == ["model.embed_tokens"]


def test_plan_counts_on_the_meta_device() -> None:
    base = tiny_llama(True)
    for case in ("head-other", "tying", "tying-tokens"):
        data = from_peft_config(peft.LoraConfig(**CASES[case]).to_dict() | {"peft_type": "LORA"})
        plan = adaptc.build_plan(base, data)
        with torch.device("meta"):
            meta = type(base)(base.config)
        on_meta = adaptc.build_plan(meta, data)
        _, _, theirs = pair(True, **CASES[case])
        assert (plan.trainable_params, plan.total_params) == theirs.get_nb_trainable_parameters()
        assert on_meta.to_dict() == plan.to_dict(), case


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"target_modules": ["q_proj"], "trainable_token_indices": [1, 64]},
            CompileError,
            r"^model\.embed_tokens: token index 64 is out of range: the layer has 64 tokens "
            r"\(indices 0 to 63\)$",
        ),
        (
            {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokenz": [1]}},
            CompileError,
            r"^trainable_token_indices: no module of the model ends with 'embed_tokenz' \(PEFT "
            r"matches a plain suffix of the path\); did you mean 'embed_tokens'\?$",
        ),
        (
            {"target_modules": ["embed_tokens"], "trainable_token_indices": [1]},
            CompileError,
            r"^model\.embed_tokens: trainable_token_indices cannot be applied to a LoRA target "
            r"\(as in PEFT\): give it either LoRA or trainable tokens$",
        ),
        (
            {"target_modules": ["q_proj"], "trainable_token_indices": {"layers": [1]}},
            CompileError,
            r"^model\.layers \(ModuleList\) is selected by trainable_token_indices entry "
            r"'layers', but trainable tokens need a layer of type nn\.Embedding, nn\.Linear$",
        ),
        (
            {
                "target_modules": ["q_proj"],
                "modules_to_save": ["model.embed_tokens"],
                "trainable_token_indices": [1],
            },
            CompileError,
            r"^'model\.embed_tokens' is both in modules_to_save and trainable_token_indices",
        ),
        (
            {
                "target_modules": ["q_proj"],
                "modules_to_save": ["embed_tokens"],
                "trainable_token_indices": {"embed_tokens": [1]},
            },
            adaptc.SpecError,
            r"^trainable_token_indices: 'embed_tokens' is both in modules_to_save and "
            r"trainable_token_indices: train the embedding in full or some of its rows, not "
            r"both \(as in PEFT\)$",
        ),
        (
            {"target_modules": [], "trainable_token_indices": [1]},
            adaptc.SpecError,
            r"^trainable_token_indices: trainable_token_indices needs LoRA targets \(PEFT refuses "
            r"a LoRA without target modules\); to train token rows alone, use method "
            r"'trainable_tokens' \(PEFT TrainableTokensConfig\)$",
        ),
        (
            {
                "target_modules": ["q_proj"],
                "ensure_weight_tying": True,
                "trainable_token_indices": {"embed_tokens": [1], "lm_head": [2]},
            },
            CompileError,
            r"^ensure_weight_tying: the tied layers get different trainable_token_indices "
            r"\(embed_tokens: \[1\], lm_head: \[2\]\); give them the same indices, or unset "
            r"ensure_weight_tying$",
        ),
        (
            {
                "target_modules": ["embed_tokens"],
                "ensure_weight_tying": True,
                "rank_pattern": {"lm_head": 4},
            },
            CompileError,
            r"^lm_head: ensure_weight_tying ties it to model\.embed_tokens, but their ranks "
            r"differ \(4 and 8, from rank_pattern\): tied adapters share their factors$",
        ),
        (
            {
                "target_modules": ["q_proj"],
                "modules_to_save": ["embed_tokens"],
                "ensure_weight_tying": True,
            },
            CompileError,
            r"^ensure_weight_tying with an embedding layer in modules_to_save is not supported "
            r"by adaptc",
        ),
    ],
)
def test_errors_say_what_is_wrong(kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ap.get_peft_model(tiny_llama(True), ap.LoraConfig(**kwargs))


def test_peft_refuses_the_same() -> None:
    """The refusals above that PEFT shares (its messages differ)."""
    for kwargs in (
        {"target_modules": ["embed_tokens"], "trainable_token_indices": [1]},
        {"target_modules": [], "trainable_token_indices": [1]},
        {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokenz": [1]}},
        {
            "target_modules": ["q_proj"],
            "ensure_weight_tying": True,
            "trainable_token_indices": {"embed_tokens": [1], "lm_head": [2]},
        },
    ):
        with pytest.raises((TypeError, ValueError)):
            peft.get_peft_model(tiny_llama(True), peft.LoraConfig(**kwargs))


# --- the user's model -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["tying", "head-same", "lora-embedding"])
def test_original_model_is_untouched(case: str, tmp_path: Path) -> None:
    base = tiny_llama(True)
    before = snapshot(base)
    reference = logits(base).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ap.get_peft_model(base, ap.LoraConfig(init_lora_weights=False, **CASES[case]))
        ours.train()
        opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1.0)
        ours(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        ours.merge_and_unload()
        ours.merge_adapter()
        ours.unmerge_adapter()
        ours.save_pretrained(str(tmp_path))
    assert_same(before, snapshot(base))
    assert torch.equal(logits(base), reference)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    rows = [m for m in ours.modules() if isinstance(m, TrainableTokensBranch)]
    assert all(r.delta.data_ptr() != base.model.embed_tokens.weight.data_ptr() for r in rows)


def test_tied_layers_with_rows_of_their_own_say_so_at_merge() -> None:
    _, ours, theirs = pair(True, **CASES["head-other"])
    with pytest.warns(AdaptcWarning, match=r"^model\.embed_tokens and lm_head share their weight"):
        merged = adaptc.merge(ours.base_model.model)
    reference = theirs.merge_and_unload()  # PEFT writes both into the one weight too
    assert torch.equal(merged.model.embed_tokens.weight, reference.model.embed_tokens.weight)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["c_attn"], "trainable_token_indices": [1, 5]},
        {"target_modules": ["lm_head"], "ensure_weight_tying": True},  # the input: wte
        {"target_modules": ["wte"], "ensure_weight_tying": True},  # not a name PEFT ties
    ],
    ids=["tokens", "tying", "tying-not"],
)
def test_gpt2_with_its_tied_head_matches_peft(kwargs: dict[str, Any], tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    base = transformers.GPT2LMHeadModel(config).eval()
    assert base.lm_head.weight is base.transformer.wte.weight
    torch.manual_seed(1)
    ours = ap.get_peft_model(base, ap.LoraConfig(init_lora_weights=False, **kwargs))
    torch.manual_seed(1)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs)
    )
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    randomize(ours, theirs.eval())
    torch.testing.assert_close(logits(ours), logits(theirs), **EXACT)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    assert file_keys(tmp_path / "ours") == file_keys(tmp_path / "theirs")
    read = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(logits(read), logits(theirs), **EXACT)


@pytest.mark.parametrize(
    ("config", "like_peft"),
    [
        (peft.TrainableTokensConfig(token_indices=TOKENS, init_weights=False), True),
        (peft.LoraConfig(init_lora_weights=False, **CASES["list"]), True),
        (peft.LoraConfig(init_lora_weights=False, **CASES["lora-embedding"]), True),
        (peft.LoraConfig(init_lora_weights=False, **CASES["tying"]), False),  # PEFT: twice
    ],
    ids=["trainable-tokens", "lora-tokens", "lora-embedding", "tying"],
)
def test_merged_checkpoint_of_a_tied_model(config: Any, like_peft: bool, tmp_path: Path) -> None:
    """``adaptc merge`` (the streamed checkpoint merge) of PEFT's files: a tied head is
    stored once and follows its embedding, as ``adaptc.merge`` (and PEFT, but for the
    doubled update of ``ensure_weight_tying``) has it."""
    base = tiny_llama(True)
    base.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(6)))
    theirs.save_pretrained(str(tmp_path / "adapter"))
    in_memory = adaptc.merge(adaptc.load_adapter(base, tmp_path / "adapter"))

    def build(spec: Any) -> nn.Module:
        with torch.device("meta"):
            return type(base)(base.config)

    merge_checkpoint(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", build_meta_model=build
    )
    merged = type(base).from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(merged), logits(in_memory), **MERGED)
    reference = logits(theirs.merge_and_unload())
    assert torch.allclose(logits(merged), reference, **MERGED) == like_peft
