"""``adaptc inspect MODEL``: the layers of a model and the names that make good targets."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import TYPE_CHECKING, Any

from adaptc.cli._common import add_command, fail
from adaptc.cli.plan import CACHE_HELP
from adaptc.plan.defaults import LORA_TARGET_MODULES

if TYPE_CHECKING:
    from torch import nn


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = add_command(
        sub,
        "inspect",
        "Show a model's layer types, the layer names to target (with counts and shapes), its "
        "model type and PEFT's default targets for it. Built on the meta device: no weight "
        "is read.",
        """
        adaptc inspect ./checkpoints/opt-350m
        adaptc inspect meta-llama/Llama-2-7b-hf          # a hub id: its config.json only
        adaptc inspect llama-70b/config.json --json
        adaptc inspect mypkg.models:build
        """,
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="model directory, config.json, hub id, or package.module:factory",
    )
    p.add_argument(
        "--task-type",
        choices=("CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"),
        help="build the model with this task's head (default: the class in config.json's "
        "architectures, e.g. OPTForCausalLM -> CAUSAL_LM; else the bare model)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    p.add_argument("--cache-dir", metavar="DIR", help=CACHE_HELP)
    p.add_argument("--revision", metavar="REV", help="hub revision of MODEL (default: main)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # lazily: the library imports torch; the CLI starts without it
    from adaptc.models import build_model, resolve_model, saved_task_type

    try:
        ref = resolve_model(args.model, cache_dir=args.cache_dir, revision=args.revision)
        task_type = args.task_type or saved_task_type(ref)
        model = build_model(ref, task_type=task_type, meta=True)
    except ValueError as exc:
        return fail("inspect", str(exc))
    report = describe(model)
    if args.json:
        print(json.dumps({"model": args.model, "task_type": task_type, **report}, indent=2))
        return 0
    default = report["peft_default_targets"]
    print(f"model: {args.model}")
    print(
        f"class: {report['model_class']}  model_type: {report['model_type'] or '-'}  "
        f"task_type: {task_type or '-'}"
    )
    print(f"parameters: {report['parameters']:,}")
    shown = default if isinstance(default, str) else ", ".join(default or []) or None
    print(f"PEFT's default targets: {shown or '- (none for this model type: set targets)'}")
    if report["output_head"]:
        print(f"output head (left out of all-linear): {report['output_head']}")
    print("\nlayer types:")
    for row in report["layer_types"]:
        print(f"  {row['type']} ×{row['count']}")
    print("\ntarget names (kind: names):")
    rows = [
        (t["name"], f"×{t['count']}", t["type"], _shapes(t["shapes"])) for t in report["targets"]
    ]
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(4)]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not rows:
        print("  (no layer adaptc can adapt)")
    return 0


def describe(model: nn.Module) -> dict[str, Any]:
    """What ``inspect`` prints, as data."""
    from adaptc.methods.lora.method import rule_for  # lazily: it imports torch

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or None
    default = LORA_TARGET_MODULES.get(model_type) if model_type else None
    head = _output_head(model)
    types = Counter(type(m).__name__ for name, m in model.named_modules() if name)
    targets: dict[str, dict[str, Any]] = {}
    for path, module in model.named_modules():
        rule = rule_for(module)
        if not path or rule is None:
            continue
        leaf = path.rsplit(".", 1)[-1]
        entry = targets.setdefault(
            leaf, {"name": leaf, "count": 0, "type": rule.name, "shapes": []}
        )
        entry["count"] += 1
        if entry["type"] != rule.name and rule.name not in entry["type"].split(" | "):
            entry["type"] += f" | {rule.name}"
        shape = list(rule.features(module))
        if shape not in entry["shapes"]:
            entry["shapes"].append(shape)
    return {
        "model_class": type(model).__name__,
        "model_type": model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "peft_default_targets": list(default) if isinstance(default, tuple) else default,
        "output_head": head,
        "layer_types": [{"type": t, "count": n} for t, n in types.most_common()],
        "targets": list(targets.values()),
    }


def _output_head(model: nn.Module) -> str | None:
    from torch import nn

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return None
    return next((k for k, m in model.named_modules() if m is head), None)


def _shapes(shapes: list[list[int]]) -> str:
    if len(shapes) > 3:
        return f"{len(shapes)} shapes"
    return ", ".join(f"{i}→{o}" for i, o in shapes)
