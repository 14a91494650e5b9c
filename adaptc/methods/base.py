"""What an adapter method is to the rest of adaptc: a :class:`Method` and its :class:`Branch`.

The plan asks a method for each target's *settings* (a frozen, printable dataclass of
the method's own), the compiler asks it to build a branch under the target layer and to
emit the branch's nodes into the graph that calls the layer, and the merge pass asks it
for the layer's new weights. A method works on a layer through the layer's
:class:`~adaptc.layers.LayerKind` (shapes, weight layout, reading and writing weights)
and never names a layer type itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import fx, nn

from adaptc.layers import LayerKind

__all__ = ["Branch", "Companions", "Method", "Settings", "UnsupportedByMethodError"]


class UnsupportedByMethodError(ValueError):
    """A method has no implementation for a target's layer kind."""


class Settings:
    """Marker base of a method's per-target settings (frozen dataclasses).

    Every settings class has the fields ``adapter`` (the adapter's name) and ``target``
    (the module's path in the user's model). A target *tied* to another one of its
    adapter (an output head sharing the input embedding's weight) names it in
    ``tied_to``: the compiler then ties the two branches (:meth:`Method.tie`)."""

    adapter: str
    target: str
    tied_to: str | None = None  # the path of the target whose branch this one follows


class Branch(nn.Module):
    """An adapter's trainable part on one target layer: a child of the (copied) layer,
    named ``<method prefix><adapter>``. It owns no tensor of the base layer."""

    method: ClassVar[str]
    adapter: str
    target: str
    tied_to: str | None = None  # set by Method.tie: the target of the branch it follows

    @property
    def file_path(self) -> str:
        """The path an adapter file keeps the branch's tensors under (the target's)."""
        return self.target

    def file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for what an adapter file holds, relative to :attr:`file_path`."""
        yield from self.named_parameters()

    def model_file_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(full key, tensor)`` for what an adapter file holds at the model level, shared by
        the adapter's branches (VeRA's ``base_model.vera_A``); one tensor per key."""
        return iter(())


@dataclass(frozen=True)
class Companions:
    """What :meth:`Method.companions` adds to an adapter: ``(method, path, settings)`` per
    target, and warnings for the plan."""

    targets: tuple[tuple[Method, str, Settings], ...] = ()
    warnings: tuple[str, ...] = ()


class Method(ABC):
    """One adapter method (LoRA, IA3, …); its package's ``method.py`` exposes ``METHOD``."""

    name: ClassVar[str]  # the spec's `method`
    prefix: ClassVar[str]  # the branch's child name is prefix + adapter name, as PEFT names it
    branch_type: ClassVar[type[Branch]]
    kinds: ClassVar[tuple[str, ...] | None] = None  # layer kinds it supports (None: all)
    # PEFT's default targets by ``config.model_type`` (a tuple of names, or a regex)
    default_targets: ClassVar[Mapping[str, tuple[str, ...] | str]] = {}
    title: ClassVar[str]  # the name in messages, e.g. "LoRA"

    def child_name(self, adapter: str) -> str:
        return f"{self.prefix}{adapter}"

    def supports(self, kind: LayerKind) -> bool:
        return self.kinds is None or kind.name in self.kinds

    def check_supported(self, kind: LayerKind, path: str) -> None:
        if not self.supports(kind):
            options = ", ".join(self.kinds or ())
            raise UnsupportedByMethodError(
                f"{path}: {self.name} does not support {kind.name} layers (supported: {options})"
            )

    # --- plan ---------------------------------------------------------------------------
    def with_defaults(self, spec: Any, model_type: str | None) -> Any:
        """The adapter's spec model with PEFT's defaults for ``model_type`` filled in where
        the method has some beside its targets (IA3's feed-forward modules); a ValueError
        when PEFT has none. Default: ``spec`` as it is."""
        return spec

    def with_model(self, spec: Any, model: nn.Module) -> Any:
        """The adapter's spec model with what PEFT derives from the model itself (its
        input embedding, its tied weights) filled in, after :meth:`with_defaults`. Default:
        ``spec`` as it is."""
        return spec

    def companions(
        self, model: nn.Module, spec: Any, adapter: str, targets: tuple[str, ...]
    ) -> Companions:
        """The adapter's targets beyond those its selectors resolved to (``targets``):
        layers tied to a target, LoRA's trainable tokens. ``spec`` is the adapter as given
        (after :meth:`with_defaults`, before :meth:`with_model`). A companion on a path
        that ``targets`` holds replaces that target. Raises ValueError as :meth:`check`
        does. Default: none."""
        return Companions()

    @abstractmethod
    def settings(
        self, kind: LayerKind, module: nn.Module, path: str, adapter: str, spec: Any
    ) -> Settings:
        """The target's settings from the adapter's spec model ``spec`` (pure)."""

    def check(self, kind: LayerKind, module: nn.Module, settings: Settings) -> list[str]:
        """Raise ValueError when the branch cannot be built; return warnings otherwise."""
        return []

    def columns(self) -> tuple[str, ...]:
        """Extra columns of the printed plan (``adaptc plan``)."""
        return ()

    def row(self, settings: Settings) -> tuple[str, ...]:
        return ()

    def plan_fields(self, settings: Settings) -> dict[str, Any]:
        """The settings in a plan's ``to_dict`` (``adapter``/``target`` are already there)."""
        out = asdict(settings)  # type: ignore[call-overload]
        out.pop("adapter", None)
        out.pop("target", None)
        return dict(out)

    # --- compile ------------------------------------------------------------------------
    @abstractmethod
    def make_branch(
        self, kind: LayerKind, module: nn.Module, settings: Settings
    ) -> tuple[Branch, dict[str, torch.Tensor]]:
        """A new, initialised branch, and replacements for base tensors (for inits that
        change the base weight, such as PiSSA); on the meta device it allocates nothing."""

    @abstractmethod
    def emit(
        self,
        graph: fx.Graph,
        call: fx.Node,
        x: fx.Node,
        current: fx.Node,
        *,
        kind: LayerKind,
        base: nn.Module,
        branch: Branch,
        branch_path: str,
    ) -> fx.Node:
        """Insert the branch's nodes; return the node holding the layer's new output.

        ``call`` is the ``call_module`` node of the base layer, ``x`` its input and
        ``current`` the output so far (``call`` itself, or the previous adapter's sum).
        A method may rewrite ``call``'s input (IA3 on a feed-forward layer scales it);
        the caller rewires the users of ``current`` to the returned node."""

    def tie(self, branch: Branch, source: Branch, settings: Settings) -> None:
        """Make ``branch`` (of a target whose ``settings`` name ``tied_to``) follow
        ``source``, the branch on that path: share or view its tensors. Default: refused."""
        raise ValueError(f"{branch.target}: {self.title} branches cannot be tied")

    def finish(self, model: nn.Module, adapter: str, spec: Any) -> None:
        """Called once per adapter of this method on the new compiled ``model`` (its root),
        after every branch is built and before the model is returned: model-level behaviour
        beyond the branches (a loss term or an input rewrite through a forward hook on the
        new root, prompt embeddings). ``spec`` is the adapter's spec model. It never touches
        the user's model. Default: nothing."""
        return None

    # --- merge --------------------------------------------------------------------------
    @abstractmethod
    def merge(
        self,
        kind: LayerKind,
        module: nn.Module,
        branch: Branch,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` with ``branch`` folded in; ``weight``/``bias`` are the layer's
        (possibly already merged with earlier adapters), in the layer's own layout."""
