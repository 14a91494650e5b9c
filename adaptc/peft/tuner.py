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
  valid; ``merge_adapter`` / ``unmerge_adapter`` merge in place and undo it exactly
  (:mod:`adaptc.compiler.inplace`: the unmerged weights are kept, not recomputed).

Also the helpers the other facade modules share: :func:`config_of` (the ``LoraConfig`` PEFT
would hold for an adapter of a compiled model), :func:`freeze` and :func:`unsupported`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from adaptc.adapters import disabled, set_active, set_enabled
from adaptc.adapters.keys import adapter_tensors
from adaptc.adapters.manage import delete_adapter as core_delete_adapter
from adaptc.api import compile, merge
from adaptc.compiler import NoTargetsError, compiled_info, merge_in_place, unmerge_in_place
from adaptc.compiler import merged_adapters as merged_names
from adaptc.compiler.saved import ModulesToSave
from adaptc.integrations.adalora import update_and_allocate as _update_and_allocate
from adaptc.layers import PARAMETER_KIND, kind_of
from adaptc.methods.base import Branch
from adaptc.methods.lora.branch import LoraBranch
from adaptc.methods.lora.targets import LORA_TARGET_MODULES
from adaptc.methods.registry import branches_of
from adaptc.peft.combine import add_weighted_adapter
from adaptc.peft.config import LoraConfig, NoMatchingPeftModuleError, NotSupportedError, config_of
from adaptc.peft.forward import first_input, special_forward
from adaptc.spec import Spec

__all__ = ["LoraModel", "compile_config", "config_of", "freeze", "keep_base_dtype", "unsupported"]


def unsupported(what: str, value: Any, hint: str = "") -> NotSupportedError:
    return NotSupportedError(f"{what}={value!r} is not supported by adaptc{hint}")


def compile_config(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """``adaptc.compile`` of the config's spec; targets that match nothing raise PEFT's
    ``NoMatchingPeftModuleError`` (a ``ValueError``) with adaptc's message."""
    try:
        return compile(model, config.to_spec(adapter_name))
    except NoTargetsError as exc:
        raise NoMatchingPeftModuleError(str(exc)) from None


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def keep_base_dtype(model: nn.Module, adapter: str) -> None:
    """PEFT's ``autocast_adapter_dtype=False``: the adapter's weights on a float16 or
    bfloat16 layer take the layer's dtype (by default they are float32)."""
    for layer in model.modules():
        branches = branches_of(layer, [adapter])
        if branches:
            dtype = kind_of(layer).weight(layer).dtype
            if dtype in (torch.float16, torch.bfloat16):
                for branch in branches:
                    branch.to(dtype)


class LoraModel(nn.Module):
    """PEFT's ``LoraModel(model, config, adapter_name)``: compiles a *new* model.

    ``model`` is left untouched (PEFT injects into it); the adapted model is ``.model``.
    Attributes it does not have are looked up on ``.model`` (``config``, ``generate``, …).
    """

    prefix = "lora_"
    # PEFT's names for what it builds on; adaptc's layers are the base layers themselves,
    # with the adapter as a child module (a LoraBranch), so isinstance checks differ
    tuner_layer_cls = LoraBranch
    target_module_mapping = LORA_TARGET_MODULES  # model type -> default target_modules
    uses_shared_state = False

    @staticmethod
    def get_model_config(model: nn.Module) -> dict[str, Any]:
        """The model's config as a dict (``{"model_type": "custom"}`` for a plain torch
        model), as PEFT's."""
        config = getattr(model, "config", None)
        if config is None:
            return {"model_type": "custom"}
        return config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig | dict[str, LoraConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, Any] | None = None,
    ) -> None:
        """``low_cpu_mem_usage`` changes nothing: adapter weights are created initialised on
        the base's device (PEFT creates them on the meta device, to be loaded)."""
        super().__init__()
        del low_cpu_mem_usage
        if state_dict is not None:
            raise unsupported("state_dict", "{...}", " (name the targets in the config)")
        cfg = config[adapter_name] if isinstance(config, dict) else config
        compiled = compile_config(model, cfg, adapter_name)
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
        self.peft_config: dict[str, LoraConfig] = configs

    def __deepcopy__(self, memo: dict[int, Any]) -> LoraModel:
        """A copy with its own weights (an EMA or reference model), the same class. The
        user's untouched model, kept to recompile from, is shared, not copied."""
        new: LoraModel = deepcopy_module(self, memo, shared=("_original",))
        return new

    def forward(self, *args: Any, **kwargs: Any) -> Any:
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

    @property
    def targeted_module_names(self) -> list[str]:
        """The paths (in the user's model) of the layers the adapters target, as PEFT's."""
        info = compiled_info(self.model)
        assert info is not None
        modules = (t.path for t in info.plan.targets if t.layer_type != PARAMETER_KIND)
        return list(dict.fromkeys(modules))

    @property
    def targeted_parameter_names(self) -> list[str]:
        """The parameters adapted through ``target_parameters`` (PEFT's keys)."""
        info = compiled_info(self.model)
        assert info is not None
        params = (t.path for t in info.plan.targets if t.layer_type == PARAMETER_KIND)
        return list(dict.fromkeys(params))

    def set_requires_grad(
        self, adapter_names: str | Sequence[str], requires_grad: bool = True
    ) -> None:
        """Turn the gradients of the adapters' weights (and saved copies) on or off."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            if name not in self.peft_config:
                raise ValueError(f"Adapter {name} not found (has: {', '.join(self.peft_config)}).")
            for p in adapter_parameters(self.model, name):
                p.requires_grad_(requires_grad)

    def disable_adapter_layers(self) -> None:
        """Run the base model alone until :meth:`enable_adapter_layers`; as in PEFT, the
        adapters' weights stop requiring grad meanwhile, and merged adapters are unmerged."""
        if self.adapters_enabled:
            set_enabled(self.model, False)
            self._branches_require_grad(())

    def enable_adapter_layers(self) -> None:
        """Run the adapters again; as PEFT's, the active ones' weights require grad again
        and the others' do not."""
        if not self.adapters_enabled:
            set_enabled(self.model, True)
            self._branches_require_grad(tuple(self.active_adapters))

    @property
    def adapters_enabled(self) -> bool:
        info = compiled_info(self.model)
        return info is not None and not info.disabled

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
        """The base model's outputs inside; PEFT's ``disable_adapter()`` context: merged
        adapters are unmerged, and ``adapter_names=`` cannot bring adapters back."""
        if merged_names(self.model):
            unmerge_in_place(self.model)
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

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA's budget and masks for the step (``adaptc.integrations.update_and_allocate``;
        after ``loss.backward()`` and ``optimizer.step()``, before ``zero_grad()``)."""
        _update_and_allocate(self.model, global_step)

    def unload(self) -> nn.Module:
        """A new plain model without the adapters (``modules_to_save`` copies kept, as PEFT)."""
        return merge(self.model, adapters=[], safe=False)

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        """Merge the adapters (default: the active ones) into the weights, in place: the
        forward costs the base model's. The unmerged weights are kept, so
        :meth:`unmerge_adapter` is exact (PEFT subtracts the delta again)."""
        if adapter_names is not None:
            unknown = [n for n in adapter_names if n not in self.peft_config]
            if unknown:
                has = ", ".join(self.peft_config)
                raise ValueError(f"Adapter {unknown[0]} not found (has: {has}).")
        merge_in_place(self.model, adapter_names, safe=safe_merge)

    def unmerge_adapter(self) -> None:
        """Put the exact unmerged weights back (a no-op when nothing is merged)."""
        unmerge_in_place(self.model)

    @property
    def merged(self) -> bool:
        """Whether adapters are merged in place (what PEFT's layers report)."""
        return bool(merged_names(self.model))

    @property
    def merged_adapters(self) -> list[str]:
        return list(merged_names(self.model))

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
        """Delete the adapter in place (the other adapters' parameters stay the same
        objects); the last one too, as in PEFT: the model then runs the base model."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if adapter_name in merged_names(self.model):
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. "
                "Please unmerge them first."
            )
        core_delete_adapter(self.model, adapter_name)  # in place: other parameters stay
        self.peft_config = {k: v for k, v in self.peft_config.items() if k != adapter_name}

    def _rebuild(
        self, parts: list[tuple[nn.Module, str, str]], configs: dict[str, LoraConfig]
    ) -> None:
        old = self.model
        info = compiled_info(old)
        assert info is not None
        merged = [a for a in merged_names(old) if a in configs]
        unmerge_in_place(old)  # the weights to carry over are the unmerged ones
        active = [a for a in info.active if a in configs] or [parts[0][2]]
        new = assemble(self.__dict__["_original"], parts, info.spec)
        device = next((p.device for p in old.parameters()), None)
        if device is not None and any(p.device != device for p in new.parameters()):
            new.to(device)  # the adapted model was moved (`.to("cuda")`): follow it
        set_active(new, active)
        if merged:
            merge_in_place(new, merged)
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


def deepcopy_module(module: Any, memo: dict[int, Any], shared: tuple[str, ...] = ()) -> Any:
    """``copy.deepcopy`` of ``module`` done as for any object (the facade's classes look
    attributes up on the wrapped model, which would otherwise answer ``__deepcopy__``)."""
    cls: Any = type(module)
    new = cls.__new__(cls)
    memo[id(module)] = new
    for key, value in module.__dict__.items():
        new.__dict__[key] = value if key in shared else copy.deepcopy(value, memo)
    return new


def adapter_parameters(model: nn.Module, adapter: str) -> Iterator[nn.Parameter]:
    """The adapter's own parameters: LoRA weights and its ``modules_to_save`` copies."""
    for module in model.modules():
        if isinstance(module, Branch) and module.adapter == adapter:
            yield from module.parameters()
        elif isinstance(module, ModulesToSave) and adapter in module.modules_to_save:
            yield from module.modules_to_save[adapter].parameters()
