"""The model card (``README.md``) beside an adapter, as ``PeftModel.save_pretrained`` writes it.

PEFT's ``create_or_update_model_card`` starts from huggingface_hub's model-card template, or
updates the ``README.md`` already in the directory, and sets the metadata the Hub reads:

.. code-block:: yaml

    ---
    base_model: facebook/opt-125m
    library_name: peft
    pipeline_tag: text-generation          # causal-LM adapters only
    tags:
    - base_model:adapter:facebook/opt-125m
    - lora
    - transformers
    ---

adaptc writes the same keys with the same values, and differs where PEFT's card breaks an
upload or loses what a user wrote:

- ``base_model`` (and its ``base_model:adapter:`` tag) only when the base model is a hub id.
  PEFT writes the base model's ``name_or_path`` as it is: a local path, or ``''`` for a model
  built from a config, which the Hub refuses (``"base_model" is not allowed to be empty``);
  an existing ``base_model`` is then kept.
- The tags of an existing card are kept (PEFT replaces them), plus ``adaptc``.
- ``### Framework versions`` lists ``adaptc`` (not PEFT, which did not write the files).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from adaptc.atomic import atomic_write_text
from adaptc.compiler import compiled
from adaptc.hub import is_hub_id
from adaptc.methods.registry import method
from adaptc.spec import Spec

__all__ = [
    "CARD_NAME",
    "LIBRARY_NAME",
    "existing_card",
    "model_card",
    "name_or_path",
    "write_model_card",
]

CARD_NAME = "README.md"

# The library the Hub shows as the one that loads the repository: its "Use this model"
# snippet (``PeftModel.from_pretrained``), its library filter, and the inference providers
# that serve LoRA adapters (they read ``library_name: peft`` with the ``base_model:adapter:``
# tag). adaptc writes PEFT's file format precisely so that peft (and vLLM, transformers'
# ``load_adapter``) load it, so ``peft`` is what the card says; ``adaptc``, a name the Hub
# does not know, would lose all of these. The ``adaptc`` tag and the framework versions say
# which tool wrote the files, and ``adaptc_spec.yaml`` beside them holds the spec.
LIBRARY_NAME = "peft"

_VERSIONS_HEADING = "### Framework versions"
_PEFT_TASK_PIPELINES = {"CAUSAL_LM": "text-generation"}  # the one PEFT is sure of


def name_or_path(model: nn.Module) -> str | None:
    """Where the base model was loaded from (transformers' ``name_or_path``), or None."""
    name = model.__dict__.get("name_or_path") or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    return str(name) if name else None


def existing_card(directory: str | os.PathLike[str]) -> str | None:
    """The text of the ``README.md`` in ``directory``, or None when there is none."""
    path = Path(directory) / CARD_NAME
    return path.read_text(encoding="utf-8") if path.is_file() else None


def model_card(
    model: nn.Module,
    spec: Spec,
    *,
    existing: str | None = None,
    tags: Iterable[str] = (),
    where: str = CARD_NAME,
) -> str:
    """The ``README.md`` for the adapters of ``spec`` saved from ``model``.

    ``existing`` is the card to update (its text, metadata and tags are kept; ``where``
    names it in errors); ``tags`` are added to the card's tags.
    """
    base = _hub_base_model(model, spec)
    if existing is None:
        data = ModelCardData(library_name=LIBRARY_NAME, base_model=base)
        card = ModelCard.from_template(data, model_summary=_summary(spec, base))
    else:
        try:
            card = ModelCard(existing)
        except Exception as exc:  # huggingface_hub's YAML and layout errors
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(
                f"{where}: cannot update the model card: {first} (fix or remove it)"
            ) from None
        card.data["library_name"] = LIBRARY_NAME
        if base is not None:
            card.data["base_model"] = base
    card.data["tags"] = _tags(card.data.tags, model, spec, base, tags)
    pipeline = _PEFT_TASK_PIPELINES.get(str(spec.task_type))
    if not card.data.pipeline_tag and pipeline is not None:
        card.data.pipeline_tag = pipeline
    card.text = _with_version(card.text)
    return str(card)


def write_model_card(
    directory: str | os.PathLike[str],
    model: nn.Module,
    *,
    adapters: Sequence[str] | None = None,
    tags: Iterable[str] = (),
) -> Path:
    """Create or update ``directory/README.md`` for ``model``'s adapters (all, or those
    named), atomically; PEFT's ``create_or_update_model_card``. Returns the card's path."""
    info = compiled(model, "write_model_card()")
    spec = info.spec
    if adapters is not None:
        missing = [n for n in adapters if n not in spec.adapters]
        if missing:
            raise ValueError(
                f"the model has no adapter {missing[0]!r} (has: {', '.join(spec.adapters)})"
            )
        spec = spec.with_adapters({n: spec.adapters[n] for n in adapters})
    path = Path(directory) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    text = model_card(model, spec, existing=existing_card(directory), tags=tags, where=str(path))
    atomic_write_text(path, text)
    return path


def _hub_base_model(model: nn.Module, spec: Spec) -> str | None:
    """The base model's hub id, or None when it has none (a local path, a config)."""
    name = spec.base_model.name if spec.base_model is not None else name_or_path(model)
    if name is None or not is_hub_id(name) or Path(name).exists():
        return None
    return name


def _tags(
    current: Any, model: nn.Module, spec: Spec, base: str | None, extra: Iterable[str]
) -> list[str]:
    tags = {str(t) for t in (current or [])}
    if base is not None:  # one base model: a stale adapter tag from an earlier save goes
        tags = {t for t in tags if not t.startswith("base_model:adapter:")}
        tags.add(f"base_model:adapter:{base}")
    tags.update(getattr(model, "model_tags", None) or ())  # transformers' add_model_tags
    # a transformers model is one only once transformers is imported: no import here
    tf = sys.modules.get("transformers")
    if tf is not None and isinstance(model, tf.PreTrainedModel):
        tags.add("transformers")
    tags.update(adapter.method for adapter in spec.adapters.values())  # "lora", as PEFT
    tags.add("adaptc")
    tags.update(extra)
    return sorted(tags)


def _summary(spec: Spec, base: str | None) -> str:
    titles = sorted({method(a.method).title for a in spec.adapters.values()})
    kind = " and ".join(titles)
    target = f"`{base}`" if base is not None else "its base model"
    article = "An" if kind[:1] in "AEIOU" else "A"
    return (
        f"{article} {kind} adapter for {target}, written by adaptc in PEFT's file format: "
        "`peft.PeftModel.from_pretrained` and `adaptc.load_adapter` load it. "
        "`adaptc_spec.yaml` holds the adaptc spec it was compiled from."
    )


def _with_version(text: str) -> str:
    """``text`` with ``- adaptc X`` under ``### Framework versions`` (added when missing)."""
    line = f"- adaptc {_version()}"
    lines = text.splitlines()
    if line in lines:
        return text
    if _VERSIONS_HEADING in lines:
        lines.insert(lines.index(_VERSIONS_HEADING) + 2, line)
    else:
        lines.append(f"{_VERSIONS_HEADING}\n\n{line}")
    return "\n".join(lines)


def _version() -> str:
    try:
        return version("adaptc")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"
