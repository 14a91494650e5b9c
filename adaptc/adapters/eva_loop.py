"""EVA's loop over a dataloader (:mod:`adaptc.adapters.eva`): forward hooks on the target
layers (:class:`Probe`), PEFT's default functions for language-modelling batches, and
:func:`collect`, which runs PEFT's steps 1-3 and returns each layer's components."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adaptc.methods.lora.eva import IncrementalSVD, first_of_equal, rank_distribution
from adaptc.methods.lora.method import pattern_value
from adaptc.methods.lora.spec import EvaSettings, LoraAdapter

__all__ = [
    "ForwardFn",
    "LayerInputsFn",
    "ModelInputsFn",
    "collect",
    "forward_dict",
    "language_modeling_inputs",
    "language_modeling_positions",
]

logger = logging.getLogger(__name__)

ForwardFn = Callable[[nn.Module, Any], Any]
ModelInputsFn = Callable[[Any, EvaSettings], Any]
LayerInputsFn = Callable[[Any, Any, str], torch.Tensor]
_RHO_LIMIT = 1000  # PEFT caps larger rho values by the model's largest dimension / r


def forward_dict(model: nn.Module, inputs: Any) -> Any:
    """PEFT's ``forward_fn_dict``: ``model(**inputs)``."""
    return model(**inputs)


def language_modeling_positions(inputs: Any, settings: EvaSettings) -> torch.Tensor:
    """The (batch, token) positions whose layer inputs enter the SVD, (n, 2): those the
    ``attention_mask`` keeps (all without one) and, with ``use_label_mask``, whose label is
    not ``label_mask_value`` (PEFT's ``prepare_model_inputs_fn_language_modeling``)."""
    if not isinstance(inputs, Mapping):
        raise TypeError(
            "When using `prepare_model_inputs_fn_language_modeling` inputs must be a dictionary"
        )
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    if settings.use_label_mask and "labels" in inputs:
        mask = torch.logical_and(mask, inputs["labels"] != settings.label_mask_value)
    positions: torch.Tensor = mask.nonzero()
    return positions


def language_modeling_inputs(layer_input: Any, positions: Any, layer: str) -> torch.Tensor:
    """The layer's inputs at ``positions`` (:func:`language_modeling_positions`), (n, in)."""
    x = _first_tensor(layer_input, layer)
    return x[positions.T.unbind()]


def _plain_layer_inputs(layer_input: Any, model_input: Any, layer: str) -> torch.Tensor:
    """Without a layer-input function: the first input, flattened to (n, in)."""
    x = _first_tensor(layer_input, layer)
    return x.view(-1, x.size(-1)) if x.ndim > 2 else x


def _first_tensor(layer_input: Any, layer: str) -> torch.Tensor:
    if isinstance(layer_input, torch.Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)):
        return layer_input[0]  # type: ignore[no-any-return]
    raise TypeError(
        f"unsupported input type {type(layer_input)} for prepare_layer_inputs_fn in layer "
        f"{layer}, please provide a custom prepare_layer_inputs_fn"
    )


@dataclass
class Probe:
    """The forward hook on one layer: its input digest (first batch), then its SVD."""

    layer: str
    prepare: LayerInputsFn
    gather: bool
    model_input: Any = None
    digest: Any = None  # of the first batch's input (mode "digest")
    mode: str = "digest"  # then "svd", or "off" for a layer that shares another's input
    svd: IncrementalSVD | None = None
    tau: float = 0.99
    active: bool = False  # in mode "svd": PEFT's hook is registered
    converged: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))

    def start_svd(self, n_components: int, tau: float) -> None:
        self.svd = IncrementalSVD(n_components)
        self.tau = tau
        self.converged = torch.zeros((n_components,), dtype=torch.bool)
        self.mode, self.active = "svd", True

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.mode == "digest":  # the first batch: which layers share their input
            x = _gathered(self.prepare(args, self.model_input, self.layer), self.gather).cpu()
            data = x.contiguous().view(torch.uint8).numpy().tobytes() if x.numel() else b""
            self.digest = (tuple(x.shape), x.dtype, hashlib.blake2b(data).hexdigest())
            return
        if self.mode == "off" or not self.active or self.svd is None:
            return
        svd = self.svd
        previous = None if svd.components is None else svd.components.clone()
        states = _gathered(self.prepare(args, self.model_input, self.layer), self.gather)
        if states.size(0) < svd.n_components:
            logger.info(
                "skipping SVD for %s because there are less than %d examples",
                self.layer, svd.n_components,
            )  # fmt: skip
            return
        try:
            svd.partial_fit(states.to(torch.float32))
        except ValueError as exc:
            raise ValueError(f"{self.layer}: EVA cannot decompose its inputs: {exc}") from None
        if previous is not None:
            assert svd.components is not None
            sim = torch.nn.functional.cosine_similarity(svd.components, previous)
            self.converged = sim >= self.tau


def collect(
    model: nn.Module,
    dataloader: Iterable[Any],
    layers: dict[str, nn.Module],
    spec: LoraAdapter,
    forward_fn: ForwardFn,
    prepare_model_inputs_fn: ModelInputsFn | None,
    prepare_layer_inputs_fn: LayerInputsFn | Mapping[str, LayerInputsFn] | None,
    gather: bool,
    show_progress_bar: bool,
) -> dict[str, torch.Tensor]:
    eva = spec.eva or EvaSettings()
    if isinstance(dataloader, Sized) and len(dataloader) == 0:
        raise ValueError("dataloader is empty")
    if dist.is_initialized() and gather:
        warnings.warn(
            "torch.distributed is initialized and `gather_distributed_inputs` is True, "
            "therefore EVA initialization will gather tensors from all ranks. "
            "Ensure the model does not receive the same inputs on different ranks.",
            stacklevel=3,
        )
    rho = eva.rho
    if rho > _RHO_LIMIT:
        largest = max(max(p.shape, default=0) for p in model.parameters())
        rho = min(rho, largest // spec.r)
    probes, budget, max_components = _probes(layers, spec, rho, prepare_layer_inputs_fn, gather)
    training = model.training
    device = _device(model)
    handles = [layers[p].register_forward_hook(probe) for p, probe in probes.items()]
    model.eval()
    try:
        try:
            batch = next(iter(dataloader))
        except StopIteration:
            raise ValueError("dataloader is empty") from None
        _feed(probes, batch, device, prepare_model_inputs_fn, eva)
        forward_fn(model, _moved(batch, device))
        shared = first_of_equal([(p, probe.digest) for p, probe in probes.items()])
        for source in set(shared.values()):
            group = [source, *(p for p, s in shared.items() if s == source)]
            largest = max(max_components[p] for p in group)
            for p in group:
                max_components[p] = largest
        for path, probe in probes.items():
            if path in shared:
                probe.mode = "off"
            else:
                probe.start_svd(max_components[path], eva.tau)
        svds = {p: probe for p, probe in probes.items() if p not in shared}
        sources = {**{p: p for p in svds}, **shared}
        ranks = _loop(
            model, dataloader, svds, sources, shared, budget, max_components, device,
            forward_fn, prepare_model_inputs_fn, eva, show_progress_bar,
        )  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    out = {}
    for path, rank in ranks.items():
        svd = svds[sources[path]]
        assert svd.svd is not None and svd.svd.components is not None
        if not torch.all(svd.converged[:rank]):
            raise ValueError(f"Layer {path} has not converged but was assigned rank {rank}.")
        u = svd.svd.components[:rank].clone()
        if eva.whiten:
            u = u / svd.svd.singular_values[:rank].sqrt().reshape(-1, 1)
        out[path] = u if device is None else u.to(device)
    return out


def _probes(
    layers: dict[str, nn.Module],
    spec: LoraAdapter,
    rho: float,
    prepare: LayerInputsFn | Mapping[str, LayerInputsFn] | None,
    gather: bool,
) -> tuple[dict[str, Probe], int, dict[str, int]]:
    """A probe per layer, the rank budget, and each layer's most components."""
    by_layer = dict(prepare) if isinstance(prepare, Mapping) else None
    probes, max_components, budget = {}, {}, 0
    for path in layers:
        fn = by_layer.pop(path, None) if by_layer is not None else prepare
        probes[path] = Probe(path, fn or _plain_layer_inputs, gather)  # type: ignore[arg-type]
        r = int(pattern_value(dict(spec.rank_pattern), path, spec.r))
        max_components[path] = round(r * rho)
        budget += r
    if by_layer:
        raise ValueError(
            "prepare_layer_inputs_fn is a mapping but the following module names were not "
            f"found in the model: {by_layer.keys()}"
        )
    return probes, budget, max_components


def _loop(
    model: nn.Module,
    dataloader: Iterable[Any],
    svds: dict[str, Probe],
    sources: dict[str, str],
    shared: dict[str, str],
    budget: int,
    max_components: dict[str, int],
    device: torch.device | None,
    forward_fn: ForwardFn,
    prepare_model_inputs_fn: ModelInputsFn | None,
    eva: EvaSettings,
    show_progress_bar: bool,
) -> dict[str, int]:
    """PEFT's SVD loop (step 2 and 3 of the module docstring); each layer's rank."""
    done = dict.fromkeys(svds, False)
    ranks = dict(max_components)
    batches: Iterator[tuple[Any, bool]] = _cycle(dataloader)
    bar = None
    if show_progress_bar and (not dist.is_initialized() or dist.get_rank() == 0):
        from tqdm import tqdm  # lazily: only for a progress bar

        bar = tqdm(position=0, leave=False)
    for batch, last_of_first_pass in batches:
        model_input = _model_input(batch, device, prepare_model_inputs_fn, eva)
        for path, probe in svds.items():
            converged = bool(torch.all(probe.converged[: ranks[path]]))
            if not done[path] and converged and probe.active:
                probe.active, done[path] = False, True
                continue
            if done[path] and not converged:
                probe.active, done[path] = True, False
            probe.model_input = model_input
        if bar is not None:
            finished = [*done.values(), *(done[s] for s in shared.values())]
            bar.set_description(f"{sum(finished)}/{len(finished)} layers have converged")
            bar.update()
        if all(done.values()):
            break
        forward_fn(model, _moved(batch, device))
        fitted = all(p.svd is not None and p.svd.fitted for p in svds.values())
        if not fitted and last_of_first_pass:
            _refuse_unusable(svds)
        if not fitted:
            continue
        ratios = {p: _ratio(probe) for p, probe in svds.items()}
        ranks = rank_distribution(ratios, sources, shared, budget, max_components)
    if bar is not None:
        bar.close()
    return ranks


def _ratio(probe: Probe) -> torch.Tensor:
    assert probe.svd is not None
    return probe.svd.explained_variance_ratio


def _refuse_unusable(svds: dict[str, Probe]) -> None:
    for path, probe in svds.items():
        assert probe.svd is not None
        if not probe.svd.fitted:
            n = probe.svd.n_components
            raise ValueError(
                f"EVA found no usable batch for {path}: every batch of the dataloader gives "
                f"it fewer than {n} token positions (round(r * rho) = {n}); use batches with "
                "more (unmasked) tokens, or a smaller r or rho (PEFT would loop forever here)"
            )


def _cycle(dataloader: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """``itertools.cycle(dataloader)`` (one pass, then its batches again and again), each
    batch with whether it ends the first pass."""
    saved = []
    iterator = iter(dataloader)
    try:
        batch = next(iterator)
    except StopIteration:
        raise ValueError(
            "the dataloader gave no batches after its first one (a one-pass iterator is used "
            "up by then): pass a list of batches or a DataLoader"
        ) from None
    for following in iterator:
        saved.append(batch)
        yield batch, False
        batch = following
    saved.append(batch)
    yield batch, True
    while True:
        yield from ((b, False) for b in saved)


def _feed(
    probes: dict[str, Probe],
    batch: Any,
    device: torch.device | None,
    prepare: ModelInputsFn | None,
    eva: EvaSettings,
) -> None:
    model_input = _model_input(batch, device, prepare, eva)
    for probe in probes.values():
        probe.model_input = model_input


def _model_input(
    batch: Any, device: torch.device | None, prepare: ModelInputsFn | None, eva: EvaSettings
) -> Any:
    batch = _moved(batch, device)
    return prepare(batch, eva) if prepare is not None else deepcopy(batch)


def _moved(inputs: Any, device: torch.device | None) -> Any:
    """The batch on ``device`` (PEFT's ``move_inputs_to_device``)."""
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _moved(v, device) for k, v in inputs.items()})  # type: ignore[call-arg]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_moved(v, device) for v in inputs)
    warnings.warn(
        f"input of type {type(inputs)} could not be moved to the correct device", stacklevel=4
    )
    return inputs


def _device(model: nn.Module) -> torch.device | None:
    devices = list({p.device for p in model.parameters() if p.device.type != "meta"})
    if len(devices) > 1:
        warnings.warn(
            f"Could not determine device, model has multiple devices: {devices}", stacklevel=4
        )
        return None
    return devices[0] if devices else None


def _gathered(x: torch.Tensor, gather: bool) -> torch.Tensor:
    """The layer inputs of every rank, concatenated (a no-op without torch.distributed)."""
    if not (gather and dist.is_initialized()):
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = torch.empty(world, dtype=size.dtype, device=x.device)
    dist.all_gather_into_tensor(sizes, size)
    counts = sizes.tolist()
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)], dim=0)
