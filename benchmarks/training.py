"""Training rows of ``make bench`` beyond the eager step (``cases.train_step``):

- ``torch-compile-train-step``: the same AdamW step as ``train-step-dropout0`` on both
  models wrapped in ``torch.compile`` (compilation done in the untimed warm-up), adaptc /
  peft;
- ``saved-for-backward-dropout{0,0.1}``: the MiB of activations one training forward saves
  for backward (``adaptc.compiler.memory.held_bytes``; each storage counted once,
  the model's own parameters and buffers not counted), adaptc / peft; ``base`` is the
  frozen base model's own activations (its input embeddings made to require grad). The
  outputs (logits, loss) are counted too: the same for every model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from cases import Settings, median_times, pair, row, stepper, train_inputs


def compiled_train_step(s: Settings) -> dict[str, Any]:
    _, theirs, ours = pair(s)
    x = train_inputs(s)
    torch._dynamo.reset()
    steps = {who: _compiled_step(who, model, x) for who, model in (("adaptc", ours),
                                                                   ("peft", theirs))}  # fmt: skip
    t = median_times(steps, replace(s, warmup=max(2, s.warmup)))  # compile, recompiles
    ratio = t["adaptc"] / t["peft"]
    return row("torch-compile-train-step", "s", t["adaptc"], t["peft"], None, ratio, "<=0.95")


def _compiled_step(
    who: str, model: torch.nn.Module, x: dict[str, torch.Tensor]
) -> Callable[[], None]:
    """The training step of ``torch.compile(model)``, run once here so that a model
    torch.compile cannot handle fails with its library's name."""
    step = stepper(torch.compile(model), x)
    try:
        step()
    except Exception as exc:
        raise RuntimeError(f"torch.compile of the {who} model failed in training: {exc}") from exc
    return step


def saved_for_backward(s: Settings, dropout: float) -> dict[str, Any]:
    base, theirs, ours = pair(s, dropout)
    x = train_inputs(s)
    mib = {who: saved_bytes(model, x) / 2**20 for who, model in (("adaptc", ours),
                                                                 ("peft", theirs))}  # fmt: skip
    base.requires_grad_(False)  # last: the base shares its weights with the adaptc model
    base.enable_input_require_grads()  # else a frozen model saves nothing
    mib_base = saved_bytes(base, x) / 2**20
    base.disable_input_require_grads()
    name, target = f"saved-for-backward-dropout{dropout:g}", "<=0.9" if dropout == 0 else "<=0.8"
    return row(name, "MiB", mib["adaptc"], mib["peft"], mib_base, mib["adaptc"] / mib["peft"],
               target)  # fmt: skip


def saved_bytes(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages one training forward of ``model`` on ``x`` (with
    labels) leaves alive for backward (and its outputs), less the model's parameters and
    buffers (:func:`adaptc.compiler.memory.held_bytes`: a saved-tensor hook would make
    adaptc's rematerialising passes step aside)."""
    from adaptc.compiler.memory import held_bytes

    model.train()
    held, out = held_bytes(
        lambda: model(**x, labels=x["input_ids"]), [*model.parameters(), *model.buffers()]
    )
    del out
    return held
