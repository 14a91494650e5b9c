"""``nn.Embedding``: a LoRA branch whose factors are looked up, not multiplied (PEFT ``Embedding``).

The update is ``x ↦ s · embed(x, Aᵀ) · Bᵀ`` with ``A``: (r, num_embeddings) and ``B``:
(embedding_dim, r), stored as the parameters ``lora_embedding_A``/``lora_embedding_B``
(PEFT's names, so adapter files keep their keys). The lookup uses the base layer's
``padding_idx``, ``max_norm``, ``norm_type``, ``scale_grad_by_freq`` and ``sparse``, as
PEFT's ``_embed`` does. As in PEFT:

* no dropout is ever applied (``lora_dropout`` is accepted and ignored, with a warning);
* ``lora_bias`` is refused;
* every init except ``random`` and ``mica`` gives ``A = 0`` and ``B ~ N(0, 1)``: PEFT's
  ``reset_lora_parameters`` has no gaussian/PiSSA/OLoRA/orthogonal branch for embeddings,
  so ``gaussian``, ``pissa``, ``olora`` and ``orthogonal`` behave as ``default`` (with a
  warning) and the base weight is left alone; ``random`` (PEFT's
  ``init_lora_weights=False``) keeps both factors ``N(0, 1)``; ``mica`` factors ``Wᵀ``
  (``A = 0``, ``B`` its minor left singular vectors, frozen), after the same draws;
* a scalar ``embed_scale`` on the base layer (e.g. Gemma 3's scaled embeddings) also scales
  the update, cast first to the base weight's dtype when it is a Python number.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from adaptc.methods.lora.branch import FrozenFactor, LoraBranch
from adaptc.methods.lora.init import freezes_B, init_factors, init_problem
from adaptc.methods.lora.rule import (
    BranchConfig,
    LoraRule,
    Merged,
    adapter_dtype,
    round_as_peft,
)

__all__ = ["EmbeddingBranch", "EmbeddingRule", "embed_scale", "make_embedding_branch"]


class EmbeddingBranch(LoraBranch):
    """``x ↦ s · F.embedding(x, Aᵀ) · Bᵀ``; no ``lora_A``/``lora_B`` modules, no dropout."""

    def __init__(
        self,
        lora_embedding_A: torch.Tensor,  # (r, num_embeddings)
        lora_embedding_B: torch.Tensor,  # (embedding_dim, r)
        *,
        scaling: float,
        adapter: str,
        target: str,
        r: int,
        lora_alpha: float,
        padding_idx: int | None,
        max_norm: float | None,
        norm_type: float,
        scale_grad_by_freq: bool,
        sparse: bool,
    ) -> None:
        nn.Module.__init__(self)  # not LoraBranch.__init__: the factors are bare parameters
        self.lora_embedding_A = nn.Parameter(lora_embedding_A)
        self.lora_embedding_B = nn.Parameter(lora_embedding_B)
        self.lora_dropout = None
        self.scaling = scaling
        self.adapter = adapter
        self.target = target
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_bias = False
        self.fan_in_fan_out = True  # the base weight is (num_embeddings, embedding_dim)
        self.padding_idx = padding_idx
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.scale_grad_by_freq = scale_grad_by_freq
        self.sparse = sparse

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``embed(x, Aᵀ)``: (…,) indices → (…, r).

        With ``max_norm`` set, ``F.embedding`` renormalises rows of ``Aᵀ`` in place, i.e. it
        writes into ``lora_embedding_A``, exactly as PEFT does.
        """
        return F.embedding(
            x,
            self.lora_embedding_A.T,  # (num_embeddings, r)
            padding_idx=self.padding_idx,
            max_norm=self.max_norm,
            norm_type=self.norm_type,
            scale_grad_by_freq=self.scale_grad_by_freq,
            sparse=self.sparse,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.embed(x) @ self.lora_embedding_B.T) * self.scaling_operand  # (…, dim)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A, self.lora_embedding_B  # (r, num), (dim, r)


def embed_scale(module: nn.Module) -> torch.Tensor | float | None:
    """The scalar ``embed_scale`` PEFT multiplies the update by, or None (PEFT's rule).

    A Python number becomes a tensor in the base weight's dtype first (so it is rounded to
    bf16 on a bf16 model), as PEFT's ``_get_embed_scale`` does; a tensor with more than one
    element is ignored.
    """
    scale = getattr(module, "embed_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return float(torch.tensor(scale, dtype=weight.dtype).item())
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        return scale
    return None


class EmbeddingRule(LoraRule):
    """``y = embed(x, W₀) + s · embed(x, Aᵀ) · Bᵀ`` (× ``embed_scale`` if the layer has one)."""

    batch_form = "embedding"  # its mixed-batch kernel (adaptc.adapters.mixed)

    def check(self, module: nn.Module, cfg: BranchConfig) -> list[str]:
        _refuse(module, cfg)
        warnings = []
        fan_in, fan_out = self.features(module)
        if cfg.r > min(fan_in, fan_out):
            warnings.append(
                f"{cfg.target}: r={cfg.r} exceeds min(num_embeddings, embedding_dim) = "
                f"{min(fan_in, fan_out)}; the update cannot use the extra rank"
            )
        if cfg.init in _DEFAULT_INITS:
            warnings.append(
                f"{cfg.target}: init {cfg.init!r} does not apply to embeddings; as in PEFT, "
                "the branch gets the default init (A = 0, B normal) and the base weight is kept"
            )
        if cfg.lora_dropout > 0:
            warnings.append(
                f"{cfg.target}: lora_dropout is not applied to embeddings (nor by PEFT)"
            )
        scale = getattr(module, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            warnings.append(
                f"{cfg.target}: embed_scale has shape {tuple(scale.shape)}, not a scalar; as in "
                "PEFT, the update is not scaled by it"
            )
        return warnings

    def refuse(self, module: nn.Module, cfg: BranchConfig) -> None:
        _refuse(module, cfg)

    def make_plain_branch(
        self, module: nn.Module, cfg: BranchConfig
    ) -> tuple[LoraBranch, dict[str, torch.Tensor]]:
        return make_embedding_branch(module, cfg), {}

    def emit_plain(
        self,
        graph: fx.Graph,
        x: fx.Node,
        base_out: fx.Node,
        *,
        base: nn.Module,
        base_path: str,
        branch: LoraBranch,
        branch_path: str,
    ) -> fx.Node:
        """``out = base_out + branch(x) [* embed_scale]``, cast back to the base dtype if needed.

        Before::

            def forward(self, x):
                emb = self.emb(x);  x = None
                return emb

        After (r = 8, lora_alpha = 16)::

            def forward(self, x):
                emb = self.emb(x)
                emb_lora_default = self.emb.lora_default(x);  x = None
                add = emb + emb_lora_default;  emb = emb_lora_default = None
                return add
        """
        assert isinstance(branch, EmbeddingBranch)
        base_dtype = self.kind.compute_dtype(base)
        lora_dtype = branch.lora_embedding_A.dtype
        with graph.inserting_before(base_out.next):
            delta = graph.call_module(branch_path, (x,))
            scale = emit_embed_scale(graph, base, base_path, lora_dtype)
            if scale is not None:
                delta = graph.call_function(operator.mul, (delta, scale))
            out = graph.call_function(operator.add, (base_out, delta))
            if base_dtype != lora_dtype:
                out = graph.call_method("to", (out, base_dtype))
        return out

    def delta_weight(self, module: nn.Module, branch: LoraBranch) -> torch.Tensor:
        assert isinstance(branch, EmbeddingBranch)
        # (num_embeddings, embedding_dim), PEFT's transpose(B @ A, True) * s
        return (branch.lora_embedding_B @ branch.lora_embedding_A).T * branch.scaling

    def merge_plain(self, module: nn.Module, branch: LoraBranch, weight: torch.Tensor) -> Merged:
        return Merged(weight + self.delta_weight(module, branch).to(weight.dtype))


# inits PEFT's embeddings do not have: they get the default one
_DEFAULT_INITS = ("gaussian", "pissa", "olora", "orthogonal", "eva")


def _refuse(module: nn.Module, cfg: BranchConfig) -> None:
    assert isinstance(module, nn.Embedding)
    if cfg.lora_bias:
        raise ValueError(
            f"{cfg.target}: lora_bias is not supported for nn.Embedding (PEFT refuses it too)"
        )
    if cfg.init == "loftq":
        raise ValueError(
            f"{cfg.target}: init 'loftq' is not available on nn.Embedding layers "
            "(PEFT's LoftQ fails on them); linear layers only"
        )
    if cfg.init == "mica":
        dims = (module.num_embeddings, module.embedding_dim)
        problem = init_problem(cfg.init, cfg.r, *dims, module.weight.dtype)
        if problem is not None:
            raise ValueError(f"{cfg.target}: {problem}")


def emit_embed_scale(
    graph: fx.Graph, base: nn.Module, base_path: str, dtype: torch.dtype
) -> fx.Node | float | None:
    """The base layer's scalar ``embed_scale`` as a graph value in ``dtype``, or None."""
    scale = embed_scale(base)
    if isinstance(scale, torch.Tensor):
        node = graph.get_attr(f"{base_path}.embed_scale")
        return graph.call_method("to", (node, dtype))
    return scale


def make_embedding_branch(module: nn.Module, cfg: BranchConfig) -> EmbeddingBranch:
    """An initialised plain branch (see the module docstring for the inits)."""
    assert isinstance(module, nn.Embedding)
    weight = module.weight
    device, dtype = weight.device, adapter_dtype(weight)
    shape_A, shape_B = (cfg.r, module.num_embeddings), (module.embedding_dim, cfg.r)
    if weight.device.type == "meta":
        A = torch.empty(shape_A, device=device, dtype=dtype)
        B = torch.empty(shape_B, device=device, dtype=dtype)
    else:  # drawn as PEFT draws them (randn on the CPU first): same seed, same weights
        A = torch.randn(shape_A).to(device=device, dtype=dtype)
        B = torch.randn(shape_B).to(device=device, dtype=dtype)
        if cfg.init == "mica":  # of Wᵀ: (embedding_dim, num_embeddings)
            init_factors(A, B, None, init="mica", scaling=cfg.scaling, weight=weight.T)
        elif cfg.init != "random":  # PEFT's init_lora_weights=False keeps the randn draws
            with torch.no_grad():
                nn.init.zeros_(A)
                nn.init.normal_(B)
        round_as_peft(weight.dtype, A, B)
    branch = EmbeddingBranch(
        A,
        B,
        scaling=cfg.scaling,
        adapter=cfg.adapter,
        target=cfg.target,
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        padding_idx=module.padding_idx,
        max_norm=module.max_norm,
        norm_type=module.norm_type,
        scale_grad_by_freq=module.scale_grad_by_freq,
        sparse=module.sparse,
    )
    if freezes_B(cfg.init):  # MiCA: only A trains
        branch.lora_embedding_B = FrozenFactor(branch.lora_embedding_B.detach())
    return branch
