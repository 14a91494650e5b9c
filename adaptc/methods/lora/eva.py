"""EVA's arithmetic (Explained Variance Adaptation, PEFT's ``init_lora_weights="eva"``): an
incremental SVD of a layer's inputs, the redistribution of an adapter's rank budget by
explained variance, and the short suffixes PEFT writes as ``target_modules`` afterwards.

The data-driven step that feeds them (hooks on the layers of a compiled model, the
dataloader's batches) is :mod:`adaptc.adapters.eva`.

:class:`IncrementalSVD` is scikit-learn's incremental PCA as PEFT runs it
(``peft.utils.incremental_pca``, ``lowrank=True``): each batch ``X`` (n, in) is centred,
stacked under the previous components scaled by their singular values and a mean
correction row, and decomposed by ``torch.svd_lowrank`` (``q = 2k``, 4 subspace iterations,
seed 42 in a forked RNG, so the global RNG is left as it was); the signs are fixed by each
right singular vector's largest entry. The same operations in the same order, so the same
batches give PEFT's components bit for bit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = ["IncrementalSVD", "first_of_equal", "minimal_suffixes", "rank_distribution"]

_SEED = 42  # PEFT's lowrank_seed
_NITER = 4  # PEFT's lowrank_niter


class IncrementalSVD:
    """The top ``n_components`` right singular vectors of all rows seen, batch by batch.

    After :meth:`partial_fit`: ``components`` (k, in), ``singular_values`` (k,) and
    ``explained_variance_ratio`` (k,). The first batch's are float32, later ones float64
    (the mean correction is float64), as in PEFT.
    """

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.q = 2 * n_components  # svd_lowrank's oversampled rank
        self.components: torch.Tensor | None = None
        self.singular_values = torch.empty(0)
        self.explained_variance_ratio = torch.empty(0)
        self.mean: torch.Tensor | None = None  # float64 (in,)
        self.var: torch.Tensor | None = None  # float64 (in,)
        self.seen = torch.tensor([0])

    @property
    def fitted(self) -> bool:
        return self.components is not None

    @torch.no_grad()
    def partial_fit(self, batch: torch.Tensor) -> None:
        """Update the decomposition with ``batch`` (n, in), n ≥ ``n_components``."""
        X = batch.clone()
        n, features = X.shape
        if self.n_components > features:
            raise ValueError(
                f"{self.n_components} components need at least as many input features; the "
                f"layer's inputs have {features}"
            )
        if X.dtype not in (torch.float32, torch.float64):
            X = X.to(torch.float32)
        if self.components is None:
            self.seen = torch.tensor([0], device=X.device)
        mean, var, total = self._mean_and_var(X)
        if self.components is None:
            X -= mean
        else:
            assert self.mean is not None
            batch_mean = torch.mean(X, dim=0)
            X -= batch_mean
            factor = torch.sqrt((self.seen.double() / total) * n)
            correction = factor * (self.mean - batch_mean)  # (in,) float64
            X = torch.vstack((self.singular_values.view((-1, 1)) * self.components, X, correction))
        with torch.random.fork_rng():
            torch.manual_seed(_SEED)
            _, S, V = torch.svd_lowrank(X, q=self.q, niter=_NITER)
        Vt = V.mH  # (q', in)
        rows = torch.argmax(torch.abs(Vt), dim=1)
        Vt *= torch.sign(Vt[range(Vt.shape[0]), rows]).view(-1, 1)
        ratio = S**2 / torch.sum(var * total)
        self.seen = total
        self.components = Vt[: self.n_components]
        self.singular_values = S[: self.n_components]
        self.mean, self.var = mean, var
        self.explained_variance_ratio = ratio[: self.n_components]

    def _mean_and_var(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The running mean and variance (float64) and sample count with ``X`` added."""
        last_mean, last_var, last_count = self.mean, self.var, self.seen
        count = torch.tensor([X.shape[0]], device=X.device)
        total = last_count + count
        if last_mean is None:
            last_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
        else:
            last_sum = last_mean * last_count
        new_sum = X.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / total
        centred = X - new_sum / count
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        centred.square_()
        unnormalised = centred.sum(dim=0, dtype=torch.float64)
        unnormalised -= correction / count
        if last_var is None:
            return mean, unnormalised / total, total
        last_over_new = last_count.double() / count
        unnormalised = (
            last_var * last_count
            + unnormalised
            + last_over_new / total * (last_sum / last_over_new - new_sum).square()
        )
        return mean, unnormalised / total, total


def rank_distribution(
    ratios: Mapping[str, torch.Tensor],
    layers: Mapping[str, str],
    shared: Mapping[str, str],
    budget: int,
    max_components: Mapping[str, int],
) -> dict[str, int]:
    """Each layer's rank: the ``budget`` largest explained-variance ratios over all layers.

    ``ratios`` are per SVD (by the name of the layer that computes it), ``layers`` maps each
    layer to the SVD it uses (itself, or the layer whose input it shares: ``shared``), and a
    layer takes at most ``max_components`` of them. A layer that shares another's input never
    gets more than it: their ranks are swapped when it would (PEFT's rule, ties included)."""
    keys: list[str] = []
    values: list[torch.Tensor] = []
    for layer, source in layers.items():
        for value in ratios[source][: max_components[source]]:
            keys.append(layer)
            values.append(value)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget])
    ranks = {layer: counts.get(layer, 0) for layer in layers}
    for layer, source in shared.items():
        if ranks[source] < ranks[layer]:
            ranks[source], ranks[layer] = ranks[layer], ranks[source]
    return ranks


def minimal_suffixes(targets: Iterable[str], others: Iterable[str]) -> set[str]:
    """The fewest dotted suffixes that match every name of ``targets`` and none of
    ``others`` (PEFT's ``_find_minimal_target_modules``, which writes a long list of EVA's
    targets as e.g. ``{"q_proj", "v_proj"}``)."""
    wanted = set(targets)
    avoid = {suffix for name in others for suffix in _suffixes(name)}
    found: set[str] = set()
    for name, suffixes in sorted(((n, _suffixes(n)) for n in wanted), key=lambda t: t[1]):
        for suffix in suffixes:  # shortest first
            if suffix in found or suffix in avoid:
                continue
            if not any(name.endswith("." + f) for f in found):
                found.add(suffix)
                break
    return found or wanted


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))][::-1]


def first_of_equal(digests: Sequence[tuple[str, object]]) -> dict[str, str]:
    """``{layer: the first layer with the same digest}`` for every layer that repeats one,
    group by group in order of first appearance (PEFT's ``find_equal_values`` order)."""
    groups: dict[object, list[str]] = {}
    for layer, digest in digests:
        groups.setdefault(digest, []).append(layer)
    return {layer: g[0] for g in groups.values() if len(g) > 1 for layer in g[1:]}
