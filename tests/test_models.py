"""``adaptc.models``: what a MODEL argument names, and building it on meta or with weights.

Also the shared builders of the CLI tests: tiny checkpoints written by ``save_pretrained``,
a populated Hugging Face cache, and ``tiny_llama``, a ``package.module:factory`` target.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from torch import nn

import adaptc
from adaptc.models import (
    ModelError,
    build_model,
    dtype_name,
    model_dtype,
    resolve_model,
    saved_task_type,
    training_memory,
)

CONFIGS = {
    "opt": lambda: tf.OPTConfig(
        hidden_size=16,
        ffn_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
        word_embed_proj_dim=16,
    ),
    "llama": lambda: tf.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    ),
    "gpt2": lambda: tf.GPT2Config(
        n_embd=16,
        n_layer=2,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    ),
    "bert": lambda: tf.BertConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        vocab_size=64,
        max_position_embeddings=32,
    ),
}
# the class each tiny checkpoint is saved from
SAVED_AS = {
    "opt": tf.AutoModelForCausalLM,
    "llama": tf.AutoModelForCausalLM,
    "gpt2": tf.AutoModelForCausalLM,
    "bert": tf.AutoModel,
}
HASH = "0123456789abcdef0123456789abcdef01234567"


def save_tiny(kind: str, directory: Path, **save_kwargs: object) -> Path:
    """A tiny ``kind`` checkpoint written by ``save_pretrained`` (seeded, so reproducible)."""
    torch.manual_seed(0)
    model = SAVED_AS[kind].from_config(CONFIGS[kind]())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory, **save_kwargs)
    return directory


def fake_hub_cache(root: Path, repo_id: str, source: Path, commit: str = HASH) -> Path:
    """A Hugging Face cache under ``root`` holding ``source``'s files as ``repo_id`` @ main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in source.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def tiny_llama() -> nn.Module:
    """A ``package.module:factory`` for the tests: ``tests.test_models:tiny_llama``."""
    return tf.LlamaForCausalLM(CONFIGS["llama"]())


def not_a_model() -> str:
    return "a string"


def broken_factory() -> nn.Module:
    raise RuntimeError("out of coffee\nsecond line")


NOT_CALLABLE = 42


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    paths = {kind: save_tiny(kind, root / kind) for kind in CONFIGS}
    paths["sharded"] = save_tiny("llama", root / "sharded", max_shard_size="20KB")
    paths["cache"] = fake_hub_cache(root / "hub", "org/tiny-opt", paths["opt"])
    return paths


# --- resolve_model -------------------------------------------------------------------------


def test_a_directory_a_config_file_a_cached_id_and_a_factory_resolve(ckpt):
    assert resolve_model(str(ckpt["opt"])).kind == "dir"
    assert resolve_model(str(ckpt["opt"] / "config.json")).kind == "config"
    hub = resolve_model("org/tiny-opt", cache_dir=ckpt["cache"])
    assert (hub.kind, hub.path) == ("hub", ckpt["cache"] / "models--org--tiny-opt/snapshots" / HASH)
    assert resolve_model("org/tiny-opt", cache_dir=ckpt["cache"], revision=HASH).path == hub.path
    factory = resolve_model("tests.test_models:tiny_llama")
    assert factory.kind == "factory" and factory.factory is tiny_llama


def test_sharded_checkpoint_is_a_directory_with_an_index(ckpt):
    files = sorted(p.name for p in ckpt["sharded"].iterdir())
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    assert resolve_model(str(ckpt["sharded"])).kind == "dir"


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("missing/dir/here", "no such file or directory: missing/dir/here"),
        ("./nothing", "no such file or directory: ./nothing"),
        ("gone.json", "no such file or directory: gone.json"),
        ("org/not-cached", "the model org/not-cached is not in the Hugging Face cache and HF_HUB"),
        ("tests.nowhere:f", "cannot import module 'tests.nowhere' for the model factory"),
        ("tests.test_models:nothing", "module 'tests.test_models' has no attribute 'nothing'"),
        ("tests.test_models:NOT_CALLABLE", "'NOT_CALLABLE' in module 'tests.test_models' is a"),
    ],
)
def test_unusable_references_are_one_line_errors(ckpt, ref, message):
    with pytest.raises(ModelError) as info:
        resolve_model(ref, cache_dir=ckpt["cache"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_offline_and_not_cached_names_the_revision(ckpt):
    with pytest.raises(ModelError, match=r"^the model org/tiny-opt@v2 is not in the Hugging Face"):
        resolve_model("org/tiny-opt", cache_dir=ckpt["cache"], revision="v2")


def test_directory_without_config_and_other_files_are_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ModelError, match=r"has no config\.json: not a Hugging Face model"):
        resolve_model(str(tmp_path / "weights"))
    (tmp_path / "spec.yaml").write_text("version: 1\n")
    with pytest.raises(ModelError, match=r"is a file, but not a config\.json"):
        resolve_model(str(tmp_path / "spec.yaml"))


@pytest.mark.parametrize(
    ("text", "message"),
    [("{not json", "not a valid JSON file"), ('{"a": 1}', "Should have a `model_type` key")],
)
def test_unreadable_config_is_a_one_line_error(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    ref = resolve_model(str(tmp_path / "config.json"))
    with pytest.raises(ModelError) as info:
        build_model(ref, task_type=None, meta=True)
    assert str(info.value).startswith("cannot read the model config ")
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("broken_factory", "raised RuntimeError: out of coffee"),
        ("not_a_model", "returned a str, not a torch nn.Module"),
    ],
)
def test_factory_failures_are_one_line_errors(factory, message):
    ref = resolve_model(f"tests.test_models:{factory}")
    with pytest.raises(ModelError) as info:
        build_model(ref, task_type=None, meta=False)
    assert message in str(info.value) and "\n" not in str(info.value)


# --- build_model ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "task_type", "cls"),
    [
        ("opt", "CAUSAL_LM", "OPTForCausalLM"),
        ("opt", None, "OPTForCausalLM"),  # no task: the checkpoint's own class
        ("opt", "FEATURE_EXTRACTION", "OPTModel"),
        ("opt", "SEQ_CLS", "OPTForSequenceClassification"),
        ("gpt2", "CAUSAL_LM", "GPT2LMHeadModel"),
        ("bert", "TOKEN_CLS", "BertForTokenClassification"),
        ("bert", "QUESTION_ANS", "BertForQuestionAnswering"),
        ("llama", "CAUSAL_LM", "LlamaForCausalLM"),
    ],
)
def test_meta_build_picks_the_checkpoints_class_or_the_tasks(ckpt, kind, task_type, cls):
    model = build_model(resolve_model(str(ckpt[kind])), task_type=task_type, meta=True)
    assert type(model).__name__ == cls
    assert all(p.device.type == "meta" for p in model.parameters())


def test_seq2seq_task_builds_a_seq2seq_model(tmp_path):
    config = tf.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)
    config.save_pretrained(tmp_path)
    model = build_model(resolve_model(str(tmp_path)), task_type="SEQ_2_SEQ_LM", meta=True)
    assert type(model).__name__ == "T5ForConditionalGeneration"


def test_a_task_the_architecture_lacks_is_a_one_line_error(ckpt):
    with pytest.raises(ModelError) as info:
        build_model(resolve_model(str(ckpt["llama"])), task_type="SEQ_2_SEQ_LM", meta=True)
    message = str(info.value)
    assert "AutoModelForSeq2SeqLM cannot build a 'llama' model" in message
    assert "task_type SEQ_2_SEQ_LM" in message and "\n" not in message


def test_meta_build_reads_no_weight(ckpt, tmp_path):
    """Corrupt weights do not matter on meta: only config.json is read."""
    (tmp_path / "config.json").write_bytes((ckpt["opt"] / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage")
    ref = resolve_model(str(tmp_path))
    assert type(build_model(ref, task_type="CAUSAL_LM", meta=True)).__name__ == "OPTForCausalLM"
    with pytest.raises(ModelError, match="cannot load the model") as info:
        build_model(ref, task_type="CAUSAL_LM", meta=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["opt", "sharded"])
def test_real_build_loads_the_saved_weights(ckpt, kind):
    model = build_model(resolve_model(str(ckpt[kind])), task_type="CAUSAL_LM", meta=False)
    saved: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt[kind].glob("*.safetensors")):
        saved |= load_file(f)
    state = model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())


def test_cached_hub_id_loads_like_its_directory(ckpt):
    ref = resolve_model("org/tiny-opt", cache_dir=ckpt["cache"])
    model = build_model(ref, task_type="CAUSAL_LM", meta=False)
    direct = build_model(resolve_model(str(ckpt["opt"])), task_type="CAUSAL_LM", meta=False)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), direct.state_dict().values(), strict=True)
    )


def test_dtype_is_the_checkpoints_unless_given(ckpt):
    ref = resolve_model(str(ckpt["opt"]))
    assert model_dtype(build_model(ref, task_type="CAUSAL_LM", meta=False)) == torch.float32
    bf16 = build_model(ref, task_type="CAUSAL_LM", meta=False, dtype=torch.bfloat16)
    assert model_dtype(bf16) == torch.bfloat16
    meta = build_model(ref, task_type=None, meta=True, dtype=torch.float16)
    assert dtype_name(model_dtype(meta)) == "fp16"


def test_config_json_alone_gives_random_weights_of_its_dtype(tmp_path):
    config = CONFIGS["llama"]()
    config.dtype = "bfloat16"
    config.save_pretrained(tmp_path)
    ref = resolve_model(str(tmp_path / "config.json"))
    model = build_model(ref, task_type="CAUSAL_LM", meta=False)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model_dtype(model) == torch.bfloat16
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_new_head_weights_are_one_warning(ckpt):
    ref = resolve_model(str(ckpt["opt"]))
    with pytest.warns(adaptc.AdaptcWarning, match=r"initialised at random: score\.weight$"):
        build_model(ref, task_type="SEQ_CLS", meta=False)


def test_factory_builds_on_meta_or_for_real_and_keeps_progress_state():
    from transformers.utils import logging as tf_logging

    before = tf_logging.is_progress_bar_enabled()
    ref = resolve_model("tests.test_models:tiny_llama")
    meta = build_model(ref, task_type=None, meta=True)
    real = build_model(ref, task_type=None, meta=False, dtype=torch.float16)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    assert {p.device.type for p in real.parameters()} == {"cpu"}
    assert model_dtype(real) == torch.float16
    assert tf_logging.is_progress_bar_enabled() == before


def test_saved_task_type_comes_from_the_architecture(ckpt, tmp_path):
    assert saved_task_type(resolve_model(str(ckpt["opt"]))) == "CAUSAL_LM"
    assert saved_task_type(resolve_model(str(ckpt["gpt2"]))) == "CAUSAL_LM"  # GPT2LMHeadModel
    assert saved_task_type(resolve_model(str(ckpt["bert"]))) is None  # BertModel
    assert saved_task_type(resolve_model("tests.test_models:tiny_llama")) is None
    config = json.loads((ckpt["bert"] / "config.json").read_text())
    config["architectures"] = ["BertForSequenceClassification"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert saved_task_type(resolve_model(str(tmp_path))) == "SEQ_CLS"


# --- training_memory -----------------------------------------------------------------------


def test_training_memory_counts_weights_gradients_and_adam_states(ckpt):
    model = build_model(resolve_model(str(ckpt["opt"])), task_type="CAUSAL_LM", meta=True)
    spec = {
        "version": 1,
        "task_type": "CAUSAL_LM",
        "adapters": {"default": {"r": 4, "targets": {"kind": "names", "names": ["q_proj"]}}},
    }
    plan = adaptc.build_plan(model, spec)
    n, a = plan.base_params, plan.adapter_params
    assert (n, a) == (6048, 2 * 4 * (16 + 16))
    memory = training_memory(plan, torch.bfloat16)
    assert memory["lora"].to_dict() == {
        "weights": 2 * n + 4 * a,
        "gradients": 4 * a,
        "optimizer": 8 * a,
        "total": 2 * n + 16 * a,
    }
    assert memory["full"].total == 2 * n + 2 * n + 8 * n
    assert training_memory(plan, torch.float32)["lora"].weights == 4 * (n + a)
