"""Prompt tuning (``method: prompt_tuning``, PEFT's ``PromptTuningConfig``) against the real
``peft`` 0.21.2, on a tiny Llama (fp32).

Both sides hold the same virtual tokens (PEFT's, drawn at random): the spec and its PEFT
config both ways, counts (also on the meta device), outputs, loss and gradients with an
attention mask and labels, greedy generation with a cache, files both ways, the facade's
``PromptTuningConfig``, the inits (same seed, same tokens), the refusals (merge, seq2seq)
and the user's model left as it was.
"""

from __future__ import annotations

import copy
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
from adaptc.methods.prompt_tuning.facade import PromptTuningInit
from adaptc.methods.prompt_tuning.method import PromptBranch
from adaptc.spec import from_peft_config
from tests.methods.test_ia3_api import assert_same, file_keys, snapshot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

EXACT: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-6}
N = 4
IDS = torch.tensor([[1, 5, 9, 27, 3, 40], [7, 7, 1, 0, 12, 4]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def spec(**fields: Any) -> dict[str, Any]:
    adapter = {"method": "prompt_tuning", "num_virtual_tokens": N, **fields}
    return {"version": 1, "task_type": "CAUSAL_LM", "adapters": {"default": adapter}}


def peft_model(base: nn.Module, **kwargs: Any) -> Any:
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **kwargs)
    return peft.get_peft_model(copy.deepcopy(base), config).eval()


def branch(model: nn.Module) -> PromptBranch:
    (found,) = [m for m in model.modules() if isinstance(m, PromptBranch)]
    return found


def peft_prompts(model: Any) -> nn.Parameter:
    return model.prompt_encoder["default"].embedding.weight  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module, Any]:
    base = tiny_llama()
    ours = adaptc.compile(base, spec())
    theirs = peft_model(base)
    with torch.no_grad():
        peft_prompts(theirs).normal_(generator=torch.Generator().manual_seed(1))
        branch(ours).embedding.weight.copy_(peft_prompts(theirs))
    return base, ours, theirs


# --- the spec and PEFT's config -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt_tuning_init": "SAMPLE_VOCAB", "token_dim": 32, "num_transformer_submodules": 1},
        {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "hi",
            "tokenizer_name_or_path": "t",
        },
    ],
)
def test_peft_config_both_ways(kwargs: dict[str, Any]) -> None:
    reference = peft.PromptTuningConfig(num_virtual_tokens=N, **kwargs).to_dict()
    reference.update(num_attention_heads=4, num_layers=2)  # as PEFT saves them
    loaded = from_peft_config(reference)
    assert loaded.adapter().method == "prompt_tuning"
    written = loaded.to_peft_config()
    assert list(written) == list(reference)
    assert written == {k: getattr(v, "value", v) for k, v in reference.items()}


def test_spec_and_config_refusals() -> None:
    for fields, message in [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens: must be > 0"),
        ({"init": "text", "init_text": "x"}, "tokenizer: init 'text' needs a tokenizer"),
        ({"init": "text", "tokenizer": "t"}, "init_text: init 'text' needs init_text"),
        ({"r": 8}, "r: unknown field"),
    ]:
        with pytest.raises(adaptc.SpecError, match=message):
            adaptc.load_spec(spec(**fields))
    cfg = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "modules_to_save": ["lm_head"]}
    with pytest.raises(adaptc.SpecError, match="modules_to_save is not supported by adaptc"):
        from_peft_config(cfg)
    base = tiny_llama()
    with pytest.raises(CompileError, match="token_dim 16 differs from the input embedding's"):
        adaptc.compile(base, spec(token_dim=16))
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=50, d_model=16, d_ff=32, d_kv=4, num_layers=1, num_heads=2)
    )
    with pytest.raises(CompileError, match=r"encoder-decoder models .* not supported by adaptc"):
        adaptc.compile(t5, spec())


# --- counts, outputs, gradients, generation -------------------------------------------------


def test_counts_match_peft_also_on_the_meta_device(pair: tuple[nn.Module, nn.Module, Any]) -> None:
    base, ours, theirs = pair
    assert adaptc.trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    plan = adaptc.build_plan(base, spec())
    assert (plan.trainable_params, plan.total_params) == theirs.get_nb_trainable_parameters()
    assert [(t.path, t.params) for t in plan.targets] == [("model.embed_tokens", N * 32)]
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(base.config)
    assert adaptc.build_plan(meta, spec()).trainable_params == N * 32
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == ["model.embed_tokens.base_layer.prompt_encoder_default.embedding.weight"]


def test_outputs_loss_and_gradients_match_peft(pair: tuple[nn.Module, nn.Module, Any]) -> None:
    base, ours, theirs = pair
    got = ours(IDS, MASK, labels=IDS)  # positional input_ids / attention_mask too
    expected = theirs(input_ids=IDS, attention_mask=MASK, labels=IDS)
    assert got.logits.shape == (2, N + IDS.shape[1], 100)
    torch.testing.assert_close(got.logits, expected.logits, **EXACT)
    torch.testing.assert_close(got.loss, expected.loss, **EXACT)
    plain = base(input_ids=IDS, attention_mask=MASK).logits
    assert not torch.allclose(got.logits[:, N:], plain, atol=1e-3)
    got.loss.backward()
    expected.loss.backward()
    mine = branch(ours).embedding.weight
    assert mine.grad is not None and mine.grad.abs().sum() > 0
    torch.testing.assert_close(mine.grad, peft_prompts(theirs).grad, **EXACT)
    assert [n for n, p in ours.named_parameters() if p.grad is not None and p is not mine] == []
    mine.grad = peft_prompts(theirs).grad = None
    with adaptc.disabled(ours), torch.no_grad():  # no virtual tokens while disabled
        torch.testing.assert_close(ours(input_ids=IDS, attention_mask=MASK).logits, plain)


def test_greedy_generation_matches_peft(pair: tuple[nn.Module, nn.Module, Any]) -> None:
    base, ours, theirs = pair
    kwargs: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        got = ours.generate(input_ids=IDS, attention_mask=MASK, **kwargs)
        expected = theirs.generate(input_ids=IDS, attention_mask=MASK, **kwargs)
        plain = base.generate(input_ids=IDS, attention_mask=MASK, **kwargs)
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain)


# --- files, facade, inits -------------------------------------------------------------------


def test_files_both_ways(pair: tuple[nn.Module, nn.Module, Any], tmp_path: Path) -> None:
    base, ours, theirs = pair
    with torch.no_grad():
        expected = theirs(input_ids=IDS, attention_mask=MASK).logits
        adaptc.save_adapter(ours, tmp_path / "ours")
        assert file_keys(tmp_path / "ours") == ["prompt_embeddings"]
        read = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
        assert isinstance(read, peft.PeftModelForCausalLM)
        torch.testing.assert_close(read(input_ids=IDS, attention_mask=MASK).logits, expected)
        theirs.save_pretrained(tmp_path / "peft")
        loaded = adaptc.load_adapter(base, tmp_path / "peft")
        torch.testing.assert_close(loaded(input_ids=IDS, attention_mask=MASK).logits, expected)


def test_facade_config_through_get_peft_model() -> None:
    base = tiny_llama()
    before = snapshot(base)
    config = ap.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prompt_tuning_init=PromptTuningInit.RANDOM
    )
    model = ap.get_peft_model(base, config)
    reference = peft_model(base)
    assert model.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    assert model(input_ids=IDS).logits.shape == (2, N + IDS.shape[1], 100)
    assert_same(before, snapshot(base))
    assert not base._forward_pre_hooks and base(input_ids=IDS).logits.shape[1] == IDS.shape[1]


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_same_seed_same_virtual_tokens_as_peft(init: str) -> None:
    base = tiny_llama()
    torch.manual_seed(3)
    ours = adaptc.compile(base, spec(init=init.lower()))
    torch.manual_seed(3)
    theirs = peft_model(base, prompt_tuning_init=init)
    assert torch.equal(branch(ours).embedding.weight, peft_prompts(theirs))


def test_text_init_matches_peft(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "classify", "the", "review", "as", "good", "or", "bad"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path)
    base = tiny_llama()
    text = "classify the review"  # 3 tokens, repeated to 4 (and cut)
    ours = adaptc.compile(base, spec(init="text", init_text=text, tokenizer=str(tmp_path)))
    theirs = peft_model(
        base,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path),
    )
    weight = branch(ours).embedding.weight
    assert torch.equal(weight, peft_prompts(theirs))
    assert torch.equal(weight, base.model.embed_tokens.weight[[1, 2, 3, 1]])


def test_merge_is_refused_naming_the_method(pair: tuple[nn.Module, nn.Module, Any]) -> None:
    _, ours, _ = pair
    with pytest.raises(ValueError, match="prompt tuning cannot be merged"):
        adaptc.merge(ours)


def test_with_a_lora_adapter_both_active_and_switched() -> None:
    """Prompt tuning beside LoRA on one base: both active = the LoRA model run on the
    prompted embeddings; LoRA alone = no virtual tokens (PeftMixedModel has no prompt
    tuning, so the reference is adaptc's LoRA alone, fed PEFT's prompted inputs)."""
    base = tiny_llama()
    lora = {
        "method": "lora",
        "r": 2,
        "init": "random",
        "targets": {"kind": "names", "names": ["q_proj"]},
    }
    both = spec()
    both["adapters"]["lo"] = lora
    model = adaptc.compile(base, both)
    only = adaptc.compile(base, {"version": 1, "adapters": {"lo": lora}})
    with torch.no_grad():
        only.load_state_dict(
            {k: v for k, v in model.state_dict().items() if "lora_" in k}, strict=False
        )
        prompts = branch(model).prompts(2, torch.float32)
        embeds = torch.cat((prompts, base.model.embed_tokens(IDS)), dim=1)
        adaptc.set_active(model, ["default", "lo"])
        expected = only(inputs_embeds=embeds).logits
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, **EXACT)
        adaptc.set_active(model, "lo")
        torch.testing.assert_close(model(input_ids=IDS).logits, only(input_ids=IDS).logits)
