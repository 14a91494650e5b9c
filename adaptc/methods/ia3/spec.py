"""IA3 in the spec: the adapter's settings and PEFT's ``IA3Config`` both ways.

``init_ia3_weights`` True/False becomes ``init: ones``/``random``; ``feedforward_modules``
becomes ``feedforward``, a tagged selector like ``targets``: ``names`` (a list),
``regex`` (a string) or ``none`` (PEFT's empty list; omitted is PEFT's ``None``, the
model type's default). PEFT's ``IA3Config`` has no ``layers_to_transform``: a spec's
``layers`` is written to PEFT as the resolved module paths (which needs the model).
Options adaptc does not implement are refused by name instead of being dropped.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from adaptc.spec.fields import (
    ExcludeField,
    FanInFanOutField,
    FieldError,
    LayerSelection,
    ModulesToSaveField,
    NameTargets,
    RegexTargets,
    Targets,
    TargetsField,
    check_selection,
    closed,
)
from adaptc.spec.method import PEFT_FORMAT_VERSION, Bad, MethodSpec
from adaptc.spec.peft_targets import SELECTION_KEYS, selection_from_peft, selection_to_peft

__all__ = ["SPEC", "Feedforward", "IA3Adapter", "NoModules", "is_feedforward"]


class NoModules(BaseModel):
    """No module at all (PEFT's empty list, which differs from an omitted field)."""

    model_config = closed()
    kind: Literal["none"] = Field(
        description="Select no module: every target scales its output (PEFT "
        "`feedforward_modules: []`)."
    )


Feedforward = Annotated[NameTargets | RegexTargets | NoModules, Field(discriminator="kind")]


class IA3Adapter(BaseModel):
    """One (IA)³ adapter: a learned vector ``l`` rescales each target's output,
    ``x ↦ W₀x·l`` (``l``: out_features), or, on a feed-forward target, its input,
    ``x ↦ W₀(x·l)`` (``l``: in_features)."""

    model_config = closed("IA3Adapter")

    method: Literal["ia3"] = Field(
        description="Adapter method `ia3`: (IA)³ scaling vectors (PEFT `IA3Config`)."
    )
    targets: TargetsField = None
    exclude: ExcludeField = None
    layers: LayerSelection | None = Field(
        default=None,
        description="Adapt only the targets inside these layer indices. PEFT's `IA3Config` has "
        "no `layers_to_transform`: a saved adapter lists the resolved module paths instead.",
    )
    feedforward: Feedforward | None = Field(
        default=None,
        description="Targets treated as feed-forward layers, whose *input* is scaled (PEFT "
        "`feedforward_modules`): `names` (a target is feed-forward when its full name ends "
        "with an entry, a plain string suffix as in PEFT; with `targets` of kind `names` each "
        "entry must also be a target name), `regex` (whole-name match) or `none`. When "
        "omitted, PEFT's default feed-forward modules for the model type are used.",
    )
    fan_in_fan_out: FanInFanOutField = False
    init: Literal["ones", "random"] = Field(
        default="ones",
        description="Initialisation of the vectors: `ones` (starts as a no-op) or `random` "
        "(standard normal; for tests). PEFT `init_ia3_weights` true/false.",
    )
    modules_to_save: ModulesToSaveField = ()

    @model_validator(mode="after")
    def _cross_field_rules(self) -> IA3Adapter:
        check_selection(self.targets, self.exclude, self.layers, self.modules_to_save)
        if isinstance(self.targets, NameTargets) and isinstance(self.feedforward, NameTargets):
            missing = [n for n in self.feedforward.names if n not in self.targets.names]
            if missing:
                raise FieldError(
                    ("feedforward", "names"),
                    f"{missing[0]!r} is in feedforward.names but not in targets.names: "
                    "feed-forward modules must be targets (as PEFT requires)",
                )
        return self


def is_feedforward(feedforward: Feedforward | None, path: str) -> bool:
    """PEFT's ``_check_target_module_feedforward`` for the target at ``path``: a regex
    must match the whole path; names are plain string suffixes (``str.endswith``)."""
    if isinstance(feedforward, NameTargets):
        return any(path.endswith(name) for name in feedforward.names)
    if isinstance(feedforward, RegexTargets):
        return re.fullmatch(feedforward.pattern, path) is not None
    return False


# IA3Config.to_dict() of peft 0.21.2 with its defaults, in its key order.
_PEFT_DEFAULTS: dict[str, Any] = {
    "task_type": None,
    "peft_type": "IA3",
    "auto_mapping": None,
    "peft_version": PEFT_FORMAT_VERSION,
    "base_model_name_or_path": None,
    "revision": None,
    "inference_mode": False,
    "target_modules": None,
    "exclude_modules": None,
    "feedforward_modules": None,
    "fan_in_fan_out": False,
    "modules_to_save": None,
    "init_ia3_weights": True,
}
_ENVELOPE = {"peft_type", "peft_version", "auto_mapping", "inference_mode", "task_type"}
_ENVELOPE |= {"base_model_name_or_path", "revision"}
_NO_LAYERS = ("layers_to_transform", "layers_pattern")  # LoraConfig's; IA3Config has neither


def to_peft(a: IA3Adapter, target_modules: list[str] | None) -> dict[str, Any]:
    """PEFT's ``IA3Config`` for ``a``, in its key order (envelope keys at their defaults).

    A ``feedforward`` name list that is not a subset of the target names (PEFT's default
    for the model type, or with resolved ``target_modules`` paths) is written so that
    PEFT's subset check accepts the file and selects the same layers: as the feed-forward
    paths among resolved ``target_modules``, else as the equivalent regex."""
    cfg = copy.deepcopy(_PEFT_DEFAULTS)
    selection = selection_to_peft(a, target_modules)
    if a.layers is not None:
        if target_modules is None:
            raise ValueError(
                "layers has no PEFT equivalent for IA3 (IA3Config has no layers_to_transform): "
                "compile the spec onto a model (the saved adapter_config.json lists the "
                "resolved module paths)"
            )
        for key in _NO_LAYERS:
            selection.pop(key, None)
    cfg.update(selection)
    cfg["feedforward_modules"] = _feedforward_to_peft(a.feedforward, a.targets, target_modules)
    cfg["fan_in_fan_out"] = a.fan_in_fan_out
    cfg["init_ia3_weights"] = a.init == "ones"
    return cfg


def _feedforward_to_peft(
    feedforward: Feedforward | None, targets: Targets | None, target_modules: list[str] | None
) -> list[str] | str | None:
    if feedforward is None:
        return None
    if isinstance(feedforward, NoModules):
        return []
    if isinstance(feedforward, RegexTargets):
        return feedforward.pattern
    names = sorted(feedforward.names)
    listed = target_modules
    if listed is None and isinstance(targets, NameTargets):
        listed = list(targets.names)
    if listed is None or set(names) <= set(listed):
        return names
    if target_modules is not None:  # module paths: the feed-forward ones among them
        return sorted(t for t in target_modules if is_feedforward(feedforward, t))
    # PEFT's own default feed-forward names need not be targets, but PEFT then cannot read
    # back the file it writes (its subset check): the same rule as a regex, which it can
    return ".*(?:" + "|".join(re.escape(n) for n in names) + ")"


def from_peft(cfg: Mapping[str, Any], bad: Bad) -> dict[str, Any]:
    """The adapter's spec fields from PEFT's ``IA3Config``; unsupported options are refused."""
    adapter: dict[str, Any] = {"method": "ia3"}
    selection_from_peft({k: v for k, v in cfg.items() if k not in _NO_LAYERS}, adapter)
    for key, value in cfg.items():
        if key in _ENVELOPE or (key in SELECTION_KEYS and key not in _NO_LAYERS):
            continue
        if key == "feedforward_modules":
            if value is not None:
                adapter["feedforward"] = _feedforward_from_peft(value)
        elif key == "fan_in_fan_out":
            adapter["fan_in_fan_out"] = value
        elif key == "init_ia3_weights":
            if value is False:
                adapter["init"] = "random"
            elif value is not True:
                bad(key, f"init_ia3_weights={value!r} is not supported by adaptc (true or false)")
        elif key in _NO_LAYERS:
            if value not in (None, [], ""):
                bad(
                    key,
                    f"{key!r} is not an IA3 option (PEFT's IA3Config has no {key}, and peft "
                    "ignores it): name the modules in target_modules instead",
                )
        elif value not in (None, False, {}, [], ""):
            bad(key, f"{key!r} is not supported by adaptc for IA3")
    return adapter


def _feedforward_from_peft(value: Any) -> Any:
    if isinstance(value, str):
        return {"kind": "regex", "pattern": value}
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        if not value:
            return {"kind": "none"}
        # PEFT keeps a list as a set (written in arbitrary order): sort for a stable spec
        return {"kind": "names", "names": sorted(set(value))}
    return value  # the spec's validation names the problem


SPEC = MethodSpec(
    name="ia3",
    model=IA3Adapter,
    peft_type="IA3",
    from_peft=from_peft,
    to_peft=to_peft,
    peft_has_layers=False,
    peft_keys={
        "targets": "target_modules",
        "exclude": "exclude_modules",
        "feedforward": "feedforward_modules",
        "init": "init_ia3_weights",
    },
)
