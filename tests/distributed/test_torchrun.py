"""Two CPU processes (gloo) train an adaptc adapter as one process does, and rank 0 saves it.

Each launch runs ``train_script.py`` on two ranks for the custom MLP and a tiny Llama; the
script itself asserts a frozen base, an adapter-only trainable set, a falling loss and
identical adapters on both ranks. Here the adapter rank 0 saved is compared with the one
a single process trains on the same global batches: same keys, same tensors, same outputs.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import adaptc
from tests.conftest import ROOT
from tests.distributed import train_script

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed/gloo"
)

SCRIPT = ROOT / "tests" / "distributed" / "train_script.py"
MODELS = ("mlp", "llama")
STEPS = 30
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launcher(name: str, port: int) -> list[str]:
    if name == "accelerate":
        # `--cpu` runs one process (accelerate's multi-CPU launch needs mpirun); `--multi_gpu`
        # starts torchrun-style workers, and `Accelerator(cpu=True)` makes them MULTI_CPU/gloo.
        return [
            *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"),
            *("--num_processes", "2", "--num_machines", "1", "--main_process_port", str(port)),
            *("--mixed_precision", "no", "--dynamo_backend", "no"),
        ]
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_addr", "127.0.0.1", "--master_port", str(port)),
    ]


def _launch(launcher: str, wrap: str, out: Path) -> str:
    command = [
        *_launcher(launcher, _free_port()),
        str(SCRIPT),
        *("--models", *MODELS, "--wrap", wrap, "--steps", str(STEPS), "--out", str(out)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if launcher == "accelerate":  # no user `accelerate config` file may change the launch
        env["HF_HOME"] = str(out / "hf_home")
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{launcher} --wrap {wrap} ran past {TIMEOUT_S}s:\n{_tail(e.stdout, e.stderr)}")
    if done.returncode != 0:
        lines = (done.stdout + done.stderr).splitlines()
        failures = [line for line in lines if re.match(r"rank \d+: ", line)] or [
            line for line in lines if re.match(r"\w+(Error|Exception): ", line)
        ]
        pytest.fail(
            f"{launcher} --wrap {wrap} exited with {done.returncode}: "
            f"{'; '.join(failures[:4]) or 'see below'}\n{_tail(done.stdout, done.stderr)}",
            pytrace=False,
        )
    return done.stdout


def _tail(*streams: Any, lines: int = 30) -> str:
    text = "\n".join(s.decode() if isinstance(s, bytes) else (s or "") for s in streams)
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One process, the whole global batch, the same steps: what two ranks must reproduce."""
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {
            kind: {**train_script.train(kind, "none", STEPS, out / kind), "dir": out / kind}
            for kind in MODELS
        }
    finally:
        torch.set_num_threads(threads)


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    data = train_script.batch(kind, 999)
    return {"x": data["x"]} if kind == "mlp" else {"input_ids": data["input_ids"]}


def _outputs(directory: Path, kind: str) -> torch.Tensor:
    model = adaptc.load_adapter(train_script.build_base(kind), directory).eval()
    with torch.no_grad():
        out = model(**_inputs(kind))
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize(
    ("launcher", "wrap"),
    [("torchrun", "ddp"), ("torchrun", "fsdp"), ("accelerate", "accelerate")],
)
def test_two_ranks_train_the_single_process_adapter(
    launcher: str, wrap: str, tmp_path: Path, reference: dict[str, dict[str, Any]]
) -> None:
    stdout = _launch(launcher, wrap, tmp_path)
    for kind in MODELS:
        assert f"{kind} {wrap}: loss" in stdout
        saved = tmp_path / kind
        assert {p.name for p in saved.iterdir()} >= {
            "adapter_model.safetensors",
            "adapter_config.json",
            "adaptc_spec.yaml",
        }
        expected = reference[kind]["adapter"]
        tensors = load_file(saved / "adapter_model.safetensors")
        assert tensors.keys() == expected.keys()
        for key, tensor in tensors.items():
            assert tensor.numel() > 0, f"{key} was saved empty"
            torch.testing.assert_close(tensor, expected[key], rtol=1e-4, atol=1e-5, msg=key)
        losses = json.loads((saved / "losses.json").read_text(encoding="utf-8"))
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(reference[kind]["losses"]), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            _outputs(saved, kind), _outputs(reference[kind]["dir"], kind), rtol=1e-4, atol=1e-5
        )
