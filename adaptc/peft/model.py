"""PEFT's ``PeftModel``, wrapping an adaptc-compiled model (task classes: ``tasks.py``).

Structure as in PEFT: ``peft_model.base_model`` is a :class:`LoraModel` whose ``.model``
is the adapted model (``get_base_model()``); attributes are looked up through both, so
``peft_model.config`` and ``peft_model.generate(...)`` work.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from adaptc.adapters import active_adapters
from adaptc.adapters.manage import RecompileNeeded
from adaptc.adapters.manage import add_adapter as core_add_adapter
from adaptc.api import compile
from adaptc.api import load_adapter as _load_adapter
from adaptc.compiler import compiled_info
from adaptc.counting import print_trainable_parameters, trainable_parameters
from adaptc.io import resolve_adapter_dir, save_adapter
from adaptc.io.load import add_loaded, read_spec
from adaptc.peft.config import LoraConfig
from adaptc.peft.forward import SPECIAL_FORWARD_ARGS, first_input, special_forward
from adaptc.peft.tuner import (
    LoraModel,
    adapter_parameters,
    assemble,
    config_of,
    freeze,
    unsupported,
)

__all__ = ["PeftModel", "adapter_directory"]


class PeftModel(nn.Module):
    """PEFT's ``PeftModel(model, peft_config, adapter_name)``, over ``adaptc.compile``.

    Unlike PEFT, ``model`` is left untouched: the adapted model is a new one
    (``get_base_model()``), sharing ``model``'s frozen weights.
    """

    # task type -> the class for it (adaptc.peft.tasks registers PeftModelForCausalLM, …)
    task_classes: ClassVar[dict[str, type[PeftModel]]] = {}

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        _check_autocast(autocast_adapter_dtype)
        self._setup(LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage))

    @classmethod
    def _wrap(cls, base_model: LoraModel) -> PeftModel:
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(base_model)
        return self

    def _setup(self, base_model: LoraModel) -> None:
        self.base_model = base_model
        self.peft_type = "LORA"
        self.special_peft_forward_args = set(SPECIAL_FORWARD_ARGS)
        self.training = base_model.training = base_model.model.training  # no recursion
        _prepare_for_gradient_checkpointing(base_model.model)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # --- what PEFT users read ----------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str | list[str]:
        return self.base_model.active_adapter

    @property
    def active_adapters(self) -> list[str]:
        return self.base_model.active_adapters

    @property
    def active_peft_config(self) -> LoraConfig:
        active = self.active_adapters
        return self.peft_config[active[0] if active else next(iter(self.peft_config))]

    def get_base_model(self) -> nn.Module:
        """The adapted model (PEFT's ``base_model.model``), not the model passed in."""
        return self.base_model.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        print_trainable_parameters(self)

    # --- running -------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with special_forward(self.get_base_model(), kwargs, first_input(args, kwargs)):
            return self.get_base_model()(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        model: Any = self.get_base_model()
        with special_forward(model, kwargs, first_input(args, kwargs)):
            return model.generate(*args, **kwargs)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model computes the base model's outputs exactly."""
        with self.base_model.disabled():
            yield

    def set_adapter(self, adapter_name: str | Sequence[str], inference_mode: bool = False) -> None:
        self.base_model.set_adapter(adapter_name, inference_mode=inference_mode)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """A *new* merged model; this one (and the original) stay valid and unchanged."""
        return self.base_model.merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    # --- adapters ------------------------------------------------------------------------
    def add_adapter(
        self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False
    ) -> None:
        """Add a new (inactive) adapter, in place: existing parameters stay the same objects
        (an optimizer keeps working). An adapter that changes what others share (a new
        ``modules_to_save``, a bias mode, PiSSA/OLoRA) rebuilds the adapted model instead:
        its parameters are then new objects."""
        if low_cpu_mem_usage:
            raise unsupported("low_cpu_mem_usage", True)
        if adapter_name in self.base_model.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        spec = peft_config.to_spec(adapter_name)
        try:
            core_add_adapter(self.base_model.model, spec)
        except RecompileNeeded:
            pass  # rebuilt below
        else:
            if peft_config.inference_mode:
                for p in adapter_parameters(self.base_model.model, adapter_name):
                    p.requires_grad_(False)
            self.base_model.peft_config[adapter_name] = peft_config
            return
        source = compile(self.base_model.__dict__["_original"], spec)
        if peft_config.inference_mode:
            freeze(source)
        self.base_model.add_compiled(source, {adapter_name: adapter_name})
        self.base_model.peft_config[adapter_name] = peft_config

    def load_adapter(
        self,
        model_id: str | os.PathLike[str],
        adapter_name: str,
        is_trainable: bool = False,
        torch_device: str | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Load a saved adapter under ``adapter_name`` (inactive; see :meth:`set_adapter`).

        In place, as in PEFT: existing parameters stay the same objects. An adapter that
        changes what others share (a new ``modules_to_save``, a bias mode) rebuilds the
        adapted model instead."""
        _check_load_args(torch_device, autocast_adapter_dtype, ephemeral_gpu_offload, key_mapping)
        directory = adapter_directory(model_id, kwargs)
        if self._load_in_place(model_id, directory, adapter_name, is_trainable):
            if not is_trainable:
                self.eval()
            return
        original = self.base_model.__dict__["_original"]
        loaded = _load_adapter(
            original, directory, adapter_name=adapter_name, trainable=is_trainable
        )
        info = compiled_info(loaded)
        assert info is not None
        if adapter_name in info.spec.adapters:
            renames = {adapter_name: adapter_name}
        elif len(info.spec.adapters) == 1:
            renames = {next(iter(info.spec.adapters)): adapter_name}
        else:
            raise ValueError(
                f"{model_id} holds adapters {', '.join(info.spec.adapters)}, not {adapter_name!r}"
            )
        self.base_model.add_compiled(loaded, renames)
        if not is_trainable:
            self.eval()

    def _load_in_place(
        self, model_id: Any, directory: Path, adapter_name: str, is_trainable: bool
    ) -> bool:
        """Add the saved adapter to the adapted model in place; False when it needs the
        model rebuilt (it changes what the other adapters share, or its name is taken)."""
        if adapter_name in self.base_model.peft_config:
            return False  # the rebuild says why
        spec, folders = read_spec(directory, adapter_name)
        names = list(spec.adapters)
        chosen = adapter_name if adapter_name in names else names[0]
        if chosen != adapter_name and len(names) > 1:
            raise ValueError(f"{model_id} holds adapters {', '.join(names)}, not {adapter_name!r}")
        one = spec.with_adapters({adapter_name: spec.adapters[chosen]})
        model = self.base_model.model
        try:
            add_loaded(model, one, {adapter_name: folders[chosen]}, is_trainable)
        except RecompileNeeded:
            return False
        config = config_of(model, adapter_name, inference_mode=not is_trainable)
        self.base_model.peft_config[adapter_name] = config
        return True

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    # --- files -----------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        save_embedding_layers: str | bool = "auto",
        is_main_process: bool = True,
        path_initial_model_for_weight_conversion: str | None = None,
        **kwargs: Any,
    ) -> None:
        """PEFT's adapter directory (``adaptc.save_adapter``), plus ``adaptc_spec.yaml``."""
        if not safe_serialization:
            raise unsupported("safe_serialization", False, " (safetensors only; never pickle)")
        if save_embedding_layers != "auto":
            raise unsupported("save_embedding_layers", save_embedding_layers)
        if path_initial_model_for_weight_conversion is not None:
            raise unsupported(
                "path_initial_model_for_weight_conversion", path_initial_model_for_weight_conversion
            )
        if kwargs:
            raise unsupported(sorted(kwargs)[0], kwargs[sorted(kwargs)[0]])
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        missing = [n for n in names if n not in self.peft_config]
        if missing:
            raise ValueError(
                f"Cannot save these adapters: {missing}; the model has {list(self.peft_config)}"
            )
        if not is_main_process:
            return
        save_adapter(self.get_base_model(), save_directory, adapters=names)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        autocast_adapter_dtype: bool = True,
        ephemeral_gpu_offload: bool = False,
        low_cpu_mem_usage: bool = False,
        key_mapping: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """A new adapted model: ``model`` (untouched) with the adapter saved at ``model_id``
        (a directory, or a hub id: downloaded as peft does, ``revision``, ``token``,
        ``subfolder``, ``cache_dir`` and ``local_files_only`` read).

        ``low_cpu_mem_usage`` is accepted and changes nothing (the weights are loaded).
        """
        if config is not None:
            raise unsupported("config", config, " (the adapter's own adapter_config.json is used)")
        device = kwargs.pop("torch_device", None)
        _check_load_args(device, autocast_adapter_dtype, ephemeral_gpu_offload, key_mapping)
        loaded = _load(model, model_id, adapter_name, is_trainable, kwargs)
        info = compiled_info(loaded)
        assert info is not None
        names = list(info.spec.adapters)
        if names == [names[0]] and names[0] != adapter_name:  # an adaptc dir, another name
            loaded = assemble(model, [(loaded, names[0], adapter_name)], info.spec)
            names = [adapter_name]
        configs = {n: config_of(loaded, n, inference_mode=not is_trainable) for n in names}
        lora = LoraModel.from_compiled(loaded, model, configs)
        task = info.spec.task_type
        wrapper = PeftModel.task_classes.get(task, cls) if task else cls
        peft_model = wrapper._wrap(lora)
        if adapter_name in names and active_adapters(loaded) != (adapter_name,):
            peft_model.set_adapter(adapter_name, inference_mode=not is_trainable)
        if not is_trainable:
            peft_model.eval()
        return peft_model


def _load(
    model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str,
    is_trainable: bool,
    kwargs: dict[str, Any],
) -> nn.Module:
    directory = adapter_directory(model_id, kwargs)
    return _load_adapter(model, directory, adapter_name=adapter_name, trainable=is_trainable)


def adapter_directory(model_id: str | os.PathLike[str], kwargs: dict[str, Any]) -> Path:
    """The adapter directory that ``from_pretrained``/``load_adapter`` arguments name, a hub
    id downloaded as peft does (``subfolder``, ``revision``, ``cache_dir``, ``token``,
    ``local_files_only``); the keywords read are removed from ``kwargs``, any other one left
    is refused."""
    subfolder = kwargs.pop("subfolder", None)
    revision = kwargs.pop("revision", None)
    cache_dir = kwargs.pop("cache_dir", None)
    legacy_token = kwargs.pop("use_auth_token", None)  # peft's older name for ``token``
    token = kwargs.pop("token", None)
    token = legacy_token if token is None else token
    local_files_only = bool(kwargs.pop("local_files_only", False))
    kwargs.pop("low_cpu_mem_usage", None)
    if kwargs:
        key = sorted(kwargs)[0]
        raise unsupported(key, kwargs[key])
    return resolve_adapter_dir(
        model_id, cache_dir=cache_dir, revision=revision, token=token,
        local_files_only=local_files_only, subfolder=subfolder,
    )  # fmt: skip


def _check_load_args(
    torch_device: str | None,
    autocast_adapter_dtype: bool,
    ephemeral_gpu_offload: bool,
    key_mapping: dict[str, str] | None,
) -> None:
    if torch_device is not None:
        raise unsupported("torch_device", torch_device, " (weights load onto the model's device)")
    _check_autocast(autocast_adapter_dtype)
    if ephemeral_gpu_offload:
        raise unsupported("ephemeral_gpu_offload", True)
    if key_mapping:
        raise unsupported("key_mapping", key_mapping)


def _check_autocast(autocast_adapter_dtype: bool) -> None:
    if not autocast_adapter_dtype:
        raise unsupported(
            "autocast_adapter_dtype", False, " (adapters on a half-precision base are float32)"
        )


def _prepare_for_gradient_checkpointing(model: Any) -> None:
    """PEFT's input-gradient hook, on the *new* model only, when checkpointing is on."""
    checkpointing = getattr(type(model), "is_activation_checkpointing", None)  # transformers 5
    if checkpointing is None:
        checkpointing = getattr(type(model), "is_gradient_checkpointing", None)
    if not isinstance(checkpointing, property) or not checkpointing.fget(model):  # type: ignore[misc]
        return
    if any(getattr(model, q, False) for q in ("is_loaded_in_8bit", "is_loaded_in_4bit")):
        return
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
