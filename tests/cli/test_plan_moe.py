"""``adaptc plan`` of a Qwen3-30B-A3B-shaped mixture of experts on the meta device, with
LoRA on the attention projections and on the fused expert stacks (``target_parameters``)."""

from __future__ import annotations

import json
from pathlib import Path

from adaptc.cli import main

QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "vocab_size": 151936, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}  # fmt: skip
SPEC = """\
version: 1
task_type: CAUSAL_LM
adapters:
  default:
    r: 16
    lora_alpha: 32
    targets: {kind: names, names: [q_proj, k_proj, v_proj, o_proj]}
    target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]
"""


def test_plan_of_a_30b_a3b_moe_lists_the_expert_stacks_and_its_memory(capsys, tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    (tmp_path / "spec.yaml").write_text(SPEC)
    code = main(["plan", str(tmp_path / "spec.yaml"), str(tmp_path / "config.json"), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    plan = doc["plan"]
    stacks = [t for t in plan["targets"] if t["layer_type"] == "nn.Parameter"]
    assert len(stacks) == 96 and len(plan["targets"]) == 96 + 4 * 48
    gate_up = next(t for t in stacks if t["path"] == "model.layers.0.mlp.experts.gate_up_proj")
    # per expert an (r, in) A and (out, r) B: 128 · 16 · (2048 + 1536)
    assert (gate_up["in_features"], gate_up["out_features"]) == (2048, 1536)
    assert gate_up["params"] == 128 * 16 * (2048 + 1536)
    down = next(t for t in stacks if t["path"] == "model.layers.0.mlp.experts.down_proj")
    assert down["params"] == 128 * 16 * (768 + 2048)
    attention = 16 * ((2048 + 4096) * 2 + (2048 + 512) * 2)  # q, o and k, v
    per_layer = attention + gate_up["params"] + down["params"]
    assert plan["adapter_params"] == 48 * per_layer == 642_514_944
    assert plan["base_params"] == 30_532_122_624  # Qwen3-30B-A3B's 30.5B
    n, a = plan["base_params"], plan["adapter_params"]
    assert doc["memory"]["lora"]["total"] == 2 * n + 16 * a  # bf16 base, fp32 adapter + AdamW
