"""Small models for the compiler tests: custom torch models and tiny transformers configs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class DummyModel(nn.Module):
    """The seed's custom model (PEFT's custom-models example)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 10)
        self.linear = nn.Linear(10, 10)
        self.lm_head = nn.Linear(10, 10)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids)
        x = self.linear(x)
        return self.lm_head(x)


class NestedMLP(nn.Module):
    """ModuleList and ModuleDict nesting, a keyword argument with a default."""

    def __init__(self, dim: int = 12, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(dim, 2 * dim), "fc2": nn.Linear(2 * dim, dim)})
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["fc2"](torch.relu(block["fc1"](x)))
        return self.head(self.norm(x)) * scale


class CalledTwice(nn.Module):
    """One layer applied twice in one forward, and a module shared under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.shared = nn.Linear(8, 8)
        self.alias = self.shared
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.proj(x))
        x = torch.tanh(self.proj(x))
        return self.out(self.alias(self.shared(x)))


class Untraceable(nn.Module):
    """A root whose forward branches on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = NestedMLP(dim=8, depth=2)
        self.gate = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = self.gate(x)
        return self.inner(x)


class ModeDependent(nn.Module):
    """Code that branches on ``self.training``: tracing would freeze one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return y * 0.5 if self.training else y


class ConvNet(nn.Module):
    """A convolution and a linear head: conv LoRA next to linear LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def tiny_hf(family: str) -> nn.Module:
    """A tiny randomly initialised transformers model of one family (no hub access)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "opt":
        cfg = tf.OPTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            vocab_size=64,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
        )
        return tf.OPTForCausalLM(cfg)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
        return tf.GPT2LMHeadModel(cfg)
    if family == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=64,
            max_position_embeddings=32,
        )
        return tf.LlamaForCausalLM(cfg)
    if family == "mt5":
        cfg = tf.MT5Config(
            d_model=16,
            d_ff=32,
            d_kv=8,
            num_heads=2,
            num_layers=2,
            num_decoder_layers=2,
            vocab_size=64,
            decoder_start_token_id=0,
        )
        return tf.MT5ForConditionalGeneration(cfg)
    if family == "bert":
        cfg = tf.BertConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            vocab_size=64,
            max_position_embeddings=32,
            num_labels=3,
        )
        return tf.BertForSequenceClassification(cfg)
    raise ValueError(family)


def hf_inputs(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (2, 7), generator=g)
    if family == "mt5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, 64, (2, 5), generator=g)}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def save_llama(path: Path, hidden: int = 128, layers: int = 1) -> Path:
    """A small Llama checkpoint (seed 0) with room for quantized layers: in_features of 64
    and more, out_features multiples of 32 (bitsandbytes' CPU kernel; torchao's and HQQ's
    groups), several 64-value scale blocks per row when ``hidden`` ≥ 128."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=64, max_position_embeddings=32,
    )  # fmt: skip
    tf.LlamaForCausalLM(config).save_pretrained(path)
    return path
