"""Calibration statistics of Linear inputs, captured with forward hooks (for wanda and sparsegpt).

A Linear ``y = x @ W.T`` with weight ``(out, K)`` sees inputs ``X`` of shape ``(N·T, K)`` over a
calibration set (N images, T tokens each: the full sequence, or the kept tokens when the caller's
``forward`` drops tokens). Two statistics are accumulated on the fly, batch after batch, so the
activations themselves are never stored:

* ``sq``: ``(K,)`` sums of squares per input channel, ``||X_j||² = Σ_t x_tj²`` (wanda's norms);
* ``gram``: ``(K, K)`` ``XᵀX`` (sparsegpt's Hessian is ``H = 2 XᵀX / (N·T)`` up to damping;
  ``diag(gram) == sq``).

One pass over the calibration images captures every layer at once, from the model as it is
(earlier masks applied): each layer's statistics describe its inputs in the unpruned-by-this-step
model, not after the layers before it are pruned (SparseGPT's and Wanda's LLM code go layer by
layer; one pass costs one forward instead of one per block). torch is imported inside functions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal

Statistic = Literal["norms", "gram"]


@dataclass
class Calibration:
    """Per-weight input statistics of a calibration pass.

    Attributes:
        sq: weight name -> ``(K,)`` float32 sums of squared inputs per input channel.
        gram: weight name -> ``(K, K)`` float32 ``XᵀX`` (empty unless captured with ``gram``).
        tokens: weight name -> rows of ``X`` seen (N·T).
        images: calibration images run.
        seconds: wall time of the pass.
    """

    sq: dict = field(default_factory=dict)
    gram: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0

    def norms(self, name: str):
        """``(K,)`` L2 norms of the input channels of weight ``name`` over the calibration tokens."""
        return self.sq[name].sqrt()


def linear_of(modules: dict, name: str):
    """The ``nn.Linear`` whose ``weight`` is ``name``; ValueError for anything else."""
    import torch.nn as nn

    mod_name, _, leaf = name.rpartition(".")
    mod = modules.get(mod_name)
    if leaf != "weight" or not isinstance(mod, nn.Linear):
        kind = "not a layer weight" if leaf != "weight" or mod is None else f"a {type(mod).__name__} weight"
        raise ValueError(f"{name} is {kind}: calibrated criteria (wanda, sparsegpt) need nn.Linear weights; narrow the scope")
    return mod


def calibrate(
    model,
    names: Iterable[str],
    batches: Iterable,
    statistic: Statistic = "norms",
    forward: Callable | None = None,
    device=None,
) -> Calibration:
    """Run ``batches`` through ``model`` (eval mode, no grad) and accumulate input statistics.

    Args:
        names: weight names (``blocks.0.mlp.fc1.weight``) of nn.Linear layers.
        batches: image tensors ``(B, C, H, W)``, or tuples whose items are the forward's arguments.
        statistic: ``norms`` (``sq`` only) or ``gram`` (``sq`` and ``XᵀX``).
        forward: replaces ``model(*batch)`` (e.g. a token-dropping forward); default the model.
        device: where batches go; default the model's device.

    Returns:
        The :class:`Calibration`; the model is left as it was (weights, mode, no hooks).

    Raises:
        ValueError: a name is not an nn.Linear weight.
    """
    import torch

    modules = dict(model.named_modules())
    layers = {n: linear_of(modules, n) for n in names}
    device = device or next(model.parameters()).device
    cal = Calibration()

    def hook_for(name: str, k: int):
        def hook(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, k).float()  # (N·T, K)
            cal.sq[name] += (x * x).sum(0)
            if statistic == "gram":
                cal.gram[name].addmm_(x.T, x)  # (K, K)
            cal.tokens[name] += x.shape[0]

        return hook

    handles = []
    for n, mod in layers.items():
        k = mod.in_features
        cal.sq[n] = torch.zeros(k, device=mod.weight.device)
        if statistic == "gram":
            cal.gram[n] = torch.zeros(k, k, device=mod.weight.device)
        cal.tokens[n] = 0
        handles.append(mod.register_forward_hook(hook_for(n, k)))
    was_training = model.training
    model.eval()
    fwd = forward or model
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for b in batches:
                b = b if isinstance(b, (tuple, list)) else (b,)
                fwd(*(t.to(device) for t in b))
                cal.images += len(b[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    cal.seconds = time.perf_counter() - t0
    return cal


def all_reduce_(cal: Calibration) -> Calibration:
    """Sum a calibration's statistics over the ranks of a distributed run, in place (identity in one process).

    Each rank calibrates its share of the images (:func:`lotus_deploy.distributed.shard`); the
    sums ``sq``, ``gram``, ``tokens`` and ``images`` then describe every image, on every rank.
    ``seconds`` stays this rank's.
    """
    from lotus_deploy import distributed as dist

    if not dist.active():
        return cal
    for name in sorted(cal.sq):
        dist.all_reduce_sum_(cal.sq[name], what=f"calibration of {name}")
        if name in cal.gram:
            dist.all_reduce_sum_(cal.gram[name], what=f"calibration of {name}")
    names = sorted(cal.tokens)
    counts = dist.all_reduce_sum([cal.tokens[n] for n in names] + [cal.images], what="calibration counts")
    cal.tokens = {n: round(c) for n, c in zip(names, counts[:-1])}
    cal.images = round(counts[-1])
    return cal


def reconstruction_error(weight, new_weight, gram) -> float:
    """``||W X − Ŵ X||²`` summed over the calibration tokens: ``tr((W−Ŵ) XᵀX (W−Ŵ)ᵀ)``.

    Args:
        weight, new_weight: ``(out, K)`` the layer before and after pruning.
        gram: ``(K, K)`` ``XᵀX`` of its calibration inputs.
    """
    d = (weight.detach().double() - new_weight.detach().double())  # (out, K)
    return float(((d @ gram.double()) * d).sum())
