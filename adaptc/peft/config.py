"""PEFT's ``LoraConfig`` over adaptc specs: same argument names, defaults and order.

``LoraConfig`` is a mutable dataclass, as PEFT's is; it validates itself on creation by
converting to an adaptc :class:`~adaptc.Spec` through the PEFT-format importer, so errors
are adaptc's one-line messages naming PEFT's keys. Arguments for features adaptc does not
implement (QALoRA, CorDA, …) keep PEFT's defaults; any other value is refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from torch import nn

from adaptc.compiler import NoTargetsError, compiled_info
from adaptc.io.push import push_files
from adaptc.peft.init_configs import normalise_init_configs
from adaptc.spec import Spec, from_peft_config
from adaptc.spec.load import PEFT_CONFIG_NAME
from adaptc.spec.method import PEFT_FORMAT_VERSION, method_specs

__all__ = [
    "SUPPORTED_ARGUMENTS",
    "LoraConfig",
    "LoraRuntimeConfig",
    "NotSupportedError",
    "PeftConfig",
    "PeftType",
    "TaskType",
    "config_class",
    "config_of",
    "get_peft_config",
    "read_config",
    "register_config",
]


class PeftError(Exception):
    """PEFT's base error class (adaptc raises its subclasses where PEFT does)."""


class PeftWarning(UserWarning):
    """PEFT's base warning class."""


class NoMatchingPeftModuleError(PeftError, NoTargetsError):
    """The adapter's targets matched no module of the model (PEFT's error, with adaptc's
    message: which selector, the closest names and what the model has)."""


class NotSupportedError(NotImplementedError, ValueError):
    """A PEFT argument or feature that adaptc does not implement (caught as either type)."""


# PEFT's method names, for the methods adaptc implements (adaptc/methods).
PeftType = enum.Enum(  # type: ignore[misc]
    "PeftType", {m.peft_type: m.peft_type for m in method_specs()}, type=str, module=__name__
)


class TaskType(str, enum.Enum):
    """PEFT's task types: they pick the model wrapper and the default modules to save."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


@dataclass
class LoraRuntimeConfig:
    """PEFT's runtime options; only the default (no GPU offload) is supported."""

    ephemeral_gpu_offload: bool = False


# What plain LoRA uses: adaptc implements every one of these.
SUPPORTED_ARGUMENTS = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "r",
        "target_modules",
        "exclude_modules",
        "lora_alpha",
        "lora_dropout",
        "fan_in_fan_out",
        "bias",
        "use_rslora",
        "modules_to_save",
        "init_lora_weights",
        "layers_to_transform",
        "layers_pattern",
        "rank_pattern",
        "alpha_pattern",
        "use_dora",
        "lora_bias",
        "alora_invocation_tokens",
        "loftq_config",
        "eva_config",
        "target_parameters",
        "layer_replication",
        "trainable_token_indices",
        "ensure_weight_tying",
    }
)


C = TypeVar("C", bound="PeftConfig")


class PeftConfig:
    """What every method's config class shares (PEFT's ``PeftConfig``): a mutable
    dataclass that validates itself on creation by converting to an adaptc spec.

    Subclasses are dataclasses with PEFT's arguments, in PEFT's order, and set
    ``PEFT_TYPE`` (the ``peft_type`` they always have) and ``SUPPORTED`` (the arguments
    adaptc implements; any other keeps PEFT's default or is refused by name).
    """

    PEFT_TYPE: ClassVar[str]
    SUPPORTED: ClassVar[frozenset[str]]
    # PEFT's PeftConfig fields, which every method's config has first
    task_type: Any
    peft_type: Any
    auto_mapping: dict[str, Any] | None
    peft_version: str | None
    base_model_name_or_path: str | None
    revision: str | None
    inference_mode: bool

    def __post_init__(self) -> None:
        self.peft_type = PeftType(self.PEFT_TYPE)
        if self.peft_version is None:
            self.peft_version = PEFT_FORMAT_VERSION
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name.endswith("_modules") and isinstance(value, list):  # as PEFT: a set
                setattr(self, f.name, set(value))
        self.to_spec()  # validate now: adaptc's one-line errors, with PEFT's key names

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a dict, as PEFT's ``to_dict`` (no ``runtime_config``)."""
        out = asdict(self)  # type: ignore[call-overload]
        out.pop("runtime_config", None)
        return dict(out)

    def to_spec(self, adapter_name: str = "default") -> Spec:
        """The adaptc spec for this config (one adapter, called ``adapter_name``)."""
        _refuse_unsupported(self)
        data = {k: _plain(v) for k, v in self.to_dict().items()}
        return from_peft_config(data, name=adapter_name)

    @classmethod
    def from_spec(
        cls: type[C], spec: Spec, adapter_name: str, target_modules: list[str] | None = None
    ) -> C:
        """The config PEFT would have for one adapter of ``spec``."""
        return cls.from_dict(spec.to_peft_config(adapter_name, target_modules=target_modules))

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """From ``adapter_config.json`` contents; keys this version does not know are dropped
        with a warning, as PEFT does for configs written by newer versions."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(
                f"ignoring unknown {cls.__name__} keys {unknown} (written by a newer peft?)",
                UserWarning,
                stacklevel=2,
            )
        if data.get("peft_type", cls.PEFT_TYPE) != cls.PEFT_TYPE:
            raise NotSupportedError(
                f"peft_type {data['peft_type']!r} is not a {cls.__name__} "
                f"(which is {cls.PEFT_TYPE}); use get_peft_config"
            )
        kwargs = {k: copy.deepcopy(v) for k, v in data.items() if k in names}
        if isinstance(kwargs.get("runtime_config"), dict):
            kwargs["runtime_config"] = LoraRuntimeConfig(**kwargs["runtime_config"])
        return cls(**kwargs)

    @classmethod
    def from_pretrained(
        cls: type[C], path: str | os.PathLike[str], subfolder: str | None = None
    ) -> C:
        """Read ``adapter_config.json`` from a directory (or the file itself); on
        ``PeftConfig`` itself, the class of its ``peft_type`` (as PEFT's ``PeftConfig``)."""
        data = read_config(path, subfolder)
        if "peft_type" not in data:  # not a PEFT config (PEFT raises the same)
            raise TypeError(
                f"The {cls.__name__} config that is trying to be loaded is missing required "
                "keys: {'peft_type'}."
            )
        target = config_class(data) if cls is PeftConfig else cls
        return target.from_dict(data)  # type: ignore[return-value]

    @classmethod
    def check_kwargs(cls, **kwargs: Any) -> dict[str, Any]:
        """PEFT's hook to check keyword arguments before a config is built (returns them)."""
        return kwargs

    @classmethod
    def from_peft_type(cls, **kwargs: Any) -> PeftConfig:
        """The config of ``kwargs["peft_type"]``'s class (or of this class without one)."""
        target: Any = cls if "peft_type" not in kwargs else config_class(kwargs)
        return target.from_dict(kwargs)  # type: ignore[no-any-return]

    @classmethod
    def from_json_file(
        cls, path_json_file: str | os.PathLike[str], **kwargs: Any
    ) -> dict[str, Any]:
        """The JSON object of a config file, as PEFT's (a dict; ``runtime_config`` dropped
        with a warning: it only exists at run time)."""
        del kwargs
        try:
            data = json.loads(Path(path_json_file).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {path_json_file}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path_json_file} does not hold a JSON object")
        if "runtime_config" in data:
            warnings.warn(
                "The configuration file contains a `runtime_config` key. This is ignored. "
                "Runtime configurations are only valid at runtime.",
                UserWarning,
                stacklevel=2,
            )
            del data["runtime_config"]
        return data

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
        """Upload ``adapter_config.json`` to the Hub repository ``repo_id`` (created when
        missing), as PEFT's; returns the commit's URL."""
        del max_shard_size, tags  # a config is one small file, and has no model card
        with tempfile.TemporaryDirectory(prefix="adaptc-config-") as tmp:
            self.save_pretrained(tmp)
            return push_files(
                tmp, repo_id, private=private, token=token, revision=revision,
                commit_message=commit_message or "Upload config",
                commit_description=commit_description, create_pr=create_pr, what="the config",
            )  # fmt: skip

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``adapter_config.json`` as PEFT does (sets as lists, sorted keys)."""
        out = {k: sorted(v) if isinstance(v, set) else _plain(v) for k, v in self.to_dict().items()}
        os.makedirs(save_directory, exist_ok=True)
        text = json.dumps(out, indent=2, sort_keys=True)
        Path(save_directory, PEFT_CONFIG_NAME).write_text(text, encoding="utf-8")

    @property
    def task_name(self) -> str | None:
        """``task_type`` as a plain string (or None)."""
        return None if self.task_type is None else str(_plain(self.task_type))

    @property
    def is_prompt_learning(self) -> bool:
        return False

    @property
    def is_adaption_prompt(self) -> bool:
        return False


@dataclass
class LoraConfig(PeftConfig):
    """PEFT's ``LoraConfig`` (peft 0.21), for the LoRA features adaptc implements.

    The arguments, their order and their defaults are PEFT's. As in PEFT, a list of
    ``target_modules``/``exclude_modules`` becomes a set and ``peft_type`` is always LORA.
    """

    task_type: TaskType | str | None = None
    peft_type: PeftType | str | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    r: int = 8
    target_modules: list[str] | set[str] | str | None = None
    exclude_modules: list[str] | set[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # Not supported by adaptc: PEFT's defaults only.
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: Any = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = False
    velora_config: Any = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: list[tuple[int, int]] | None = None
    runtime_config: Any = field(default_factory=LoraRuntimeConfig)
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False

    PEFT_TYPE: ClassVar[str] = "LORA"
    SUPPORTED: ClassVar[frozenset[str]] = SUPPORTED_ARGUMENTS

    def __post_init__(self) -> None:
        normalise_init_configs(self)  # loftq_config / eva_config, as PEFT's __post_init__
        super().__post_init__()


CONFIG_CLASSES: dict[str, type[PeftConfig]] = {"LORA": LoraConfig}  # peft_type -> class


def register_config(cls: type[PeftConfig]) -> type[PeftConfig]:
    """Make ``cls`` the config class of its ``PEFT_TYPE`` (a method's ``facade`` module)."""
    CONFIG_CLASSES[cls.PEFT_TYPE] = cls
    return cls


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """PEFT's ``get_peft_config``: a config object from a dict, by its ``peft_type``."""
    peft_type = config_dict.get("peft_type", "LORA")
    cls = CONFIG_CLASSES.get(_plain(peft_type))
    if cls is None:
        raise NotSupportedError(
            f"peft_type {peft_type!r} is not supported by adaptc "
            f"(supported: {', '.join(CONFIG_CLASSES)})"
        )
    config: PeftConfig = cls.from_dict(config_dict)
    return config


def config_class(data: dict[str, Any]) -> type[PeftConfig]:
    """The config class for ``adapter_config.json`` contents (LoraConfig when unknown:
    reading it then names the problem)."""
    return CONFIG_CLASSES.get(_plain(data.get("peft_type", "LORA")), LoraConfig)


def read_config(path: str | os.PathLike[str], subfolder: str | None = None) -> dict[str, Any]:
    """``adapter_config.json`` of a directory (or the file itself), as a dict."""
    file = Path(path) / subfolder if subfolder else Path(path)
    if file.is_dir():
        file = file / PEFT_CONFIG_NAME
    data = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return data


def config_of(compiled: nn.Module, name: str, inference_mode: bool) -> Any:
    """The config PEFT would hold for adapter ``name`` of a compiled model (its method's
    class: ``LoraConfig``, ``IA3Config``, …)."""
    info = compiled_info(compiled)
    assert info is not None
    try:
        data = info.spec.to_peft_config(name)
    except ValueError:  # a selector PEFT cannot express (`types`): the resolved module paths
        paths = [t.path for t in info.plan.selected(name, info.spec.adapters[name].method)]
        data = info.spec.to_peft_config(name, target_modules=paths)
    config: PeftConfig = config_class(data).from_dict(data)
    config.inference_mode = inference_mode
    return config


def _refuse_unsupported(config: PeftConfig) -> None:
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        if f.name in config.SUPPORTED:
            continue
        value = getattr(config, f.name)
        if f.name == "runtime_config":
            if value is None or value == LoraRuntimeConfig() or value == {}:
                continue
        elif f.default_factory is not dataclasses.MISSING:
            if value is None or value == f.default_factory():
                continue
        elif value == f.default:
            continue
        raise NotSupportedError(
            f"{type(config).__name__}({f.name}={value!r}): {f.name} is not supported by adaptc "
            f"(leave it at PEFT's default; see docs/peft-migration.md)"
        )


def _plain(value: Any) -> Any:
    """Enum members as their string values (what ``adapter_config.json`` holds)."""
    return value.value if isinstance(value, enum.Enum) else value
