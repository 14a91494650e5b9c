"""transformers' ``Trainer`` (and trl's trainers, its subclasses) with adaptc models.

A compiled model trains with a ``Trainer`` as a PEFT model does: only the adapter is
trainable, checkpoints and ``trainer.save_model()`` hold only the adapter (PEFT's files,
``adaptc_spec.yaml`` beside them), and ``train(resume_from_checkpoint=...)`` puts the
saved adapter back into the model being trained. Two things make it so, with no set-up:

- :func:`on_compile` gives a compiled transformers model (never the user's input model)
  its own ``save_pretrained``, which writes the adapter with ``adaptc.save_adapter``
  (as transformers' ``save_pretrained`` does for a model with an adapter loaded);
  :func:`on_merge` takes it away again, so a merged model saves in full.
- ``Trainer`` decides what to save and load by ``isinstance(model, peft.PeftModel)``,
  which an adaptc model is not. :func:`patch_trainer` wraps three of its methods
  (``_save``, ``_load_from_checkpoint``, ``_load_best_model``): for an adaptc model
  (a compiled model, or an ``adaptc.peft`` ``PeftModel``) they save and load the adapter,
  for every other model they call the original. It runs once, when the first model is
  compiled, or later, when ``transformers.trainer`` is first imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adaptc.adapters.keys import adapter_tensors
from adaptc.compiler import compiled_info
from adaptc.io.load import load_weights
from adaptc.io.save import save_adapter

__all__ = [
    "AdapterSavePretrained",
    "adapted_model",
    "load_in_place",
    "on_compile",
    "on_merge",
    "patch_trainer",
    "save",
]

_TRAINER_MODULE = "transformers.trainer"
_PATCHED = "_adaptc_patched"
_WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# full-model files: a checkpoint holding one was not written by adaptc; transformers loads it
_FULL_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def on_compile(model: nn.Module) -> None:
    """Called by ``adaptc.compile`` on the new model it returns."""
    if _is_pretrained_model(model):
        model.__dict__["save_pretrained"] = AdapterSavePretrained(model)
    patch_trainer()


def on_merge(model: nn.Module) -> None:
    """Called by ``adaptc.merge`` on the new, merged model: it saves in full again."""
    if isinstance(model.__dict__.get("save_pretrained"), AdapterSavePretrained):
        del model.__dict__["save_pretrained"]


class AdapterSavePretrained:
    """``model.save_pretrained(directory)`` on a compiled model: its adapters, as PEFT saves
    them (``adaptc.save_adapter``), never the base weights.

    Takes transformers' keywords: ``is_main_process`` (other processes write nothing),
    ``state_dict`` (the adapter tensors are taken from it, by the model's parameter names,
    when a trainer gathered them, as with DeepSpeed or FSDP), ``selected_adapters`` (PEFT's).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model  # a plain reference: deepcopy and pickle give the copy's own

    def __call__(
        self,
        save_directory: str | os.PathLike[str],
        *,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        safe_serialization: bool = True,
        selected_adapters: Sequence[str] | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        model = self.model
        if not safe_serialization:
            raise ValueError("adaptc writes safetensors only (safe_serialization=False refused)")
        if push_to_hub:
            raise ValueError("adaptc does not upload: save, then push the directory yourself")
        if is_main_process:
            save(model, save_directory, state_dict=state_dict, adapters=selected_adapters)


def save(
    model: nn.Module,
    directory: str | os.PathLike[str],
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapters: Sequence[str] | None = None,
) -> Path:
    """``adaptc.save_adapter``, with the adapter tensors taken from ``state_dict`` if given."""
    target = save_adapter(model, directory, adapters=adapters)
    if state_dict is None:
        return target
    info = compiled_info(model)
    assert info is not None
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    for adapter in adapters if adapters is not None else info.spec.adapters:
        tensors = {}
        for key, tensor in adapter_tensors(model, adapter):
            value = _lookup(state_dict, names.get(id(tensor), key))
            tensors[key] = (tensor if value is None else value).detach().contiguous().cpu()
        folder = target if adapter == "default" else target / adapter
        save_file(tensors, str(folder / _WEIGHTS_FILES[0]), metadata={"format": "pt"})
    return target


def _lookup(state_dict: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """``name`` in a state dict taken from the model or from a wrapper around it."""
    if name in state_dict:
        return state_dict[name]
    found = [v for k, v in state_dict.items() if k.endswith(f".{name}")]
    return found[0] if len(found) == 1 else None


def adapted_model(model: nn.Module) -> nn.Module | None:
    """The compiled model inside ``model`` (itself, or an ``adaptc.peft`` ``PeftModel``'s)."""
    if compiled_info(model) is not None:
        return model
    if callable(getattr(type(model), "get_base_model", None)):
        inner = model.get_base_model()  # type: ignore[operator]
        if isinstance(inner, nn.Module) and compiled_info(inner) is not None:
            return inner
    return None


def load_in_place(model: nn.Module, checkpoint: str | os.PathLike[str]) -> list[str]:
    """Copy the adapters saved in ``checkpoint`` into ``model``'s own tensors.

    The parameters stay the same objects (an optimizer built on them stays valid) and keep
    their ``requires_grad``. Returns the names of the adapters loaded.
    """
    compiled = adapted_model(model)
    info = compiled_info(compiled) if compiled is not None else None
    if compiled is None or info is None:
        raise ValueError("load_in_place() takes a model compiled by adaptc")
    loaded = []
    with torch.no_grad():
        for name in info.spec.adapters:
            folder = Path(checkpoint) if name == "default" else Path(checkpoint) / name
            if any((folder / f).is_file() for f in _WEIGHTS_FILES):
                load_weights(compiled, name, folder)
                loaded.append(name)
    if not loaded:
        raise ValueError(
            f"{checkpoint} holds none of the model's adapters ({', '.join(info.spec.adapters)})"
        )
    return loaded


def _holds_adapter_only(checkpoint: str | os.PathLike[str]) -> bool:
    folder = Path(checkpoint)
    if not folder.is_dir():
        return False
    return not any((folder / f).is_file() for f in _FULL_FILES) and (
        any((folder / f).is_file() for f in _WEIGHTS_FILES)
        or any(p.is_dir() and (p / _WEIGHTS_FILES[0]).is_file() for p in folder.iterdir())
    )


# --- transformers.Trainer -------------------------------------------------------------------
def patch_trainer() -> None:
    """Teach ``transformers.Trainer`` to save and resume adaptc models (idempotent).

    Patches now if ``transformers.trainer`` is imported, else when it is first imported
    (it is not imported here: it takes a second).
    """
    module = sys.modules.get(_TRAINER_MODULE)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(MetaPathFinder):
    """Finds nothing itself: patches ``transformers.trainer`` right after it is executed."""

    def __init__(self) -> None:
        self._busy = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != _TRAINER_MODULE or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            _patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _patch(module: ModuleType) -> None:
    trainer = module.Trainer
    if trainer.__dict__.get(_PATCHED):
        return
    for name, wrapper in _WRAPPERS.items():
        original = getattr(trainer, name, None)
        if original is not None:
            setattr(trainer, name, wrapper(original))
    setattr(trainer, _PATCHED, True)


def _wrap_save(original: Callable[..., None]) -> Callable[..., None]:
    def _save(self: Any, output_dir: str | None = None, state_dict: Any = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        compiled = adapted_model(model)
        if compiled is None or _is_pretrained_model(model):  # the latter: its save_pretrained
            original(self, output_dir, state_dict)
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save(compiled, output_dir, state_dict=state_dict)
        _save_extras(self, output_dir)

    _save.__doc__ = original.__doc__
    return _save


def _save_extras(trainer: Any, output_dir: str) -> None:
    """What ``Trainer._save`` writes beside the model: the tokenizer, the arguments."""
    from transformers.trainer import TRAINING_ARGS_NAME

    tokenizer = trainer.processing_class
    if tokenizer is None:
        tokenizer = getattr(trainer.data_collator, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    torch.save(trainer.args, os.path.join(output_dir, TRAINING_ARGS_NAME))


def _wrap_load_from_checkpoint(original: Callable[..., None]) -> Callable[..., None]:
    def _load_from_checkpoint(
        self: Any, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        target = self.model if model is None else model
        unwrapped = self.accelerator.unwrap_model(target, keep_torch_compile=False)
        if adapted_model(unwrapped) is None or not _holds_adapter_only(resume_from_checkpoint):
            original(self, resume_from_checkpoint, model)
            return
        load_in_place(unwrapped, resume_from_checkpoint)

    _load_from_checkpoint.__doc__ = original.__doc__
    return _load_from_checkpoint


def _wrap_load_best_model(original: Callable[..., None]) -> Callable[..., None]:
    def _load_best_model(self: Any) -> None:
        best = self.state.best_model_checkpoint
        unwrapped = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if adapted_model(unwrapped) is None or best is None or not _holds_adapter_only(best):
            original(self)
            return
        load_in_place(unwrapped, best)

    _load_best_model.__doc__ = original.__doc__
    return _load_best_model


_WRAPPERS: dict[str, Callable[[Callable[..., None]], Callable[..., None]]] = {
    "_save": _wrap_save,
    "_load_from_checkpoint": _wrap_load_from_checkpoint,
    "_load_best_model": _wrap_load_best_model,
}


def _is_pretrained_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a transformers model implies it is loaded
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)
