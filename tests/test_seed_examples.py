"""The project's three seed examples (PEFT's README and quick tour), run on adaptc.

Each block is PEFT's code with only ``from peft import …`` changed to
``from adaptc.peft import …``; hub models are replaced by the same architectures built
here (no hub access). Where the seed loads an adapter, real ``peft`` wrote it, and the
outputs are compared with real ``peft`` on the same base model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf

from tests.compiler.models import DummyModel
from tests.compiler.parity import share_adapter_weights

# --- 1. mt0-large, get_peft_model, print_trainable_parameters ---------------------------


def mt0_large() -> torch.nn.Module:
    """bigscience/mt0-large's architecture on the meta device (no weights, no memory)."""
    cfg = tf.MT5Config(
        d_model=1024,
        d_ff=2816,
        d_kv=64,
        num_heads=16,
        num_layers=24,
        num_decoder_layers=24,
        vocab_size=250112,
        feed_forward_proj="gated-gelu",
    )
    with torch.device("meta"):
        model = tf.MT5ForConditionalGeneration(cfg)
        # the released checkpoint has its own lm_head; transformers 5 ties MT5's: untie
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    return model


def test_seed_1_mt0_large_trainable_parameters(capsys):
    from adaptc.peft import LoraConfig, TaskType, get_peft_config, get_peft_model  # noqa: F401

    peft_config = LoraConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1
    )

    model = mt0_large()  # AutoModelForSeq2SeqLM.from_pretrained("bigscience/mt0-large")
    model = get_peft_model(model, peft_config)
    model.print_trainable_parameters()

    assert capsys.readouterr().out == (
        "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915\n"
    )
    assert type(model).__name__ == "PeftModelForSeq2SeqLM"


# --- 2. opt-350m with an adapter saved by real peft: PeftModel.from_pretrained, generate ---


def opt_350m_like() -> torch.nn.Module:
    """facebook/opt-350m's architecture, scaled down: post-layer-norm blocks and word
    embeddings narrower than the hidden size (``project_in``/``project_out``)."""
    torch.manual_seed(0)
    cfg = tf.OPTConfig(
        hidden_size=64,
        word_embed_proj_dim=32,
        ffn_dim=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        vocab_size=512,
        max_position_embeddings=128,
        do_layer_norm_before=False,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    return tf.OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def opt_base(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """The base model, saved as a local checkpoint (``base_model_name_or_path`` points here)."""
    base_dir = tmp_path_factory.mktemp("opt-350m-like")
    opt_350m_like().save_pretrained(base_dir)
    return tf.AutoModelForCausalLM.from_pretrained(base_dir).eval(), base_dir


@pytest.fixture(scope="module")
def peft_saved_adapter(opt_base, tmp_path_factory) -> Path:
    """What ybelkada/opt-350m-lora is: LoRA on q_proj/v_proj, saved by real peft."""
    base, _ = opt_base
    trained = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules=["q_proj", "v_proj"],
        ),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:  # "trained": B is no longer zero
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    out = tmp_path_factory.mktemp("opt-350m-lora")
    trained.save_pretrained(out)
    return out


PROMPT = torch.tensor([[2, 100, 37, 8, 61, 450, 9, 77, 301, 12, 5]])  # a tokenized prompt


def test_seed_2_opt_350m_from_pretrained_generate(opt_base, peft_saved_adapter):
    from adaptc.peft import PeftModel

    base_model, _ = opt_base
    peft_model_id = peft_saved_adapter  # "ybelkada/opt-350m-lora"
    model = PeftModel.from_pretrained(base_model, peft_model_id)

    model.eval()
    outputs = model.generate(input_ids=PROMPT, max_new_tokens=20, do_sample=False)
    logits = model(input_ids=PROMPT).logits

    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), peft_model_id).eval()
    expected = reference.generate(input_ids=PROMPT, max_new_tokens=20, do_sample=False)
    torch.testing.assert_close(logits, reference(input_ids=PROMPT).logits, rtol=1e-6, atol=1e-6)
    assert torch.equal(outputs, expected)
    assert outputs.shape == (1, PROMPT.shape[1] + 20)
    with torch.no_grad():  # the adapter matters: the base model alone differs
        assert not torch.allclose(base_model(input_ids=PROMPT).logits, logits, atol=1e-4)


def test_seed_2_auto_peft_model_loads_the_base_named_in_the_adapter(opt_base, peft_saved_adapter):
    from adaptc.peft import AutoPeftModelForCausalLM

    base_model, base_dir = opt_base
    model = AutoPeftModelForCausalLM.from_pretrained(peft_saved_adapter)  # base from base_dir
    model.eval()
    outputs = model.generate(input_ids=PROMPT, max_new_tokens=20, do_sample=False)

    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), peft_saved_adapter)
    expected = reference.eval().generate(input_ids=PROMPT, max_new_tokens=20, do_sample=False)
    assert torch.equal(outputs, expected)
    assert model.peft_config["default"].base_model_name_or_path == str(base_dir)


# --- 3. a custom model, inject_adapter_in_model ---------------------------------------------


def test_seed_3_custom_dummy_model_inject_adapter():
    from adaptc.peft import LoraConfig, inject_adapter_in_model

    # class DummyModel(torch.nn.Module): Embedding(10, 10) → Linear "linear" → Linear "lm_head"
    lora_config = LoraConfig(
        lora_alpha=16,
        lora_dropout=0.1,
        r=64,
        bias="none",
        target_modules=["linear"],
    )

    torch.manual_seed(0)
    model = DummyModel()
    base = model  # adaptc leaves it untouched: the reference below starts from it
    model = inject_adapter_in_model(lora_config, model)

    dummy_inputs = torch.LongTensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    dummy_outputs = model(dummy_inputs)
    assert dummy_outputs.shape == (1, 8, 10)

    # the same adapter weights in real peft's injected model give the same outputs
    reference = peft.inject_adapter_in_model(
        peft.LoraConfig(
            lora_alpha=16, lora_dropout=0.1, r=64, bias="none", target_modules=["linear"]
        ),
        copy.deepcopy(base),
    )
    assert share_adapter_weights(reference, model) == 2  # lora_A, lora_B of "linear"
    model.eval()
    reference.eval()
    torch.testing.assert_close(model(dummy_inputs), reference(dummy_inputs), rtol=1e-6, atol=1e-6)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 == sum(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in base.parameters())  # untouched: nothing frozen in place
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in base.modules())
