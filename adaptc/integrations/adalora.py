"""AdaLoRA's rank allocation during training: :func:`update_and_allocate` and, for
transformers' ``Trainer``, :class:`AdaLoraCallback`, which calls it for you.

PEFT's ``AdaLoraModel.update_and_allocate`` is to be called "in every training step after
``loss.backward()`` and before ``zero_grad()``" (its example: after ``optimizer.step()``),
with the step's index from 0. The callback does so in ``on_optimizer_step`` (after the
optimizer's step, before the trainer's ``zero_grad``), with ``state.global_step``, which
the trainer increments only afterwards: the same indices as PEFT's example loop.

Each new rank pattern is written into the compiled model's spec (``rank_pattern``), so
``adaptc.save_adapter`` writes it to ``adapter_config.json`` and cuts the saved factors to
the kept triplets, as PEFT does.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from adaptc.compiler.state import Compiled, compiled
from adaptc.methods.adalora.allocate import AdaLoraState
from adaptc.methods.adalora.allocate import update_and_allocate as _allocate
from adaptc.methods.adalora.method import STATE, adalora_branches

__all__ = ["AdaLoraCallback", "adalora_states", "update_and_allocate"]  # noqa: F822 (lazy)


def _root(model: nn.Module) -> nn.Module:
    """The compiled model behind ``model`` (an ``adaptc.peft`` PeftModel's base model)."""
    model = getattr(model, "_orig_mod", model)
    get_base = getattr(model, "get_base_model", None)
    if STATE not in model.__dict__ and callable(get_base):
        base = get_base()
        if isinstance(base, nn.Module):
            return getattr(base, "_orig_mod", base)
    return model


def adalora_states(model: nn.Module) -> dict[str, AdaLoraState]:
    """The AdaLoRA adapters' allocator states of a compiled model, by adapter name."""
    root = _root(model)
    states: dict[str, AdaLoraState] = root.__dict__.get(STATE, {})
    info = compiled(root, "update_and_allocate()")
    return {name: s for name, s in states.items() if name in info.spec.adapters}


def update_and_allocate(model: nn.Module, global_step: int) -> int | None:
    """Update the importance scores of the model's AdaLoRA adapters and mask their
    least important triplets to the step's budget (PEFT's ``update_and_allocate``).

    Call it after ``loss.backward()`` (and ``optimizer.step()``), before ``zero_grad()``,
    with the step index from 0. Returns the step's total rank budget (of the last AdaLoRA
    adapter), None when no budget was computed. Raises ValueError for a model without
    AdaLoRA adapters."""
    root = _root(model)
    info = compiled(root, "update_and_allocate()")
    states = adalora_states(root)
    if not states:
        raise ValueError("update_and_allocate() takes a model with an AdaLoRA adapter")
    budget: int | None = None
    for name, state in states.items():
        new = _allocate(state, adalora_branches(root, name), global_step)
        budget = state.budget
        if new is not None:
            _set_rank_pattern(info, name, new)
    return budget


def _set_rank_pattern(info: Compiled, name: str, pattern: dict[str, tuple[bool, ...]]) -> None:
    adapters = dict(info.spec.adapters)
    adapters[name] = adapters[name].model_copy(update={"rank_pattern": dict(pattern)})
    info.spec = info.spec.with_adapters(adapters)


def _make_callback() -> type:
    # transformers' trainer_callback loads only when the callback is first used
    from transformers import TrainerCallback

    class AdaLoraCallback(TrainerCallback):
        """A ``transformers.TrainerCallback`` that runs :func:`update_and_allocate` after
        every optimizer step (before the trainer's ``zero_grad``)::

            trainer = Trainer(model=model, ..., callbacks=[AdaLoraCallback()])
        """

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs.get("model")
            if isinstance(model, nn.Module):
                update_and_allocate(model, int(state.global_step))

    AdaLoraCallback.__module__ = __name__
    return AdaLoraCallback


_CALLBACK: list[type] = []


def __getattr__(name: str) -> Any:
    if name == "AdaLoraCallback":
        if not _CALLBACK:
            _CALLBACK.append(_make_callback())
        return _CALLBACK[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
