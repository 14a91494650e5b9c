"""The training (and inference) passes, run on each graph after its branches are emitted.

Which passes run is the spec's ``compile:`` section (:class:`~adaptc.spec.CompileOptions`):

- ``dropout`` (``auto``, ``regenerate``, ``mask``; not ``save``) —
  :func:`~adaptc.compiler.dropout.regenerate_dropout`;
- ``fuse_siblings`` — :func:`~adaptc.compiler.fuse.fuse_siblings`;
- ``rematerialize`` — :func:`~adaptc.compiler.remat.rematerialize`;
- ``fuse_add`` (unmerged inference) — :func:`~adaptc.compiler.addmm.fuse_add` and
  :func:`~adaptc.compiler.addmm.functional_linears`.

They run in that order (the later ones match the nodes the earlier ones emit); each keeps
the graph's outputs and gradients (see each module).
"""

from __future__ import annotations

from torch import fx, nn

from adaptc.compiler.addmm import functional_linears, fuse_add
from adaptc.compiler.dropout import regenerate_dropout
from adaptc.compiler.fuse import fuse_siblings
from adaptc.compiler.remat import drop_regions, rematerialize
from adaptc.spec.compile_options import CompileOptions

__all__ = ["drop_regions", "optimise"]


def optimise(graph: fx.Graph, owner: nn.Module, options: CompileOptions) -> int:
    """Run the passes ``options`` switch on over ``graph``, whose modules live on ``owner``;
    returns the number of rewrites."""
    dropouts = 0 if options.dropout == "save" else regenerate_dropout(graph, owner, options.dropout)
    fused = fuse_siblings(graph, owner) if options.fuse_siblings else 0
    regions = rematerialize(graph, owner) if options.rematerialize else 0
    adds = fuse_add(graph, owner) if options.fuse_add else 0
    if options.fuse_add:
        adds += functional_linears(graph, owner)
    return dropouts + fused + regions + adds
