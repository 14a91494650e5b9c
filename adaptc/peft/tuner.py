"""PEFT's ``LoraModel`` over an adaptc-compiled model (``peft_model.base_model``).

:class:`LoraModel` holds the compiled model as ``model`` (so parameter names start with
``base_model.model.`` as in PEFT) and the user's untouched model beside it. Besides
``forward`` (with PEFT's ``adapter_names`` for mixed batches) and attribute look-ups that
fall through to ``model``, it has:

- the active adapters: ``set_adapter`` (the others freeze), ``disable_adapter_layers`` /
  ``enable_adapter_layers`` and the ``disabled()`` context;
- adding or loading adapters (:meth:`LoraModel.add_compiled`, used by ``PeftModel``'s
  ``add_adapter`` and ``load_adapter``): the untouched model is compiled anew with every
  adapter and the trained weights are carried over (:func:`assemble`, which never writes
  a tensor shared with the untouched model);
- ``delete_adapter`` and ``add_weighted_adapter`` (:mod:`adaptc.peft.combine`), which change
  the compiled model in place;
- merging: ``merge_and_unload`` and ``unload`` return a new model and this one stays
  valid; ``merge_adapter`` / ``unmerge_adapter`` (in place) raise ``NotSupportedError``.

Also the helpers the other facade modules share: :func:`config_of` (the ``LoraConfig`` PEFT
would hold for an adapter of a compiled model), :func:`freeze` and :func:`unsupported`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from adaptc.adapters import disabled, set_active
from adaptc.adapters.keys import adapter_tensors
from adaptc.adapters.manage import delete_adapter as core_delete_adapter
from adaptc.api import compile, merge
from adaptc.compiler import compiled_info
from adaptc.compiler.saved import ModulesToSave
from adaptc.methods.base import Branch
from adaptc.peft.combine import add_weighted_adapter
from adaptc.peft.config import LoraConfig, NotSupportedError, config_of
from adaptc.peft.forward import first_input, special_forward
from adaptc.spec import Spec

__all__ = ["LoraModel", "config_of", "freeze", "unsupported"]


def unsupported(what: str, value: Any, hint: str = "") -> NotSupportedError:
    return NotSupportedError(f"{what}={value!r} is not supported by adaptc{hint}")


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


class LoraModel(nn.Module):
    """PEFT's ``LoraModel(model, config, adapter_name)``: compiles a *new* model.

    ``model`` is left untouched (PEFT injects into it); the adapted model is ``.model``.
    Attributes it does not have are looked up on ``.model`` (``config``, ``generate``, …).
    """

    prefix = "lora_"

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig | dict[str, LoraConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        if low_cpu_mem_usage:
            raise unsupported(
                "low_cpu_mem_usage", True, " (adapter weights are always initialised)"
            )
        cfg = config[adapter_name] if isinstance(config, dict) else config
        compiled = compile(model, cfg.to_spec(adapter_name))
        if cfg.inference_mode:
            freeze(compiled)
        self._install(compiled, model, {adapter_name: cfg})

    @classmethod
    def from_compiled(
        cls, compiled: nn.Module, original: nn.Module, configs: dict[str, LoraConfig]
    ) -> LoraModel:
        """Wrap a model adaptc already compiled from ``original``."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._install(compiled, original, configs)
        return self

    def _install(
        self, compiled: nn.Module, original: nn.Module, configs: dict[str, LoraConfig]
    ) -> None:
        self.model = compiled
        self.__dict__["_original"] = original  # not a submodule: its weights are not ours
        self.__dict__["_enabled"] = True
        self.peft_config: dict[str, LoraConfig] = configs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if "adapter_names" not in kwargs:
            return self.model(*args, **kwargs)
        with special_forward(self.model, kwargs, first_input(args, kwargs)):
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # --- active adapters -------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        info = compiled_info(self.model)
        return list(info.active) if info is not None else []

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        """Activate the adapter(s); they train unless ``inference_mode``, the others freeze."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found (has: {', '.join(self.peft_config)}).")
        set_active(self.model, names)
        for adapter in self.peft_config:
            trainable = adapter in names and not inference_mode
            for p in adapter_parameters(self.model, adapter):
                p.requires_grad_(trainable)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone until :meth:`enable_adapter_layers`; as in PEFT, the
        adapters' weights stop requiring grad meanwhile."""
        if self.__dict__["_enabled"]:
            self.__dict__["_enabled"] = tuple(self.active_adapters)
            set_active(self.model, [])
            self._branches_require_grad(())

    def enable_adapter_layers(self) -> None:
        """Run the adapters again; as PEFT's, the active ones' weights require grad again
        and the others' do not."""
        previous = self.__dict__["_enabled"]
        if previous is not True:
            set_active(self.model, list(previous))
            self.__dict__["_enabled"] = True
            self._branches_require_grad(tuple(previous))

    def _branches_require_grad(self, adapters: tuple[str, ...]) -> None:
        for module in self.model.modules():
            if isinstance(module, Branch):
                module.requires_grad_(module.adapter in adapters)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        svd_full_matrices: bool = True,
        svd_driver: str | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
    ) -> None:
        """PEFT's ``add_weighted_adapter`` (docs/combining.md): a new, inactive adapter."""
        add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type, svd_rank,
            svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method,
        )  # fmt: skip

    @contextmanager
    def disabled(self) -> Iterator[None]:
        with disabled(self.model):
            yield

    # --- merging: always a new model ---------------------------------------------------
    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """A new plain model with the adapters folded in; this model stays valid.

        ``progressbar`` is accepted and shows nothing (merging is one pass).
        """
        del progressbar
        return merge(self.model, adapters=adapter_names, safe=safe_merge)

    def unload(self) -> nn.Module:
        """A new plain model without the adapters (``modules_to_save`` copies kept, as PEFT)."""
        return merge(self.model, adapters=[], safe=False)

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        raise NotSupportedError(
            "merge_adapter (merging in place) is not supported by adaptc: "
            "merge_and_unload() returns a new merged model and this one stays valid"
        )

    def unmerge_adapter(self) -> None:
        raise NotSupportedError(
            "unmerge_adapter is not supported by adaptc: adaptc never merges in place, "
            "so there is nothing to undo"
        )

    # --- adapters: recompile and carry the weights over --------------------------------
    def add_compiled(self, source: nn.Module, renames: dict[str, str]) -> None:
        """Add the adapters of ``source`` (compiled from the same base), renamed as given."""
        clash = sorted(set(renames.values()) & set(self.peft_config))
        if clash:
            raise ValueError(f"the model already has an adapter called {clash[0]!r}")
        current = [(self.model, n, n) for n in self.peft_config]
        added = [(source, old, new) for old, new in renames.items()]
        configs = dict(self.peft_config)
        for old, new in renames.items():
            configs[new] = config_of(source, old, inference_mode=False)
            configs[new].inference_mode = not any(
                p.requires_grad for p in adapter_parameters(source, old)
            )
        self._rebuild([*current, *added], configs)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if len(self.peft_config) == 1:
            raise ValueError("cannot delete the only adapter (use unload() for the base model)")
        core_delete_adapter(self.model, adapter_name)  # in place: other parameters stay
        self.peft_config = {k: v for k, v in self.peft_config.items() if k != adapter_name}

    def _rebuild(
        self, parts: list[tuple[nn.Module, str, str]], configs: dict[str, LoraConfig]
    ) -> None:
        old = self.model
        info = compiled_info(old)
        assert info is not None
        active = [a for a in info.active if a in configs] or [parts[0][2]]
        new = assemble(self.__dict__["_original"], parts, info.spec)
        device = next((p.device for p in old.parameters()), None)
        if device is not None and any(p.device != device for p in new.parameters()):
            new.to(device)  # the adapted model was moved (`.to("cuda")`): follow it
        set_active(new, active)
        new.train(old.training)
        self._install(new, self.__dict__["_original"], configs)


def assemble(original: nn.Module, parts: list[tuple[nn.Module, str, str]], like: Spec) -> nn.Module:
    """Compile ``original`` with the adapters ``(model, name, new name)`` and copy their weights.

    Tensors shared with ``original`` are never written: a tensor that must differ from it
    gets its own storage in the new model.
    """
    adapters = {}
    for model, name, new_name in parts:
        info = compiled_info(model)
        assert info is not None
        adapters[new_name] = info.spec.adapters[name]
    spec = Spec(version=1, task_type=like.task_type, base_model=like.base_model, adapters=adapters)
    new = compile(original, spec)
    originals = _storages(original)
    with torch.no_grad():
        for model, name, new_name in parts:
            theirs = dict(adapter_tensors(model, name))
            for key, mine in adapter_tensors(new, new_name):
                _carry(mine, theirs[key], originals)
    return new


def _carry(mine: torch.Tensor, theirs: torch.Tensor, originals: set[int]) -> None:
    if mine.is_meta or _storage(mine) == _storage(theirs):
        pass
    elif _storage(mine) in originals:
        if not torch.equal(mine, theirs.to(mine.dtype)):
            mine.data = theirs.detach().to(mine.dtype).clone()
    else:
        mine.copy_(theirs)
    if isinstance(mine, nn.Parameter):
        mine.requires_grad_(theirs.requires_grad)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storages(model: nn.Module) -> set[int]:
    tensors = [*model.parameters(), *model.buffers()]
    return {_storage(t) for t in tensors if not t.is_meta}


def adapter_parameters(model: nn.Module, adapter: str) -> Iterator[nn.Parameter]:
    """The adapter's own parameters: LoRA weights and its ``modules_to_save`` copies."""
    for module in model.modules():
        if isinstance(module, Branch) and module.adapter == adapter:
            yield from module.parameters()
        elif isinstance(module, ModulesToSave) and adapter in module.modules_to_save:
            yield from module.modules_to_save[adapter].parameters()
