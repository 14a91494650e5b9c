"""Parameter counts and PEFT's printed line, on real architectures built on the meta device."""

from __future__ import annotations

import time

import torch
import transformers as tf

import adaptc
from tests.conftest import EXAMPLES


def mt0_large() -> torch.nn.Module:
    cfg = tf.MT5Config(
        d_model=1024,
        d_ff=2816,
        d_kv=64,
        num_heads=16,
        num_layers=24,
        num_decoder_layers=24,
        vocab_size=250112,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = tf.MT5ForConditionalGeneration(cfg)
        # mt0-large's lm_head is its own matrix; transformers 5 ties MT5's whatever the
        # config says, so untie it as the released checkpoint has it
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
    return model


def test_seed_mt0_large_prints_peft_line(capsys):
    model = mt0_large()
    new = adaptc.compile(model, EXAMPLES / "seed-mt0-large.yaml")
    adaptc.print_trainable_parameters(new)
    assert capsys.readouterr().out == (
        "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915\n"
    )
    assert adaptc.trainable_parameters(new) == (2_359_296, 1_231_940_608)


def test_plan_counts_agree_with_the_compiled_model():
    model = mt0_large()
    plan = adaptc.build_plan(model, EXAMPLES / "seed-mt0-large.yaml")
    assert plan.adapter_params == 2_359_296
    assert plan.total_params == 1_231_940_608
    assert len(plan.targets) == 2 * (24 * 2 + 24)  # q and v in every attention block
    assert "2,359,296 adapter params" in str(plan)


def test_plan_is_serialisable():
    import json

    plan = adaptc.build_plan(mt0_large(), EXAMPLES / "seed-mt0-large.yaml")
    data = json.loads(json.dumps(plan.to_dict()))
    first = data["targets"][0]
    assert first["path"] == "encoder.block.0.layer.0.SelfAttention.q"
    assert (first["layer_type"], first["r"], first["lora_alpha"], first["scaling"]) == (
        "nn.Linear",
        8,
        32,
        4.0,
    )
    assert (first["in_features"], first["out_features"], first["params"]) == (1024, 1024, 16384)


def test_meta_compile_of_a_7b_shape_is_fast_and_touches_no_memory():
    cfg = tf.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    start = time.perf_counter()
    new = adaptc.compile(
        model, {"version": 1, "adapters": {"default": {"r": 16, "targets": {"kind": "all-linear"}}}}
    )
    elapsed = time.perf_counter() - start
    trainable, _ = adaptc.trainable_parameters(new)
    assert trainable == 39_976_960  # 32 layers × r·Σ(in+out) of q,k,v,o,gate,up,down
    assert all(p.device.type == "meta" for p in new.parameters())
    assert elapsed < 10  # the benchmark holds the real target (≤ 1 s); this only catches blowups
