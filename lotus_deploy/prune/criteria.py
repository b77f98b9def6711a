"""Pruning criteria: which weights a mask removes, chosen per stage with ``criterion:``.

A :class:`Criterion` is registered in :data:`CRITERIA` under its recipe name:

* ``magnitude``: ``|W|`` (no calibration);
* ``wanda`` (Sun et al., 2023): ``|W_ij| · ||X_j||₂``, the weight times the L2 norm of its input
  channel over the calibration tokens (:mod:`lotus_deploy.prune.calibration`, statistic ``norms``);
* ``sparsegpt`` (Frantar and Alistarh, 2023): layer-wise OBS with weight reconstruction
  (:mod:`lotus_deploy.prune.sparsegpt`, statistic ``gram``). The only criterion that changes the
  weights it keeps: :class:`Pruned` carries the reconstructed weights.

Granularity is the comparison group in which a sparsity (fraction of the weights in scope set to
zero) is met exactly:

* ``global``: one ranking of the scores over the whole scope (``round(s · N)`` zeros in all;
  layers differ). For wanda the scores of different layers are compared as they are, as global
  magnitude compares weights;
* ``per_layer``: ``round(s · n)`` zeros in each weight tensor;
* ``per_row``: every output row (dim 0) of a tensor at the same fraction, up to one weight of
  rounding (the tensor's total is exact): Wanda's per-output comparison group, the paper's
  choice for LLMs, which its image-classifier code offers next to per-layer.

``sparsegpt`` picks its masks per column block of a layer (all rows together), so it takes
``per_layer`` or ``global``; ``global`` puts every layer at the same fraction (counts shared by
:func:`lotus_deploy.masks.spread`, the scope's total exact), because OBS errors of different
layers are in different units and do not rank against each other.

Masks in force (``existing``) always stay removed and count toward the target. Everything is
pure: masks (and reconstructed weights) are returned; :func:`apply_pruned_` writes them.
torch is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from lotus_deploy.registry import Registry

GRANULARITIES = ("global", "per_layer", "per_row")
STATISTICS = (None, "norms", "gram")  # in increasing cost; a later one also provides the earlier


class Pruned(NamedTuple):
    """What a criterion decides for a set of weights.

    Attributes:
        masks: weight name -> boolean mask (True = keep).
        weights: weight name -> new weight values (``sparsegpt``'s reconstruction); empty when
            the criterion keeps the weights as they are.
    """

    masks: dict
    weights: dict


@dataclass(frozen=True)
class Criterion:
    """A pruning criterion: how masks are chosen at a sparsity, and in 2:4.

    Attributes:
        name: the recipe value of ``criterion``.
        statistic: calibration statistic it needs (None, ``norms``, ``gram``).
        granularities: the granularities it supports.
    """

    name: str
    statistic: str | None = None
    granularities: tuple[str, ...] = GRANULARITIES

    def check(self, granularity: str, stats=None) -> None:
        """ValueError for an unsupported granularity or missing calibration statistics."""
        if granularity not in self.granularities:
            raise ValueError(f"criterion {self.name} supports granularity {', '.join(self.granularities)}; got {granularity!r}")
        if self.statistic and stats is None:
            raise ValueError(f"criterion {self.name} needs calibration statistics ({self.statistic})")

    def prune(self, weights, sparsity: float, granularity: str = "global", existing=None, stats=None) -> Pruned:
        """Masks removing ``sparsity`` of ``weights`` (name -> tensor; not modified)."""
        return self.masks_at(weights, granularity, existing, stats)(sparsity)

    def masks_at(self, weights, granularity: str = "global", existing=None, stats=None) -> Callable[[float], Pruned]:
        """``s -> Pruned`` equal to :meth:`prune` at ``s``, sharing work between points (a sweep)."""
        raise NotImplementedError

    def two_four(self, weights, existing=None, stats=None) -> Pruned:
        """2:4 masks along K (dim 1) of 2-D Linear weights, subsets of ``existing``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Scored(Criterion):
    """A criterion that scores each weight once and keeps the highest scores (magnitude, wanda)."""

    def scores(self, weights, stats=None) -> dict:
        """Weight name -> score tensor shaped like the weight (ranked by absolute value)."""
        raise NotImplementedError

    def prune(self, weights, sparsity: float, granularity: str = "global", existing=None, stats=None) -> Pruned:
        from lotus_deploy.masks import magnitude_masks

        self.check(granularity, stats)
        if granularity == "per_row":
            return Pruned(row_ranked(self.scores(weights, stats), existing)(sparsity), {})
        return Pruned(magnitude_masks(self.scores(weights, stats), sparsity, granularity, existing), {})

    def masks_at(self, weights, granularity: str = "global", existing=None, stats=None) -> Callable[[float], Pruned]:
        from lotus_deploy.prune.magnitude import ranked_masks

        self.check(granularity, stats)
        sc = self.scores(weights, stats)
        at = row_ranked(sc, existing) if granularity == "per_row" else ranked_masks(sc, granularity, existing)
        return lambda s: Pruned(at(s), {})

    def two_four(self, weights, existing=None, stats=None) -> Pruned:
        from lotus_deploy.prune.two_four import two_four_masks

        self.check("per_layer", stats)
        existing = existing or {}
        return Pruned({k: two_four_masks(v, existing.get(k)) for k, v in self.scores(weights, stats).items()}, {})


@dataclass(frozen=True)
class Magnitude(Scored):
    """``|W|``: the weights themselves (the masks equal :func:`lotus_deploy.masks.magnitude_masks`)."""

    def scores(self, weights, stats=None) -> dict:
        return dict(weights)


@dataclass(frozen=True)
class Wanda(Scored):
    """``|W_ij| · ||X_j||₂`` per input channel ``j`` of each Linear (Sun et al., 2023)."""

    def scores(self, weights, stats=None) -> dict:
        return {k: w.detach().abs().float() * stats.norms(k).to(w.device)[None, :] for k, w in weights.items()}  # (out, K)


@dataclass(frozen=True)
class SparseGPT(Criterion):
    """OBS pruning with reconstruction, layer by layer (:func:`lotus_deploy.prune.sparsegpt.sparsegpt_prune`)."""

    def prune(self, weights, sparsity: float, granularity: str = "global", existing=None, stats=None) -> Pruned:
        from lotus_deploy.masks import expected_zeros, spread
        from lotus_deploy.prune.sparsegpt import sparsegpt_prune

        self.check(granularity, stats)
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        existing = existing or {}
        names = list(weights)
        sizes = [weights[k].numel() for k in names]
        floors = [int((~existing[k].bool()).sum()) if k in existing else 0 for k in names]
        if granularity == "global":
            counts = spread(expected_zeros(sparsity, sum(sizes)), sizes, floors)
        else:
            counts = [max(expected_zeros(sparsity, n), f) for n, f in zip(sizes, floors)]
        masks, new = {}, {}
        for k, c in zip(names, counts):
            masks[k], new[k] = sparsegpt_prune(weights[k], _gram(stats, k), n_zero=c, existing=existing.get(k))
        return Pruned(masks, new)

    def masks_at(self, weights, granularity: str = "global", existing=None, stats=None) -> Callable[[float], Pruned]:
        self.check(granularity, stats)
        return lambda s: self.prune(weights, s, granularity, existing, stats)

    def two_four(self, weights, existing=None, stats=None) -> Pruned:
        from lotus_deploy.prune.sparsegpt import sparsegpt_prune
        from lotus_deploy.prune.two_four import GROUP, N_KEEP

        self.check("per_layer", stats)
        existing = existing or {}
        masks, new = {}, {}
        for k, w in weights.items():
            masks[k], new[k] = sparsegpt_prune(w, _gram(stats, k), nm=(N_KEEP, GROUP), existing=existing.get(k))
        return Pruned(masks, new)


def _gram(stats, name: str):
    if name not in stats.gram:
        raise ValueError(f"sparsegpt: no XᵀX for {name}; calibrate with statistic 'gram'")
    return stats.gram[name]


CRITERIA: Registry[Criterion] = Registry("pruning criterion")
for _c in (Magnitude("magnitude"), Wanda("wanda", "norms"), SparseGPT("sparsegpt", "gram", ("global", "per_layer"))):
    CRITERIA.add(_c.name, _c)
del _c


def statistic_for(criteria) -> str | None:
    """The calibration statistic that serves every criterion named in ``criteria`` (None: none needed)."""
    return max((CRITERIA[c].statistic for c in criteria), key=STATISTICS.index, default=None)


# ----------------------------------------------------------------------------- per-row masks


def row_ranked(scores, existing=None) -> Callable[[float], dict]:
    """``s -> masks`` with each output row (dim 0) of each tensor at the same fraction of zeros.

    Rows are sorted once; each call shares the tensor's ``round(s · n)`` zeros (never fewer than
    ``existing`` removes) over its rows with :func:`lotus_deploy.masks.spread`, so rows differ
    by at most one zero, except rows that ``existing`` already pruned further.
    """
    import torch

    from lotus_deploy.masks import expected_zeros, spread

    ranked = []
    for k, sc in scores.items():
        a = sc.detach().abs().float().reshape(sc.shape[0], -1)  # (out, fan_in)
        floors = [0] * a.shape[0]
        if existing and k in existing:
            kept = existing[k].reshape(a.shape).to(device=a.device, dtype=torch.bool)
            a = a.masked_fill(~kept, -1.0)  # removed weights rank first
            floors = (~kept).sum(1).tolist()
        ranked.append((k, torch.argsort(a, dim=1, stable=True), floors))

    def masks_at(sparsity: float) -> dict:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        out = {}
        for k, order, floors in ranked:
            rows, cols = order.shape
            counts = torch.tensor(spread(expected_zeros(sparsity, rows * cols), [cols] * rows, floors), device=order.device)
            keep_sorted = torch.arange(cols, device=order.device)[None, :] >= counts[:, None]  # (out, fan_in)
            out[k] = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted).view(scores[k].shape)
        return out

    return masks_at


# ----------------------------------------------------------------------------- on a model


def prune_model(model, scope, sparsity: float, granularity: str = "global", existing=None,
                criterion: str = "magnitude", stats=None) -> Pruned:
    """What a one-shot prune of the weights in ``scope`` with ``criterion`` decides (model untouched).

    With ``magnitude`` the masks equal :func:`lotus_deploy.prune.magnitude.prune_masks`.

    Args:
        scope: scope patterns (:mod:`lotus_deploy.scope`).
        sparsity: fraction of the weights in scope to zero, in [0, 1).
        existing: masks in force (outside the scope ignored); they stay removed and count.
        stats: :class:`lotus_deploy.prune.calibration.Calibration` of the scope's Linears (wanda,
            sparsegpt).

    Raises:
        ValueError: the scope selects no prunable weight, or the criterion cannot serve it.
    """
    from lotus_deploy.scope import select_weights

    weights = {k: p.detach() for k, p in select_weights(model, scope).items()}
    if not weights:
        raise ValueError(f"scope {list(scope)} selects no prunable weights")
    existing = {k: v for k, v in (existing or {}).items() if k in weights}
    return CRITERIA[criterion].prune(weights, sparsity, granularity, existing, stats)


def apply_pruned_(model, pruned: Pruned, masks) -> None:
    """Write ``pruned``'s reconstructed weights into ``model``, then zero every weight ``masks`` removes (in place)."""
    import torch

    from lotus_deploy.masks import apply_masks_

    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, w in pruned.weights.items():
            params[k].copy_(w)
    apply_masks_(model, masks)
