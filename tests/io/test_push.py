"""``push_adapter`` and the model card: uploads as ``PeftModel.push_to_hub`` makes them.

``tests/hub_server.py`` is the Hub (``create_repo``, ``upload_folder``'s preupload and NDJSON
commit, branches, pull requests, then downloads of what was pushed). Each hub test runs its
code in a fresh interpreter with ``HF_ENDPOINT`` pointed at it (huggingface_hub reads it on
import), as ``tests/test_hub.py`` does. The card tests compare ``save_adapter``'s
``README.md`` with the one peft's ``save_pretrained`` writes.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import peft
import pytest
from huggingface_hub import ModelCard

import adaptc
from tests.compiler.models import tiny_hf
from tests.conftest import ROOT
from tests.hub_server import HubServer

TOKEN = "hf_writer_token"
SPEC = {"version": 1, "task_type": "CAUSAL_LM",
        "adapters": {"default": {"init": "random", "r": 2}}}  # fmt: skip


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    """The hub: the base model ``org/opt``; ``TOKEN`` is the user ``tester``, who may also
    write to ``org``; ``org/carded`` holds a card a person wrote and a file of theirs."""
    root = tmp_path_factory.mktemp("hub")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_hf("opt").eval().save_pretrained(root / "opt")
    carded = root / "carded"
    carded.mkdir()
    (carded / "README.md").write_text(
        "---\nlicense: mit\ntags:\n- my-tag\n---\n\n# My adapter\n\nHand-written notes.\n"
    )
    (carded / "notes.txt").write_text("keep me\n")
    with HubServer(users={TOKEN: ("tester", "org")}) as server:
        server.add("org/opt", root / "opt")
        server.add("org/carded", carded)
        yield server, root


def _run(hub, tmp_path: Path, code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter against the hub, after a preamble that loads the
    base model ``base`` by id and defines ``push``/``logits``/``error``; it prints one JSON
    document, returned."""
    server, root = hub
    environ = {
        **os.environ,
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    if "HF_TOKEN" not in env:
        environ.pop("HF_TOKEN", None)
    preamble = textwrap.dedent(f"""
        import json, warnings
        warnings.simplefilter("ignore")
        import torch, transformers as tf, peft, adaptc
        from adaptc.hub import HubError
        from adaptc.io import push_adapter
        from tests.compiler.models import hf_inputs
        ROOT = {str(root)!r}
        TOKEN = {TOKEN!r}
        base = tf.AutoModelForCausalLM.from_pretrained("org/opt").eval()
        def compiled(model=base, seed=0):
            torch.manual_seed(seed)
            return adaptc.compile(model, {SPEC!r})
        def logits(m):
            with torch.no_grad():
                return m.eval()(**hf_inputs("opt")).logits.flatten().tolist()
        def error(call, *args, **kwargs):
            try:
                call(*args, **kwargs)
            except ValueError as exc:
                return {{"type": type(exc).__name__, "message": str(exc),
                         "chained": exc.__cause__ is not None or (
                             exc.__context__ is not None and not exc.__suppress_context__)}}
            return None
    """)
    proc = subprocess.run(
        [sys.executable, "-c", preamble + textwrap.dedent(code)],
        env=environ, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _card(text: bytes | str) -> dict:
    return ModelCard(text.decode() if isinstance(text, bytes) else text).data.to_dict()


def test_push_then_load_by_id_with_adaptc_and_peft(hub, tmp_path):
    server, _ = hub
    result = _run(
        hub,
        tmp_path,
        """
        model = compiled()
        info = push_adapter(model, "org/opt-lora")
        out = {"url": str(info), "oid": info.oid, "pushed": logits(model), "base": logits(base)}
        out["adaptc"] = logits(adaptc.load_adapter(base, "org/opt-lora"))
        out["peft"] = logits(peft.PeftModel.from_pretrained(base, "org/opt-lora"))
        print(json.dumps(out))
    """,
        HF_TOKEN=TOKEN,
    )
    assert result["adaptc"] == pytest.approx(result["pushed"], abs=1e-6)
    assert result["peft"] == pytest.approx(result["pushed"], abs=1e-6)
    assert result["pushed"] != pytest.approx(result["base"], abs=1e-4)  # the adapter acts
    files = server.files("org/opt-lora")
    assert sorted(files) == [
        "README.md",
        "adaptc_spec.yaml",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert result["oid"] == server.repos["org/opt-lora"].revisions["main"].sha
    assert result["url"] == f"{server.url}/org/opt-lora/commit/{result['oid']}"
    assert ("org/opt-lora", "Upload adapter") in server.commit_messages
    card = _card(files["README.md"])
    assert card["library_name"] == "peft"
    assert card["base_model"] == "org/opt"
    assert card["pipeline_tag"] == "text-generation"
    assert set(card["tags"]) == {
        "adaptc",
        "base_model:adapter:org/opt",
        "lora",
        "transformers",
    }
    assert not server.repos["org/opt-lora"].token  # public unless asked


def test_private_repo_with_a_token(hub, tmp_path):
    server, _ = hub
    result = _run(
        hub,
        tmp_path,
        """
        model = compiled(seed=1)
        out = {"id": push_adapter(model, "secret-lora", private=True, token=TOKEN).repo_url.repo_id}
        out["pushed"] = logits(model)
        out["anonymous"] = error(adaptc.load_adapter, base, "tester/secret-lora")
        out["adaptc"] = logits(adaptc.load_adapter(base, "tester/secret-lora", token=TOKEN))
        p = peft.PeftModel.from_pretrained(base, "tester/secret-lora", token=TOKEN)
        out["peft"] = logits(p)
        print(json.dumps(out))
    """,
    )
    assert result["id"] == "tester/secret-lora"  # a bare name goes to the user's namespace
    assert server.repos["tester/secret-lora"].token == TOKEN  # readable with it only
    assert result["anonymous"]["message"].startswith(
        "the adapter tester/secret-lora: no such repository on the Hub"
    )
    assert result["adaptc"] == pytest.approx(result["pushed"], abs=1e-6)
    assert result["peft"] == pytest.approx(result["pushed"], abs=1e-6)


def test_errors_are_one_line_naming_the_repo(hub, tmp_path):
    server, _ = hub
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    result = _run(
        hub,
        tmp_path,
        f"""
        from huggingface_hub import constants
        model = compiled()
        out = {{
            "no token": error(push_adapter, model, "org/denied"),
            "bad token": error(push_adapter, model, "org/denied", token="hf_wrong"),
            "not yours": error(push_adapter, model, "someone/denied", token=TOKEN),
            "bad id": error(push_adapter, model, "org/bad id!", token=TOKEN),
            "pr and branch": error(push_adapter, model, "org/denied", token=TOKEN,
                                   create_pr=True, revision="dev"),
            "not compiled": error(push_adapter, base, "org/denied", token=TOKEN),
        }}
        endpoint = constants.ENDPOINT
        constants.ENDPOINT = "http://127.0.0.1:{closed}"
        out["unreachable"] = error(push_adapter, model, "org/denied", token=TOKEN)
        constants.ENDPOINT, constants.HF_HUB_OFFLINE = endpoint, True
        out["offline"] = error(push_adapter, model, "org/denied", token=TOKEN)
        print(json.dumps(out))
    """,
    )
    cannot = "cannot push the adapter to"
    expected = {
        "no token": f"{cannot} org/denied: not logged in to the Hub ({server.url}): log in "
        "with a token that can write (`hf auth login`) or set HF_TOKEN",
        "bad token": f"{cannot} org/denied: the Hub ({server.url}) refused the token (401: "
        "Invalid credentials in Authorization header): log in again (`hf auth login`) or set "
        "HF_TOKEN to a token that can write",
        "not yours": f"{cannot} someone/denied: the token may not write there (403: You don't "
        "have the rights to create a model under the namespace 'someone')",
        "offline": f"{cannot} org/denied: HF_HUB_OFFLINE is set; unset it to upload",
    }
    for case, message in expected.items():
        assert result[case]["message"] == message, case
    assert result["bad id"]["message"].startswith("'org/bad id!' is not a valid hub id (")
    assert result["unreachable"]["message"].startswith(
        f"{cannot} org/denied: the Hub at http://127.0.0.1:{closed} cannot be reached ("
    )
    assert result["unreachable"]["message"].endswith("): check the network, or HF_ENDPOINT")
    assert "create_pr opens a pull request against main" in result["pr and branch"]["message"]
    assert result["not compiled"]["message"].startswith("push_adapter() takes a model returned")
    for case, outcome in result.items():
        assert "\n" not in outcome["message"], case
        assert not outcome["chained"], case  # `from None`: no traceback of the library's
    hub_errors = set(result) - {"pr and branch", "not compiled"}
    assert {result[case]["type"] for case in hub_errors} == {"HubError"}
    assert not {"org/denied", "someone/denied"} & set(server.repos)


def test_push_updates_the_card_already_on_the_hub(hub, tmp_path):
    server, _ = hub
    _run(
        hub,
        tmp_path,
        """
        push_adapter(compiled(), "org/carded", tags=["extra"], commit_message="Adapter v1")
        print(json.dumps({}))
    """,
        HF_TOKEN=TOKEN,
    )
    files = server.files("org/carded")
    assert files["notes.txt"] == b"keep me\n"  # an upload adds; it removes nothing
    readme = files["README.md"].decode()
    assert "# My adapter\n\nHand-written notes." in readme
    assert "### Framework versions\n\n- adaptc " in readme
    card = _card(readme)
    assert card["license"] == "mit"
    assert card["library_name"] == "peft" and card["base_model"] == "org/opt"
    assert set(card["tags"]) == {
        "adaptc",
        "base_model:adapter:org/opt",
        "extra",
        "lora",
        "my-tag",
        "transformers",
    }
    assert ("org/carded", "Adapter v1") in server.commit_messages


def test_branch_pull_request_and_a_local_base_model(hub, tmp_path):
    """``revision`` commits to a branch, ``create_pr`` to a pull request, ``main`` untouched.
    The base here is loaded from a folder: its path is no hub id, so the card names no
    ``base_model`` (the Hub refuses a path there; peft's card writes it and fails to push)."""
    server, _ = hub
    result = _run(
        hub,
        tmp_path,
        """
        local = tf.AutoModelForCausalLM.from_pretrained(ROOT + "/opt").eval()
        model = compiled(local)
        dev = push_adapter(model, "org/branched", revision="dev")
        pr = push_adapter(model, "org/branched", create_pr=True)
        print(json.dumps({"dev": dev.oid, "pr": pr.pr_url, "pr_revision": pr.pr_revision}))
    """,
        HF_TOKEN=TOKEN,
    )
    repo = server.repos["org/branched"]
    assert server.files("org/branched", "main") == {}
    assert result["dev"] == repo.revisions["dev"].sha
    assert result["pr"] == f"{server.url}/org/branched/discussions/1"
    assert result["pr_revision"] == "refs/pr/1"
    for revision in ("dev", "refs/pr/1"):
        files = server.files("org/branched", revision)
        assert "adapter_model.safetensors" in files, revision
        card = _card(files["README.md"])
        assert "base_model" not in card, revision
        assert not [t for t in card["tags"] if t.startswith("base_model:")], revision


# -- the model card that save_adapter writes -------------------------------------------------


def _named_opt(name: str | None):
    model = tiny_hf("opt").eval()
    if name is not None:
        model.config._name_or_path = name
        model.name_or_path = name
    return model


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
@pytest.mark.parametrize("name", ["org/tiny-opt", None], ids=["hub-id", "unnamed"])
def test_card_has_the_metadata_peft_writes(tmp_path, task_type, name):
    model = _named_opt(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(task_type=task_type, r=2, target_modules=["q_proj", "v_proj"])
        peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(tmp_path / "peft")
    spec = {"version": 1, "task_type": task_type, "adapters": {"default": {"r": 2,
            "targets": {"kind": "names", "names": ["q_proj", "v_proj"]}}}}  # fmt: skip
    adaptc.save_adapter(adaptc.compile(model, spec), tmp_path / "adaptc")
    theirs = _card((tmp_path / "peft" / "README.md").read_text())
    ours = _card((tmp_path / "adaptc" / "README.md").read_text())
    if name is None:  # peft writes `base_model: ''`, which the Hub refuses: adaptc leaves it out
        assert theirs.pop("base_model") == ""
        theirs["tags"].remove("base_model:adapter:")
    assert ours.keys() == theirs.keys()
    for key in ours.keys() - {"tags"}:
        assert ours[key] == theirs[key], key
    assert set(ours["tags"]) - set(theirs["tags"]) == {"adaptc"}
    assert set(theirs["tags"]) <= set(ours["tags"])


def test_card_update_keeps_what_was_there(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text(
        "---\nlicense: apache-2.0\npipeline_tag: text2text-generation\ntags:\n- mine\n"
        "- base_model:adapter:old/base\n---\n\n# Mine\n\nNotes.\n\n### Framework versions\n\n"
        "- PyTorch 2.x\n"
    )
    model = adaptc.compile(_named_opt("org/tiny-opt"), SPEC)
    adaptc.save_adapter(model, out)
    text = (out / "README.md").read_text()
    assert text.startswith("---\n") and "\n# Mine\n\nNotes.\n" in text
    assert "### Framework versions\n\n- adaptc " in text and "- PyTorch 2.x" in text
    card = _card(text)
    assert card["license"] == "apache-2.0"
    assert card["pipeline_tag"] == "text2text-generation"  # set by its author: kept
    assert card["base_model"] == "org/tiny-opt"
    assert card["tags"] == sorted(
        ["adaptc", "base_model:adapter:org/tiny-opt", "lora", "mine", "transformers"]
    )
    adaptc.save_adapter(model, out)
    assert (out / "README.md").read_text() == text  # saving again changes nothing


def test_card_in_a_directory_with_a_broken_readme(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("---\n[not: a mapping\n---\ntext\n")
    model = adaptc.compile(_named_opt("org/tiny-opt"), SPEC)
    with pytest.raises(ValueError, match=r"README\.md: cannot update the model card: .*remove it"):
        adaptc.save_adapter(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]  # nothing written


def test_write_model_card_for_named_adapters(tmp_path):
    spec = {"version": 1, "adapters": {"one": {"r": 2}, "two": {"method": "ia3"}}}
    model = adaptc.compile(_named_opt(str(tmp_path)), spec)  # a local path: no base_model
    path = adaptc.io.write_model_card(tmp_path / "card", model, adapters=["two"])
    card = _card(path.read_text())
    assert card == {"library_name": "peft", "tags": ["adaptc", "ia3", "transformers"]}
    assert "An IA3 adapter for its base model" in path.read_text()


def test_peft_model_push_to_hub_as_peft(hub, tmp_path):
    """The same user code with peft and with adaptc.peft: a PeftModel pushed, then loaded
    back by id with the other library."""
    server, _ = hub
    result = _run(
        hub,
        tmp_path,
        """
        import copy
        import adaptc.peft as ap
        out = {}
        for name, lib in (("peft", peft), ("adaptc", ap)):
            torch.manual_seed(0)
            model = lib.get_peft_model(copy.deepcopy(base), lib.LoraConfig(r=2,
                                       init_lora_weights=False))
            url = model.push_to_hub(f"org/{name}-pushed", commit_message="my message")
            out[name] = {"url": str(url), "logits": logits(model)}
        for name, lib in (("peft", peft), ("adaptc", ap)):  # a config alone
            lib.LoraConfig(r=4, target_modules=["q_proj"]).push_to_hub(f"org/{name}-config")
        out["adaptc_reads_peft"] = logits(ap.PeftModel.from_pretrained(base, "org/peft-pushed"))
        out["peft_reads_adaptc"] = logits(peft.PeftModel.from_pretrained(
            copy.deepcopy(base), "org/adaptc-pushed"))
        print(json.dumps(out))
    """,
        HF_TOKEN=TOKEN,
    )
    assert result["adaptc_reads_peft"] == pytest.approx(result["peft"]["logits"], abs=1e-6)
    assert result["peft_reads_adaptc"] == pytest.approx(result["adaptc"]["logits"], abs=1e-6)
    assert result["adaptc"]["url"].startswith(f"{server.url}/org/adaptc-pushed/commit/")
    assert ("org/adaptc-pushed", "my message") in server.commit_messages
    mine, theirs = server.files("org/adaptc-pushed"), server.files("org/peft-pushed")
    assert set(theirs) <= set(mine)  # peft's files, plus adaptc_spec.yaml
    assert _card(mine["README.md"])["library_name"] == "peft"
    configs = [server.files(f"org/{n}-config") for n in ("peft", "adaptc")]
    assert "adapter_config.json" in configs[0]  # (peft also pushes a stub README.md)
    assert set(configs[1]) == {"adapter_config.json"}
    theirs, ours = (json.loads(c["adapter_config.json"]) for c in configs)
    assert ours == theirs
