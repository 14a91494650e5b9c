"""Models and adapters by hub id: downloaded as transformers and peft do, without internet.

``tests/hub_server.py`` serves a tiny model repo and adapter repos in the hub's HTTP layout
on 127.0.0.1; each test runs its commands in a fresh interpreter with ``HF_ENDPOINT``
pointed at it and an empty ``HF_HOME`` (huggingface_hub reads both when it is imported).
The fixture is checked first with transformers' and peft's own ``from_pretrained``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf

import adaptc
from tests.compiler.models import hf_inputs, tiny_hf
from tests.conftest import ROOT
from tests.hub_server import HubServer

TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    """The hub: ``tiny/opt``, the peft adapter ``tiny/opt-lora`` (``main``, and ``v2`` with
    other weights), the adaptc adapter ``tiny/opt-adaptc`` and the private ``tiny/secret``."""
    root = tmp_path_factory.mktemp("hub")
    model = tiny_hf("opt").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(root / "opt")
    for seed, name in ((0, "lora"), (1, "lora-v2")):
        torch.manual_seed(seed)
        pm = peft.get_peft_model(
            copy.deepcopy(model),
            peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                            init_lora_weights=False),
        )  # fmt: skip
        pm.save_pretrained(root / name)
    spec = {"version": 1, "task_type": "CAUSAL_LM",
            "adapters": {"default": {"init": "random", "r": 2}}}  # fmt: skip
    adaptc.save_adapter(adaptc.compile(model, spec), root / "adaptc")
    with HubServer() as server:
        server.add("tiny/opt", root / "opt")
        server.add("tiny/opt-lora", root / "lora")
        server.add("tiny/opt-lora", root / "lora-v2", revision="v2")
        server.add("tiny/opt-adaptc", root / "adaptc")
        server.add("tiny/secret", root / "lora", token=TOKEN)
        yield server, root


def _run(hub, home: Path, *code: str, offline: bool = False, **env: str) -> dict:
    """Run ``code`` (parts, each dedented) in a fresh interpreter against the hub; it
    prints one JSON document, returned."""
    server, root = hub
    environ = {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's own bars: not our output
        "PYTHONPATH": str(ROOT),
        **env,
    }
    if "HF_TOKEN" not in env:
        environ.pop("HF_TOKEN", None)
    preamble = textwrap.dedent(f"""
        import contextlib, io, json, sys, warnings
        warnings.simplefilter("ignore")
        from pathlib import Path
        ROOT = Path({str(root)!r})
        def cli(*args):
            from adaptc.cli import main
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main([str(a) for a in args])
            return {{"code": code, "out": out.getvalue(), "err": err.getvalue()}}
    """)
    proc = subprocess.run(
        [sys.executable, "-c", preamble + "".join(textwrap.dedent(c) for c in code)],
        env=environ, capture_output=True, text=True, timeout=600, cwd=home.parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _logits(model: torch.nn.Module) -> list[float]:
    with torch.no_grad():
        return model(**hf_inputs("opt")).logits.flatten().tolist()  # type: ignore[no-any-return]


LOCAL_PEFT = """
    import torch, transformers as tf, peft
    from tests.compiler.models import hf_inputs
    def logits(m):
        with torch.no_grad():
            return m(**hf_inputs("opt")).logits.flatten().tolist()
"""


def test_the_fixture_serves_transformers_and_peft(hub, tmp_path):
    server, root = hub
    result = _run(
        hub,
        tmp_path / "home",
        LOCAL_PEFT,
        """
        base = tf.AutoModelForCausalLM.from_pretrained("tiny/opt").eval()
        p = peft.PeftModel.from_pretrained(base, "tiny/opt-lora").eval()
        print(json.dumps({"peft": logits(p)}))
    """,
    )
    base = tf.AutoModelForCausalLM.from_pretrained(root / "opt").eval()
    expected = _logits(peft.PeftModel.from_pretrained(base, root / "lora").eval())
    assert result["peft"] == pytest.approx(expected, abs=1e-6)
    assert "tiny/opt/model.safetensors" in server.downloads()


def test_plan_by_id_downloads_only_the_config(hub, tmp_path):
    server, _ = hub
    spec = tmp_path / "spec.yaml"
    spec.write_text("version: 1\nadapters:\n  default:\n    r: 4\n")
    server.requests.clear()
    result = _run(
        hub,
        tmp_path / "home",
        f"""
        print(json.dumps(cli("plan", {str(spec)!r}, "tiny/opt", "--json")))
    """,
    )
    assert result["code"] == 0, result["err"]
    assert json.loads(result["out"])["model_class"] == "OPTForCausalLM"
    assert server.downloads() == ["tiny/opt/config.json"]  # not the weights


def test_compile_merge_and_load_by_id(hub, tmp_path):
    _, root = hub
    spec = tmp_path / "spec.yaml"
    spec.write_text("version: 1\ntask_type: CAUSAL_LM\nadapters:\n  default:\n    r: 4\n")
    result = _run(
        hub,
        tmp_path / "home",
        LOCAL_PEFT,
        f"""
        import adaptc
        out = {{}}
        out["compile"] = cli("compile", {str(spec)!r}, "tiny/opt", "--out", "adapter", "-q")
        out["merge"] = cli("merge", "tiny/opt", "tiny/opt-lora", "--out", "merged", "--json")
        out["merge_adaptc"] = cli("merge", "tiny/opt", "tiny/opt-adaptc", "--out", "m2", "--json")
        base = tf.AutoModelForCausalLM.from_pretrained("tiny/opt").eval()
        out["load"] = logits(adaptc.load_adapter(base, "tiny/opt-lora").eval())
        out["v2"] = logits(adaptc.load_adapter(base, "tiny/opt-lora", revision="v2").eval())
        out["merged"] = logits(tf.AutoModelForCausalLM.from_pretrained("merged").eval())
        print(json.dumps(out))
    """,
    )
    for command in ("compile", "merge", "merge_adaptc"):
        assert result[command]["code"] == 0, result[command]["err"]
    base = tf.AutoModelForCausalLM.from_pretrained(root / "opt").eval()
    for key, folder in (("load", "lora"), ("merged", "lora"), ("v2", "lora-v2")):
        expected = _logits(peft.PeftModel.from_pretrained(base, root / folder).eval())
        assert result[key] == pytest.approx(expected, abs=1e-5), key
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny/opt"


def test_offline_uses_the_cache_and_names_what_is_missing(hub, tmp_path):
    home = tmp_path / "home"
    _run(
        hub,
        home,
        """
        print(json.dumps(cli("merge", "tiny/opt", "tiny/opt-lora", "--out", "first")))
    """,
    )
    server, _ = hub
    server.requests.clear()
    result = _run(
        hub,
        home,
        """
        import adaptc, transformers as tf
        out = {"merge": cli("merge", "tiny/opt", "tiny/opt-lora", "--out", "again")}
        out["absent"] = cli("merge", "tiny/opt", "tiny/never-fetched", "--out", "x")
        try:
            adaptc.load_adapter(tf.AutoModelForCausalLM.from_pretrained("tiny/opt"),
                                "tiny/never-fetched")
        except ValueError as exc:
            out["api"] = str(exc)
        print(json.dumps(out))
    """,
        offline=True,
    )
    assert result["merge"]["code"] == 0, result["merge"]["err"]
    assert server.requests == []  # nothing asked of the hub
    assert result["absent"]["code"] == 1
    message = (
        "the adapter tiny/never-fetched is not in the Hugging Face cache and HF_HUB_OFFLINE is "
        "set: download it where there is network (`hf download tiny/never-fetched`), or unset "
        "HF_HUB_OFFLINE"
    )
    assert result["absent"]["err"] == f"adaptc merge: error: {message}\n"
    assert result["api"] == message
    assert not (tmp_path / "x").exists()


def test_tokens_revisions_and_missing_repos(hub, tmp_path):
    code = """
        out = {
            "secret": cli("merge", "tiny/opt", "tiny/secret", "--out", "s"),
            "absent": cli("merge", "tiny/nothing-here", "tiny/opt-lora", "--out", "a"),
            "revision": cli("merge", "tiny/opt", "tiny/opt-lora", "--out", "r", "--revision", "v9"),
        }
        print(json.dumps(out))
    """
    without = _run(hub, tmp_path / "home", code)
    assert without["secret"]["code"] == 1
    assert without["secret"]["err"].startswith(
        "adaptc merge: error: the adapter tiny/secret: no such repository on the Hub"
    )
    assert "log in (`hf auth login`) or set HF_TOKEN" in without["secret"]["err"]
    assert without["absent"]["err"].startswith(
        "adaptc merge: error: the model tiny/nothing-here: no such repository on the Hub"
    )
    assert without["revision"]["err"] == (
        "adaptc merge: error: the model tiny/opt@v9: the repository has no revision 'v9'\n"
    )
    for result in without.values():
        assert result["err"].count("\n") == 1
    with_token = _run(hub, tmp_path / "home2", code, HF_TOKEN=TOKEN)
    assert with_token["secret"]["code"] == 0, with_token["secret"]["err"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "r").exists()
