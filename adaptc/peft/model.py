"""PEFT's ``PeftModel``, wrapping an adaptc-compiled model (task classes: ``tasks.py``).

Structure as in PEFT: ``peft_model.base_model`` is a :class:`LoraModel` whose ``.model``
is the adapted model (``get_base_model()``); attributes are looked up through both, so
``peft_model.config`` and ``peft_model.generate(...)`` work.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from adaptc.adapters.manage import RecompileNeeded
from adaptc.adapters.manage import add_adapter as core_add_adapter
from adaptc.api import compile
from adaptc.compiler import CompileError
from adaptc.counting import print_trainable_parameters, trainable_parameters
from adaptc.io import push_adapter, resolve_adapter_dir, save_adapter, write_model_card
from adaptc.io.load import AdapterLoadError, IncompatibleKeys, add_loaded, load_weights, read_spec
from adaptc.peft.config import LoraConfig
from adaptc.peft.convert import as_plain_lora
from adaptc.peft.forward import SPECIAL_FORWARD_ARGS, first_input, special_forward
from adaptc.peft.precision import require_input_grads
from adaptc.peft.status import (
    TunerLayerStatus,
    TunerModelStatus,
    get_layer_status,
    get_model_status,
)
from adaptc.peft.tuner import (
    LoraModel,
    adapter_parameters,
    config_of,
    deepcopy_module,
    freeze,
    keep_base_dtype,
    unsupported,
)
from adaptc.spec import Spec
from adaptc.spec.load import PEFT_CONFIG_NAME

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
        self._setup(LoraModel(model, peft_config, adapter_name, low_cpu_mem_usage))
        if not autocast_adapter_dtype:
            keep_base_dtype(self.get_base_model(), adapter_name)

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

    def __deepcopy__(self, memo: dict[int, Any]) -> PeftModel:
        """A ``PeftModel`` of the same class with its own weights (EMA, reference models)."""
        return deepcopy_module(self, memo)  # type: ignore[no-any-return]

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

    @property
    def modules_to_save(self) -> set[str] | None:
        """The ``modules_to_save`` of every adapter (None when there are none), as PEFT's."""
        found: set[str] = set()
        for config in self.peft_config.values():
            found.update(getattr(config, "modules_to_save", None) or ())
        return found or None

    @property
    def base_model_torch_dtype(self) -> Any:
        return getattr(self.base_model, "dtype", None)

    @property
    def has_active_enabled_adapter(self) -> bool:
        """PEFT's check (kept as PEFT writes it): adapters enabled, or none active."""
        return self.base_model.adapters_enabled or not self.active_adapters

    def get_layer_status(self) -> list[TunerLayerStatus]:
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        return get_model_status(self)

    def set_requires_grad(
        self, adapter_names: str | Sequence[str], requires_grad: bool = True
    ) -> None:
        self.base_model.set_requires_grad(adapter_names, requires_grad)

    def prepare_model_for_gradient_checkpointing(self, model: nn.Module) -> None:
        """PEFT's: inputs of the embeddings require grad, so checkpointed blocks train (on
        the model given: pass the adapted model, never changed for your original)."""
        if not any(getattr(model, q, False) for q in _QUANTIZED):
            require_input_grads(model)

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

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        """Merge in place; :meth:`unmerge_adapter` puts the exact weights back."""
        self.base_model.merge_adapter(adapter_names, safe_merge)

    def unmerge_adapter(self) -> None:
        self.base_model.unmerge_adapter()

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> Any:
        """The adapted model's own (``generate`` calls it)."""
        model: Any = self.get_base_model()
        return model.prepare_inputs_for_generation(*args, **kwargs)

    # --- adapters ------------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: LoraConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add a new adapter, in place: existing parameters stay the same objects (an
        optimizer keeps working). As in PEFT it is inactive and frozen until
        :meth:`set_adapter`. An adapter that changes what others share (a new
        ``modules_to_save``, a bias mode, PiSSA/OLoRA) rebuilds the adapted model instead:
        its parameters are then new objects. ``low_cpu_mem_usage`` changes nothing."""
        del low_cpu_mem_usage
        if adapter_name in self.base_model.peft_config:
            raise ValueError(f"Adapter with name '{adapter_name}' already exists.")
        spec = peft_config.to_spec(adapter_name)
        try:
            core_add_adapter(self.base_model.model, spec)
        except RecompileNeeded:
            source = compile(self.base_model.__dict__["_original"], spec)
            self.base_model.add_compiled(source, {adapter_name: adapter_name})
        model = self.base_model.model
        for p in adapter_parameters(model, adapter_name):
            p.requires_grad_(False)
        if not autocast_adapter_dtype:
            keep_base_dtype(model, adapter_name)
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
    ) -> IncompatibleKeys:
        """Load a saved adapter under ``adapter_name`` (inactive; see :meth:`set_adapter`);
        returns PEFT's load result (``missing_keys``, ``unexpected_keys``: empty, since
        adaptc refuses a file that does not match the model, naming the keys).

        In place, as in PEFT: existing parameters stay the same objects. An adapter that
        changes what others share (a new ``modules_to_save``, a bias mode) rebuilds the
        adapted model instead. ``torch_device`` and ``low_cpu_mem_usage`` change nothing
        (the weights go where the layer is); ``device_map``-style keywords are accepted
        (everything is on one device here)."""
        options = _load_options(torch_device, ephemeral_gpu_offload, key_mapping, kwargs)
        directory = adapter_directory(model_id, kwargs)
        spec, folder = _top_level(directory, adapter_name)
        model = self.base_model.model
        if adapter_name in self.base_model.peft_config:  # PEFT: load the weights into it
            load_weights(model, adapter_name, folder, **options)
            return IncompatibleKeys([], [])
        try:
            add_loaded(model, spec, {adapter_name: folder}, is_trainable, **options)
        except RecompileNeeded:
            original = self.base_model.__dict__["_original"]
            loaded = _compile_loaded(original, spec, folder, adapter_name, is_trainable, options)
            self.base_model.add_compiled(loaded, {adapter_name: adapter_name})
        model = self.base_model.model
        self.base_model.peft_config[adapter_name] = config_of(
            model, adapter_name, inference_mode=not is_trainable
        )
        if not autocast_adapter_dtype:
            keep_base_dtype(model, adapter_name)
        if not is_trainable:
            self.eval()
        return IncompatibleKeys([], [])

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
        """PEFT's adapter directory (``adaptc.save_adapter``), plus ``adaptc_spec.yaml``;
        ``safe_serialization=False`` writes PEFT's ``adapter_model.bin``. With
        ``path_initial_model_for_weight_conversion`` (the adapter saved before training),
        PiSSA/OLoRA adapters are saved as plain LoRA adapters of twice the rank for the
        unchanged base model (:mod:`adaptc.peft.convert`)."""
        if save_embedding_layers != "auto":
            raise unsupported("save_embedding_layers", save_embedding_layers)
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
        model = self.get_base_model()
        if path_initial_model_for_weight_conversion is not None:  # PiSSA/OLoRA → plain LoRA
            original = self.base_model.__dict__["_original"]
            model = as_plain_lora(model, original, names, path_initial_model_for_weight_conversion)
        save_adapter(model, save_directory, adapters=names, safe_serialization=safe_serialization)

    def create_or_update_model_card(self, output_dir: str | os.PathLike[str]) -> None:
        """Write (or update) the ``README.md`` model card in ``output_dir``, as PEFT's."""
        write_model_card(output_dir, self.get_base_model(), adapters=list(self.peft_config))

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ) -> str:
        """Upload the adapters (PEFT's files and the model card) to the Hub repository
        ``repo_id`` (created when missing); returns the commit's URL. ``max_shard_size``
        changes nothing (adapter files are not sharded)."""
        del max_shard_size
        return push_adapter(
            self.get_base_model(), repo_id, adapters=list(self.peft_config), private=private,
            token=token, revision=revision, commit_message=commit_message or "Upload model",
            commit_description=commit_description, create_pr=create_pr, tags=tags,
        )  # fmt: skip

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

        As in PEFT, the adapter at the top of the directory is loaded (others in its
        sub-directories are loaded with :meth:`load_adapter`), under ``adapter_name``;
        ``config`` replaces its ``adapter_config.json``. ``torch_device`` and
        ``low_cpu_mem_usage`` change nothing (the weights go where the layers are).
        """
        options = _load_options(
            kwargs.pop("torch_device", None), ephemeral_gpu_offload, key_mapping, kwargs
        )
        directory = adapter_directory(model_id, kwargs)
        if config is not None:
            spec, folder = config.to_spec(adapter_name), directory
        else:
            spec, folder = _top_level(directory, adapter_name)
        loaded = _compile_loaded(model, spec, folder, adapter_name, is_trainable, options)
        configs = {adapter_name: config_of(loaded, adapter_name, inference_mode=not is_trainable)}
        if config is not None:
            configs[adapter_name] = copy.deepcopy(config)
            configs[adapter_name].inference_mode = not is_trainable
        lora = LoraModel.from_compiled(loaded, model, configs)
        task = spec.task_type
        wrapper = PeftModel.task_classes.get(task, cls) if task else cls
        peft_model = wrapper._wrap(lora)
        if not autocast_adapter_dtype:
            keep_base_dtype(loaded, adapter_name)
        if not is_trainable:
            peft_model.eval()
        return peft_model


_QUANTIZED = ("is_loaded_in_8bit", "is_loaded_in_4bit", "is_quantized")  # PEFT's checks
# PEFT's device-placement keywords: on one device they change nothing
_DEVICE_KEYWORDS = ("device_map", "max_memory", "offload_folder", "offload_dir", "offload_index")


def _load_options(
    torch_device: str | None,
    ephemeral_gpu_offload: bool,
    key_mapping: dict[str, str] | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    """Check the loading keywords PEFT's ``from_pretrained``/``load_adapter`` take; returns
    the options for adaptc's loader (:func:`adapter_directory` reads the others)."""
    if torch_device is not None:
        torch.device(torch_device)  # a bad name is an error, as in PEFT
    if ephemeral_gpu_offload:
        raise unsupported("ephemeral_gpu_offload", True)
    if key_mapping:
        raise unsupported("key_mapping", key_mapping)
    return {"ignore_mismatched_sizes": bool(kwargs.pop("ignore_mismatched_sizes", False))}


def _top_level(directory: Path, adapter_name: str) -> tuple[Spec, Path]:
    """The adapter at the top of ``directory`` (PEFT's ``adapter_config.json`` there, or
    adaptc's spec's ``default``), as a one-adapter spec named ``adapter_name``."""
    spec, folders = read_spec(directory, adapter_name)
    top = [n for n, f in folders.items() if f == directory]
    if not top:
        raise AdapterLoadError(
            f"{directory} holds no adapter at its top ({PEFT_CONFIG_NAME}); its adapters are "
            f"in sub-directories: load one by its directory, e.g. "
            f"{directory / next(iter(folders))}"
        )
    return spec.with_adapters({adapter_name: spec.adapters[top[0]]}), directory


def _compile_loaded(
    model: nn.Module,
    spec: Spec,
    folder: Path,
    adapter_name: str,
    is_trainable: bool,
    options: dict[str, Any],
) -> nn.Module:
    """``model`` (untouched) compiled with the one adapter of ``spec`` and its weights."""
    try:
        loaded = compile(model, spec)
    except CompileError as exc:
        raise AdapterLoadError(f"the adapter at {folder} does not fit this model: {exc}") from None
    load_weights(loaded, adapter_name, folder, **options)
    if not is_trainable:
        freeze(loaded)
    return loaded


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
    for key in _DEVICE_KEYWORDS:
        kwargs.pop(key, None)
    if kwargs:
        key = sorted(kwargs)[0]
        raise unsupported(key, kwargs[key])
    return resolve_adapter_dir(
        model_id, cache_dir=cache_dir, revision=revision, token=token,
        local_files_only=local_files_only, subfolder=subfolder,
    )  # fmt: skip


def _prepare_for_gradient_checkpointing(model: Any) -> None:
    """PEFT's input-gradient hook, on the *new* model only, when checkpointing is on."""
    checkpointing = getattr(type(model), "is_activation_checkpointing", None)  # transformers 5
    if checkpointing is None:
        checkpointing = getattr(type(model), "is_gradient_checkpointing", None)
    if not isinstance(checkpointing, property) or not checkpointing.fget(model):  # type: ignore[misc]
        return
    if any(getattr(model, q, False) for q in ("is_loaded_in_8bit", "is_loaded_in_4bit")):
        return
    require_input_grads(model)
