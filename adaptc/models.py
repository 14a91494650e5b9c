"""Base models for the CLI: what a MODEL argument names, and building it (on meta or with weights).

A MODEL reference is one of:

- a local Hugging Face model directory (``config.json`` plus ``model.safetensors``, or shards
  listed in ``model.safetensors.index.json``);
- a ``config.json`` file alone (the architecture with random weights);
- a hub id (``org/name``), downloaded as transformers does: only ``config.json`` to plan on
  the meta device, the weights when they are needed (cache, ``revision``, ``HF_TOKEN``,
  ``HF_HUB_OFFLINE``: see :mod:`adaptc.hub`);
- ``package.module:factory``: the module is imported and ``factory()`` returns the model.

The model class comes from the checkpoint (``config.architectures``, e.g.
``OPTForCausalLM``) unless the task asks for another head (:func:`model_class`).

>>> ref = resolve_model("out/tiny-llama")                              # doctest: +SKIP
>>> meta = build_model(ref, task_type="CAUSAL_LM", meta=True)          # no weight is read
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from torch import nn

from adaptc.compiler.compile import AdaptcWarning
from adaptc.dtypes import DTYPES, dtype_name
from adaptc.hub import CHECKPOINT_FILES, HubError, download_file, is_hub_id, snapshot
from adaptc.plan.plan import Plan
from adaptc.quantize import (
    QuantizationError,
    describe,
    from_pretrained_kwargs,
    quantize_loaded,
)

__all__ = [
    "AUTO_CLASSES",
    "CONFIG_NAME",
    "DTYPES",
    "MemoryEstimate",
    "ModelError",
    "ModelRef",
    "build_model",
    "checkpoint_dir",
    "dtype_name",
    "model_class",
    "model_dtype",
    "resolve_model",
    "saved_task_type",
    "training_memory",
]

CONFIG_NAME = "config.json"

# spec task_type -> the transformers auto class that builds the model (PEFT's task wrappers).
AUTO_CLASSES: dict[str | None, str] = {
    None: "AutoModel",
    "FEATURE_EXTRACTION": "AutoModel",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}

_FACTORY = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*)$")


class ModelError(ValueError):
    """A MODEL reference names nothing usable, or the model cannot be built (one line)."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved MODEL reference: where the model comes from."""

    ref: str  # as the user wrote it
    kind: Literal["dir", "config", "hub", "factory"]
    path: Path | None = None  # the model directory (dir; hub: the snapshot) or the config file
    factory: Callable[[], Any] | None = None
    revision: str | None = None  # hub only
    cache_dir: str | None = None  # hub only

    def __str__(self) -> str:
        return self.ref


def resolve_model(
    ref: str, *, cache_dir: str | os.PathLike[str] | None = None, revision: str | None = None
) -> ModelRef:
    """Where ``ref`` points; raises :class:`ModelError` when it points at nothing usable."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise ModelError(f"{ref} has no {CONFIG_NAME}: not a Hugging Face model directory")
        return ModelRef(ref, "dir", path)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ModelError(
                f"{ref} is a file, but not a {CONFIG_NAME}: give a model directory, "
                "a config.json, a hub id or package.module:factory"
            )
        return ModelRef(ref, "config", path)
    match = _FACTORY.match(ref)
    if match:
        return ModelRef(ref, "factory", factory=_import_factory(ref, **match.groupdict()))
    if ref.startswith((".", "/", "~")) or ref.endswith(".json") or not is_hub_id(ref):
        raise ModelError(f"no such file or directory: {ref}")
    cache = None if cache_dir is None else str(cache_dir)
    try:  # the config alone: a plan on the meta device needs nothing more
        config = download_file(ref, CONFIG_NAME, what="model", revision=revision, cache_dir=cache)
    except HubError as exc:
        raise ModelError(str(exc)) from None
    return ModelRef(ref, "hub", config.parent, revision=revision, cache_dir=cache)


def checkpoint_dir(ref: ModelRef) -> Path:
    """The local directory of ``ref``'s safetensors checkpoint and the files beside it
    (tokenizer, generation config); a hub id is downloaded (other weight formats are not)."""
    if ref.kind == "dir" and ref.path is not None:
        return ref.path
    if ref.kind != "hub":
        raise ModelError(f"{ref}: a checkpoint directory (safetensors) or a hub id is needed")
    try:
        return snapshot(
            ref.ref,
            what="model",
            revision=ref.revision,
            cache_dir=ref.cache_dir,
            allow_patterns=CHECKPOINT_FILES,
        )
    except HubError as exc:
        raise ModelError(str(exc)) from None


def build_model(
    ref: ModelRef,
    *,
    task_type: str | None,
    meta: bool,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    config_overrides: dict[str, Any] | None = None,
    quantization: Any = None,
) -> nn.Module:
    """The model ``ref`` names, of the class :func:`model_class` chooses for ``task_type``.

    With ``meta`` every tensor is on the meta device and no weight file is read (for plans
    and counts: a 70B architecture builds in a fraction of a second). Otherwise weights are
    loaded with ``from_pretrained`` (a directory, or a hub id: transformers downloads what
    it needs) or initialised at random (a ``config.json``). ``dtype`` defaults to the
    checkpoint's. Weights the checkpoint lacks (a new task head) or holds in excess are
    reported as one ``AdaptcWarning`` each. ``progress`` shows transformers' loading bar.
    ``config_overrides`` change the config before building (e.g. ``num_labels``).
    ``quantization`` (a spec's ``base_model.quantization``) loads the weights quantized
    (:mod:`adaptc.quantize`); on the meta device it changes nothing (a plan estimates the
    quantized size from the float twin).
    """
    try:
        quantized = {} if quantization is None or meta else from_pretrained_kwargs(quantization)
    except QuantizationError as exc:
        raise ModelError(str(exc)) from None
    if quantized and ref.kind in ("factory", "config"):
        raise ModelError(
            f"{ref}: {describe(quantization)} quantizes weights while loading a checkpoint; "
            "give a model directory or hub id"
        )
    if ref.kind == "factory":
        model = _call_factory(ref, meta=meta, dtype=dtype)
        return model if meta else _quantized(model, quantization)
    assert ref.path is not None
    config = _read_config(ref)
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    auto = model_class(ref, task_type, config=config)
    try:
        kwargs = {} if dtype is None else {"dtype": dtype}  # None: the config's dtype
        if meta:
            with torch.device("meta"):
                return _from_config(auto, config, kwargs)
        if ref.kind == "config":
            return _quantized(_from_config(auto, config, kwargs), quantization)
        source = ref.ref if ref.kind == "hub" else ref.path
        hub = {"revision": ref.revision, "cache_dir": ref.cache_dir} if ref.kind == "hub" else {}
        with _transformers_output(progress):
            model, info = auto.from_pretrained(
                source, config=config, dtype=dtype or "auto", output_loading_info=True,
                **hub, **quantized,
            )  # fmt: skip
    except ValueError as exc:  # an architecture this auto class does not build
        if "Unrecognized configuration class" in str(exc):
            task = f"task_type {task_type}" if task_type else "no task_type"
            raise ModelError(
                f"{ref}: {auto.__name__} cannot build a {config.model_type!r} model "
                f"({type(config).__name__}; the spec has {task}); choose a task_type that fits"
            ) from None
        raise ModelError(f"cannot load the model {ref}: {_first_line(exc)}") from None
    except (OSError, RuntimeError, SafetensorError) as exc:  # missing, corrupt or mismatched
        raise ModelError(f"cannot load the model {ref}: {_first_line(exc)}") from None
    for what, keys in (
        ("not in the checkpoint, initialised at random", info.get("missing_keys")),
        ("in the checkpoint but not in the model, ignored", info.get("unexpected_keys")),
    ):
        if keys:
            names = sorted(keys)
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            message = f"{ref}: weights {what}: {', '.join(names[:3])}{more}"
            warnings.warn(message, AdaptcWarning, stacklevel=2)
    return _quantized(model, quantization)


def _quantized(model: nn.Module, quantization: Any) -> nn.Module:
    """``model`` quantized in place by a backend that does it after loading (torchao, hqq,
    quanto; bitsandbytes quantized it while loading)."""
    if quantization is None:
        return model
    try:
        return quantize_loaded(model, quantization)
    except QuantizationError as exc:
        raise ModelError(str(exc)) from None


def model_class(ref: ModelRef, task_type: str | None, *, config: Any = None) -> Any:
    """The transformers class that builds ``ref`` for ``task_type``: the checkpoint decides.

    The class the checkpoint was saved from (``config.architectures[0]``, e.g.
    ``OPTForCausalLM``) when no task_type is given or when its head is the task's; the
    task's auto class otherwise (``AutoModel`` for ``FEATURE_EXTRACTION``, PEFT's bare
    model; ``AutoModelForSequenceClassification`` adds a new head to a causal LM).
    """
    import transformers

    if task_type not in AUTO_CLASSES:
        raise ModelError(
            f"unknown task_type {task_type!r}; known: {', '.join(map(str, AUTO_CLASSES))}"
        )
    config = _read_config(ref) if config is None else config
    saved = _saved_class(config)
    if saved is not None and (task_type is None or _task_of(config) == task_type):
        return saved
    return getattr(transformers, AUTO_CLASSES[task_type])


def _saved_class(config: Any) -> Any:
    """``config.architectures[0]`` as a transformers class, or None (none, or remote code)."""
    import transformers

    architectures = getattr(config, "architectures", None) or []
    if not architectures or not isinstance(architectures[0], str):
        return None
    try:
        cls = getattr(transformers, architectures[0], None)
    except Exception:  # transformers' lazy module may fail to import an optional backend
        return None
    return cls if isinstance(cls, type) and issubclass(cls, nn.Module) else None


def _from_config(cls: Any, config: Any, kwargs: dict[str, Any]) -> nn.Module:
    if hasattr(cls, "from_config"):  # the auto classes
        return cls.from_config(config, **kwargs)  # type: ignore[no-any-return]
    return cls._from_config(config, **kwargs)  # type: ignore[no-any-return]


_ARCHITECTURE_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def saved_task_type(ref: ModelRef) -> str | None:
    """The task type of the class a checkpoint was saved from (``config.architectures``):
    ``OPTForCausalLM`` → ``CAUSAL_LM``; None for a bare model, a factory, or no match."""
    if ref.kind == "factory":
        return None
    return _task_of(_read_config(ref))


def _task_of(config: Any) -> str | None:
    architectures = getattr(config, "architectures", None) or []
    name = architectures[0] if architectures else ""
    if name.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    return next((task for suffix, task in _ARCHITECTURE_TASKS if name.endswith(suffix)), None)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _import_factory(ref: str, module: str, attr: str) -> Callable[[], Any]:
    cwd = os.getcwd()  # `adaptc` as a console script does not put the working dir on sys.path
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # any import failure is the user's module's, reported in one line
        raise ModelError(
            f"cannot import module {module!r} for the model factory {ref}: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None
    factory = getattr(mod, attr, None)
    if factory is None:
        raise ModelError(f"module {module!r} has no attribute {attr!r} (model factory {ref})")
    if not callable(factory):
        raise ModelError(
            f"{attr!r} in module {module!r} is a {type(factory).__name__}, not callable "
            f"(model factory {ref})"
        )
    return factory  # type: ignore[no-any-return]


def _call_factory(ref: ModelRef, *, meta: bool, dtype: torch.dtype | None) -> nn.Module:
    assert ref.factory is not None
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = ref.factory()
    except Exception as exc:  # the user's code: report it in one line
        raise ModelError(
            f"the model factory {ref} raised {type(exc).__name__}: {_first_line(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"the model factory {ref} returned a {type(model).__name__}, not a torch nn.Module"
        )
    return model.to(dtype) if dtype is not None else model


def _read_config(ref: ModelRef) -> Any:
    from transformers import AutoConfig

    assert ref.path is not None
    try:
        with _transformers_output(False):
            return AutoConfig.from_pretrained(str(ref.path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        where = ref.path if ref.kind == "config" else ref.path / CONFIG_NAME
        raise ModelError(f"cannot read the model config {where}: {_first_line(exc)}") from None


@contextlib.contextmanager
def _transformers_output(progress: bool) -> Iterator[None]:
    """Transformers' progress bars on or off, and its log quiet (its load report becomes our
    one-line warnings); both restored afterwards."""
    from transformers.utils import logging as tf_logging

    was_on = tf_logging.is_progress_bar_enabled()
    level = tf_logging.get_verbosity()
    if progress:
        tf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    else:
        tf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    tf_logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)
        if was_on:
            tf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        else:
            tf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes to train: weights, gradients and AdamW states (activations not included)."""

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def to_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer": self.optimizer,
            "total": self.total,
        }


def training_memory(
    plan: Plan, dtype: torch.dtype, quantized_base: int | None = None
) -> dict[str, MemoryEstimate]:
    """Memory to train with the plan's adapters (``"lora"``) and without (``"full"``), and
    on a quantized base (``"qlora"``) when ``quantized_base`` gives its weights' bytes
    (:func:`adaptc.quantize.quantized_bytes`).

    LoRA: base weights (and ``modules_to_save`` copies) at ``dtype``, adapter weights in fp32
    (PEFT's ``autocast_adapter_dtype``), gradients of the trainable parameters in their own
    dtype, AdamW's two fp32 states per trainable parameter. Full fine-tuning: weights and
    gradients of every base parameter at ``dtype``, and two fp32 states each. QLoRA: as
    LoRA, with the base weights quantized (``modules_to_save`` copies stay at ``dtype``).
    """
    size = torch.empty((), dtype=dtype).element_size()
    adapter = plan.adapter_params
    learned = adapter - plan.frozen_params  # adapter parameters that train
    others = plan.trainable_params - learned  # biases and saved copies, at the base dtype
    lora = MemoryEstimate(
        weights=(plan.total_params - adapter) * size + adapter * 4,
        gradients=learned * 4 + others * size,
        optimizer=2 * 4 * plan.trainable_params,
    )
    base = plan.base_params
    full = MemoryEstimate(weights=base * size, gradients=base * size, optimizer=2 * 4 * base)
    estimates = {"lora": lora, "full": full}
    if quantized_base is not None:
        copies = plan.total_params - adapter - base  # modules_to_save copies
        estimates["qlora"] = replace(lora, weights=quantized_base + copies * size + adapter * 4)
    return estimates
