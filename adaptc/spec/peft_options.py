"""A method's own keys of a PEFT config, for the methods whose keys map one to one onto
spec fields (LoHa, LoKr, VeRA, OFT, BOFT): copied, ``init_weights`` translated, anything
else refused by name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from adaptc.spec.method import Bad
from adaptc.spec.peft_targets import SELECTION_KEYS, selection_from_peft

__all__ = ["ENVELOPE", "options_from_peft"]

# what every adapter_config.json carries beside the method's keys (adaptc.spec.peft_config)
ENVELOPE = frozenset(
    {"peft_type", "peft_version", "auto_mapping", "inference_mode", "task_type",
     "base_model_name_or_path", "revision"}
)  # fmt: skip


def options_from_peft(
    cfg: Mapping[str, Any],
    bad: Bad,
    *,
    method: str,
    title: str,
    plain: Iterable[str],
    inits: Mapping[str, bool | str],
    patterns: Iterable[str] = (),
) -> dict[str, Any]:
    """The adapter's spec fields from PEFT's config ``cfg``: the selection keys, the keys in
    ``plain`` as they are, the non-empty ``patterns`` (``rank_pattern``…) as dicts, and
    ``init_weights`` as the spec's ``init`` (``inits``: spec value → PEFT value, PEFT's
    default first). Every other key with a value is refused by name through ``bad``."""
    plain, patterns = frozenset(plain), frozenset(patterns)
    adapter: dict[str, Any] = {"method": method}
    selection_from_peft(cfg, adapter)
    for key, value in cfg.items():
        if key in ENVELOPE or key in SELECTION_KEYS:
            continue
        if key in plain:
            adapter[key] = value
        elif key in patterns:
            if value:
                adapter[key] = dict(value)
        elif key == "init_weights":
            _init_from_peft(value, inits, adapter, bad)
        elif value not in (None, False, {}, [], ""):
            bad(key, f"{key!r} is not supported by adaptc for {title}")
    return adapter


def _init_from_peft(
    value: Any, inits: Mapping[str, bool | str], adapter: dict[str, Any], bad: Bad
) -> None:
    for position, (name, peft_value) in enumerate(inits.items()):
        same = value is peft_value if isinstance(peft_value, bool) else value == peft_value
        if same:
            if position:  # PEFT's default is the spec's default too
                adapter["init"] = name
            return
    shown = [str(v).lower() if isinstance(v, bool) else repr(v) for v in inits.values()]
    choices = " or ".join(shown) if len(shown) < 3 else ", ".join(shown[:-1]) + f" or {shown[-1]}"
    bad("init_weights", f"init_weights={value!r} is not supported by adaptc ({choices})")
