"""``make bench``: adaptc against peft on the same work, side by side, in one run.

Usage: python benchmarks/run.py [--quick] [--device cpu|cuda] [--dtype fp32|bf16]
       [--only NAME...] [--skip NAME...] [--results FILE] [--doc FILE] [--chart FILE]
       [--repeat N] [--warmup N] [--hidden N] [--layers N] [--train-batch N]
       [--train-seq N] [--keep-going]
Writes ``benchmarks/results.json`` (a list of rows ``{name, unit, adaptc, peft, base,
ratio, target, met}``), the table in ``docs/benchmarks.md`` (with the machine and the
versions) and a chart of each ratio against its target (PNG). ``--quick`` uses fewer
repetitions and gives the same rows. The files are rewritten after every row, so a run
cut short still leaves the rows it finished. ``--keep-going`` records a failing row
(``error``) and goes on to the next one. ``docs/benchmarks.md`` ends with
``benchmarks/profile-summary.md`` when that file exists (``benchmarks/op_profile.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import Settings, all_cases  # noqa: E402

ROOT = HERE.parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, same rows")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--only", nargs="*", help="run only rows whose name starts with these")
    parser.add_argument("--skip", nargs="*", help="skip rows whose name starts with these")
    parser.add_argument("--results", default=str(HERE / "results.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--chart", default=str(ROOT / "docs" / "benchmarks.png"))
    parser.add_argument("--repeat", type=int, help="timed repetitions (default 10, quick 3)")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default 2, quick 1)")
    parser.add_argument("--hidden", type=int, help="model width (cpu 512, cuda 2048)")
    parser.add_argument("--layers", type=int, help="model depth (cpu 6, cuda 16)")
    parser.add_argument("--train-batch", type=int, help="training rows' batch (default 2)")
    parser.add_argument("--train-seq", type=int, help="training rows' length (default 128)")
    parser.add_argument("--keep-going", action="store_true", help="record a failing row, go on")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    size = {"hidden": 2048, "layers": 16} if args.device == "cuda" else {}
    size.update({k: getattr(args, k) for k in ("hidden", "layers", "train_batch", "train_seq")
                 if getattr(args, k)})  # fmt: skip
    settings = Settings(
        repeat=args.repeat or (3 if args.quick else 10),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        device=args.device, dtype=dtype, **size,
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    for name, case in all_cases(settings):
        if args.only and not any(name.startswith(p) for p in args.only):
            continue
        if args.skip and any(name.startswith(p) for p in args.skip):
            continue
        try:
            produced = case()
        except Exception as exc:
            if not args.keep_going:
                raise
            traceback.print_exc()
            produced = {"name": name, "unit": "", "adaptc": None, "peft": None, "base": None,
                        "ratio": None, "target": "", "met": None,
                        "error": f"{type(exc).__name__}: {exc}"[:500]}  # fmt: skip
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        for row in produced if isinstance(produced, list) else [produced]:  # a case: 1+ rows
            rows.append(row)
            print(json.dumps(row), flush=True)
        write(rows, args, settings, time.perf_counter() - start)
    elapsed = time.perf_counter() - start
    write(rows, args, settings, elapsed)
    print(f"wrote {args.results}, {args.doc}, {args.chart} in {elapsed:.0f} s")


def write(
    rows: list[dict[str, Any]], args: argparse.Namespace, s: Settings, elapsed: float
) -> None:
    Path(args.results).write_text(json.dumps(rows, indent=2) + "\n")
    Path(args.doc).write_text(markdown(rows, args, s, elapsed))
    chart(rows, Path(args.chart))


def markdown(
    rows: list[dict[str, Any]], args: argparse.Namespace, s: Settings, elapsed: float
) -> str:
    import peft
    import transformers

    import adaptc

    command = "python benchmarks/run.py" + "".join(
        f" --{k} {getattr(args, k)}"
        for k in ("device", "dtype")
        if getattr(args, k) != _DEFAULTS[k]
    )
    device = args.device
    if args.device == "cuda" and torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})"
    lines = [
        "# Benchmarks: adaptc against peft",
        "",
        f"Generated by `{command}`; do not edit by hand."
        if command != "python benchmarks/run.py"
        else "Generated by `make bench` (`python benchmarks/run.py`); do not edit by hand.",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{device}, {args.dtype}, {torch.get_num_threads()} threads",
        f"- versions: adaptc {adaptc.__version__}, peft {peft.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}",
        "- model: Llama-style config (see `benchmarks/cases.py`), targets q/k/v/o + MLP, r 16"
        + ("" if _default_size(args, s) else f", hidden {s.hidden}, {s.layers} layers")
        + (
            ""
            if (s.train_batch, s.train_seq) == (Settings.train_batch, Settings.train_seq)
            else f", training batch {s.train_batch} × {s.train_seq} tokens"
        )
        + f"; {'quick run' if args.quick else 'full run'}, {elapsed:.0f} s",
        "- ratio: adaptc / peft (overhead rows: adaptc's overhead over the base model / "
        "peft's); merged row: merged / base",
        "- mixed rows: one batch of 8 samples, one per adapter (ranks 8 to 32, padded); "
        "`mixed-batch`: adaptc's mixed batch / peft's `adapter_names`; `mixed-vs-single`: "
        "the mixed batch / the same batch on one adapter (the base column)",
        "- qlora rows: the same Llama loaded 4-bit (bitsandbytes nf4, double quant), the same "
        "adapter for both libraries (`benchmarks/qlora.py`); `qlora-weights-vs-lora`: the "
        "bytes the compiled 4-bit model holds / the same adapter on the float model",
        "- saved-for-backward rows: the MiB of activations one training forward keeps for "
        "backward (each storage once, the model's weights not counted); base: the frozen base "
        "model's own; `torch-compile-train-step`: the train step of both models under "
        "`torch.compile`, compilation in the untimed warm-up",
        *(
            ["- GPU figures (H200, bf16, Llama-1B shape): [benchmarks-cuda.md](benchmarks-cuda.md)"]
            if args.device == "cpu" and (Path(args.doc).parent / "benchmarks-cuda.md").is_file()
            else []
        ),
        "",
        "| benchmark | unit | adaptc | peft | base | ratio | target | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [_fmt(r.get(k)) for k in ("adaptc", "peft", "base", "ratio")]
        met = {True: "yes", False: "**no**", None: "—"}[r["met"]]
        if "error" in r:
            met = f"error: {r['error'].splitlines()[0][:120]}"
        lines.append(f"| {r['name']} | {r['unit']} | {' | '.join(cells)} | {r['target']} | {met} |")
    lines += ["", f"![ratios against their targets]({Path(args.chart).name})", ""]
    return "\n".join(lines + (profile_summary() if args.device == "cpu" else []))  # a CPU profile


def profile_summary(path: Path = HERE / "profile-summary.md") -> list[str]:
    """The profiler's summary (``benchmarks/profile-summary.md``, written by
    ``benchmarks/op_profile.py``) as a section, or nothing when there is none."""
    if not path.is_file():
        return []
    body = path.read_text().strip().splitlines()
    if body and body[0].startswith("# "):  # the file's own title: the heading replaces it
        body = body[1:]
    return ["## Profile (torch.profiler)", "",
            "From `benchmarks/profile-summary.md`, written by `python benchmarks/op_profile.py` "
            "(run on its own, by hand: its figures come from that run, not from this table's).",
            *body, ""]  # fmt: skip


_DEFAULTS = {"device": "cpu", "dtype": "fp32"}


def _default_size(args: argparse.Namespace, s: Settings) -> bool:
    """The CPU run's model (whose doc line names no size)."""
    return args.device == "cpu" and (s.hidden, s.layers) == (Settings.hidden, Settings.layers)


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and abs(x) >= 1e5:
        return f"{x:,.0f}"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["ratio"] is not None]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(shown) + 1.2))
    names = [r["name"] for r in shown]
    ratios = [r["ratio"] for r in shown]
    colors = ["tab:green" if r["met"] else "tab:red" for r in shown]
    ax.barh(names, ratios, color=colors)
    for i, r in enumerate(shown):
        target = 1.0 if r["target"].startswith("1.00") else float(r["target"].removeprefix("<="))
        ax.plot([target, target], [i - 0.4, i + 0.4], color="black", linewidth=2)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (adaptc / peft; merged: merged / base) — black: target")
    ax.set_title("adaptc vs peft")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
