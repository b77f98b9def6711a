"""Input-channel permutations that raise the magnitude a 2:4 mask keeps (as APEX ASP offers).

2:4 keeps the 2 largest |w| of every group of 4 *consecutive* input channels. Reordering the
input channels of a Linear (its weight columns) changes which weights share a group, so a good
order keeps more magnitude. The network computes the same function when the layer that feeds
those channels reorders its output channels (weight rows, bias) the same way, and every
per-channel operation in between is elementwise or permutation-equivariant.

Supported pairs in timm ViTs (everything else is skipped with a reason):

* ``Mlp``: ``fc2``'s input channels <- ``fc1``'s output channels (rows and bias), through an
  activation without parameters and an optional LayerNorm (its affine parameters follow).
* ``Attention``: ``proj``'s input channels <- the V rows of ``qkv``, permuted *within each head*
  (attention mixes tokens, not channels, so a per-head reordering of V's channels reorders the
  attention output's channels the same way; q and k are untouched). Since ``head_dim % 4 == 0``,
  no group of 4 straddles two heads, so the per-head search loses nothing. An optional output
  LayerNorm (``scale_norm``) and gate Linear follow.
* ``qkv`` and ``fc1`` read the residual stream: their input channels cannot be permuted locally.

The search (:func:`search_permutation`) swaps channels between groups while that raises the
kept magnitude, within a time budget, and never returns a permutation that lowers it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lotus_deploy.prune.two_four import GROUP, two_four_kept

Param = tuple[str, int, int]
"""(parameter name, dim, offset): a parameter slice indexed by the permuted channels."""

_OTHERS = torch.tensor([[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]])


@dataclass(frozen=True)
class ChannelGroup:
    """The input channels of one Linear and every parameter slice that must follow them.

    Attributes:
        consumer: weight name of the Linear whose input channels are permuted (``...fc2.weight``).
        producer: module name of the layer producing those channels (``...fc1``).
        channels: number of permuted channels (the consumer's ``in_features``).
        block: permutations stay inside consecutive blocks of this many channels (head_dim for
            attention, ``channels`` for an MLP).
        params: every slice to permute: the consumer weight along dim 1, producer rows, bias, ...
    """

    consumer: str
    producer: str
    channels: int
    block: int
    params: tuple[Param, ...]


@dataclass
class SearchResult:
    """Outcome of :func:`search_permutation` for one weight.

    Attributes:
        perm: new channel order ``(K,)``: new column c is old column ``perm[c]``.
        kept_before: fraction of |w| that 2:4 keeps in the original order.
        kept_after: the same after permuting (>= kept_before).
        rounds: search rounds run.
        seconds: wall time of the search (s).
        converged: no single swap improves further (False when the budget ran out first).
    """

    perm: torch.Tensor
    kept_before: float
    kept_after: float
    rounds: int
    seconds: float
    converged: bool

    def report(self) -> dict:
        return {
            "kept_before": self.kept_before, "kept_after": self.kept_after, "rounds": self.rounds,
            "seconds": round(self.seconds, 3), "converged": self.converged,
            "moved_channels": int((self.perm != torch.arange(len(self.perm))).sum()),
        }


# ----------------------------------------------------------------------------- finding pairs


def _channelwise(mod, name: str, n: int) -> tuple[list[Param], str | None]:
    """Parameters of a per-channel module between producer and consumer, or why it cannot follow."""
    import torch.nn as nn

    if mod is None or isinstance(mod, (nn.Identity, nn.Dropout)):
        return [], None
    if isinstance(mod, nn.LayerNorm) and tuple(mod.normalized_shape) == (n,):
        return [(f"{name}.{p}", 0, 0) for p, _ in mod.named_parameters(recurse=False)], None
    return [], f"{name} is a {type(mod).__name__}, not Identity or a LayerNorm over the {n} channels"


def _mlp_group(prefix: str, m) -> tuple[ChannelGroup | None, str]:
    import torch.nn as nn

    fc1, fc2 = m.fc1, m.fc2
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        return None, "Mlp with convolutions (use_conv) is not supported"
    if fc1.out_features != fc2.in_features:
        return None, f"fc1 outputs {fc1.out_features} channels but fc2 reads {fc2.in_features}"
    if any(True for _ in m.act.parameters()):
        return None, f"activation {type(m.act).__name__} has parameters (may not be elementwise)"
    k = fc2.in_features
    norm, why = _channelwise(getattr(m, "norm", None), f"{prefix}norm", k)
    if why:
        return None, why
    params = [(f"{prefix}fc2.weight", 1, 0), (f"{prefix}fc1.weight", 0, 0)]
    if fc1.bias is not None:
        params.append((f"{prefix}fc1.bias", 0, 0))
    return ChannelGroup(f"{prefix}fc2.weight", f"{prefix}fc1", k, k, tuple(params + norm)), ""


def _attn_group(prefix: str, m) -> tuple[ChannelGroup | None, str]:
    import torch.nn as nn

    qkv, proj = m.qkv, m.proj
    heads, hd = int(m.num_heads), int(m.head_dim)
    dim = heads * hd
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)):
        return None, "qkv/proj are not nn.Linear"
    if qkv.out_features != 3 * dim or proj.in_features != dim:
        return None, f"unexpected shapes: qkv outputs {qkv.out_features}, proj reads {proj.in_features}, heads*head_dim {dim}"
    if hd % GROUP:
        return None, f"head_dim {hd} is not a multiple of {GROUP}: 2:4 groups would straddle heads"
    norm, why = _channelwise(getattr(m, "norm", None), f"{prefix}norm", dim)
    if why:
        return None, why
    params = [(f"{prefix}proj.weight", 1, 0), (f"{prefix}qkv.weight", 0, 2 * dim)]
    if qkv.bias is not None:
        params.append((f"{prefix}qkv.bias", 0, 2 * dim))
    gate = getattr(m, "gate", None)
    if gate is not None:
        if not (isinstance(gate, nn.Linear) and gate.out_features == dim):
            return None, f"gate {type(gate).__name__} is not a Linear with {dim} outputs"
        params += [(f"{prefix}gate.{p}", 0, 0) for p, _ in gate.named_parameters(recurse=False)]
    return ChannelGroup(f"{prefix}proj.weight", f"{prefix}qkv[V rows]", dim, hd, tuple(params + norm)), ""


def find_channel_groups(model: torch.nn.Module) -> tuple[dict[str, ChannelGroup], dict[str, str]]:
    """The permutable Linears of a timm model.

    Returns:
        (consumer weight name -> :class:`ChannelGroup`, every other Linear weight name -> why its
        input channels cannot be permuted).
    """
    import torch.nn as nn
    from timm.layers import Attention, Mlp

    # module class (exact: GluMlp/SwiGLU split fc1 differently) -> (group builder, consumer, residual reader)
    kinds = {Mlp: (_mlp_group, "fc2", "fc1"), Attention: (_attn_group, "proj", "qkv")}
    groups: dict[str, ChannelGroup] = {}
    why: dict[str, str] = {}
    for name, m in model.named_modules():
        if type(m) not in kinds:
            continue
        prefix = f"{name}." if name else ""
        build, consumer, reader = kinds[type(m)]
        g, reason = build(prefix, m)
        if g:
            groups[g.consumer] = g
        else:
            why[f"{prefix}{consumer}.weight"] = f"unsupported {type(m).__name__}: {reason}"
        why[f"{prefix}{reader}.weight"] = "reads the residual stream (after a LayerNorm): its input channels cannot be permuted locally"
    for name, m in model.named_modules():
        w = f"{name}.weight" if name else "weight"
        if isinstance(m, nn.Linear) and w not in groups and w not in why:
            why[w] = "no supported producer of its input channels (supported: timm Mlp fc1 -> fc2, Attention V -> proj)"
    return groups, why


# ----------------------------------------------------------------------------- applying


@torch.no_grad()
def permute_(model: torch.nn.Module, group: ChannelGroup, perm: torch.Tensor) -> torch.nn.Module:
    """Reorder every slice of ``group`` in place: new channel c is old channel ``perm[c]``."""
    params = dict(model.named_parameters())
    for name, dim, off in group.params:
        p = params[name]
        sl = p.narrow(dim, off, group.channels)
        sl.copy_(sl.index_select(dim, perm.to(p.device)))
    return model


def permute_masks(masks: dict[str, torch.Tensor], group: ChannelGroup, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pure: ``masks`` with every mask of a parameter in ``group`` reordered like the weights."""
    out = dict(masks)
    for name, dim, off in group.params:
        if name in out:
            m = out[name].clone()
            sl = m.narrow(dim, off, group.channels)
            sl.copy_(sl.index_select(dim, perm.to(m.device)))
            out[name] = m
    return out


# ----------------------------------------------------------------------------- search


def _kept_ratio(a: torch.Tensor) -> float:
    total = float(a.double().sum())
    return 1.0 if total == 0 else float(two_four_kept(a.double()).sum()) / total


def _swap_gains(xt, r1s, r2t, old, g1, g2) -> torch.Tensor:
    """Kept-magnitude gain of swapping column i of group g1 with column j of group g2: ``(P, 4, 4)``.

    With r1 >= r2 >= r3 the other three values of a row of a group, the top-2 sum after putting
    v in the freed slot is ``r1 + max(r2, v)``. ``xt`` ``(G, 4, O)`` is the weight with the
    output rows last; ``r2t`` ``(G, 4, O)`` the second largest of the *other* three columns of
    each group and row; ``r1s`` ``(G, 4)`` the row sums of the largest; ``old`` ``(G,)`` what each
    group keeps now.
    """
    v1, v2 = xt[g1], xt[g2]  # (P, 4, O)
    new1 = r1s[g1][:, :, None] + torch.maximum(r2t[g1][:, :, None, :], v2[:, None, :, :]).sum(-1)  # (P, 4i, 4j)
    new2 = r1s[g2][:, None, :] + torch.maximum(r2t[g2][:, None, :, :], v1[:, :, None, :]).sum(-1)  # (P, 4i, 4j)
    return new1 + new2 - (old[g1] + old[g2])[:, None, None]


def search_permutation(
    magnitude: torch.Tensor, block: int | None = None, seconds: float = 1.0, seed: int = 0, max_elems: int = 1 << 23
) -> SearchResult:
    """Greedy channel-swap search for the column order that 2:4 keeps the most magnitude of.

    Each round scores every swap of one column between two groups of 4 (all group pairs when a
    full pass is affordable, else a random sample of pairs), then applies the best swaps in
    order of gain among pairs of groups not yet touched that round (their gains are
    independent). Only strictly improving swaps are applied, so the kept magnitude never drops.

    Args:
        magnitude: ``(out, in)`` non-negative scores, usually ``|W|`` times the mask in force.
        block: channels move only inside consecutive blocks of this size (default: all ``in``).
        seconds: time budget (s); the search also stops at a local optimum (full pass without an
            improving swap) or after 20 sampled rounds without one.
        seed: seed of the pair sampling (used only when a full pass is too large).
        max_elems: float elements scored per chunk (bounds memory: ~16 bytes each).

    Returns:
        A :class:`SearchResult`; ``perm`` is the identity when nothing improved.
    """
    t0 = time.perf_counter()
    a = magnitude.detach().float().cpu()
    out_f, k = a.shape
    block = k if block is None else int(block)
    if k % GROUP or block % GROUP or k % block:
        raise ValueError(f"in={k} and block={block} must be multiples of {GROUP}, and in a multiple of block")
    n_groups, gpb, n_blocks = k // GROUP, block // GROUP, k // block
    perm = torch.arange(k)
    before = _kept_ratio(a)
    if gpb < 2 or float(a.sum()) == 0.0:
        return SearchResult(perm, before, before, 0, time.perf_counter() - t0, True)

    iu = torch.triu_indices(gpb, gpb, 1)
    offsets = (torch.arange(n_blocks) * gpb)[:, None]
    all_g1, all_g2 = (offsets + iu[0]).flatten(), (offsets + iu[1]).flatten()
    per_pair = out_f * GROUP * GROUP
    chunk = max(1, max_elems // per_pair)
    exhaustive = len(all_g1) <= 32 * chunk
    gen = torch.Generator().manual_seed(seed)
    tol = 1e-6 * float(a.sum()) / n_groups
    deadline = t0 + seconds
    x = a.clone()  # current order: x = a[:, perm]
    rounds = stall = 0
    converged = False
    while time.perf_counter() < deadline:
        xt = x.view(out_f, n_groups, GROUP).permute(1, 2, 0).contiguous()  # (G, 4, O)
        r = xt[:, _OTHERS].topk(2, dim=2).values  # (G, 4, 2, O): top-2 of the other three columns
        r1s, r2t = r[:, :, 0].sum(-1), r[:, :, 1].contiguous()  # (G, 4), (G, 4, O)
        old = xt.topk(2, dim=1).values.sum((1, 2))  # (G,)
        if exhaustive:
            g1, g2 = all_g1, all_g2
        else:
            m = 8 * chunk
            blk = torch.randint(n_blocks, (m,), generator=gen) * gpb
            i = torch.randint(gpb, (m,), generator=gen)
            j = (i + torch.randint(1, gpb, (m,), generator=gen)) % gpb
            g1, g2 = blk + i, blk + j
        best, which, complete = [], [], True
        for s in range(0, len(g1), chunk):
            gains = _swap_gains(xt, r1s, r2t, old, g1[s : s + chunk], g2[s : s + chunk]).flatten(1)  # (P, 16)
            bg, bi = gains.max(1)
            best.append(bg)
            which.append(bi)
            if time.perf_counter() > deadline and s + chunk < len(g1):
                complete = False
                break
        best_t = torch.cat(best)
        n_good = int((best_t > tol).sum())
        order = torch.argsort(best_t, descending=True, stable=True)[:n_good].tolist()
        which_l, g1_l, g2_l = torch.cat(which).tolist(), g1.tolist(), g2.tolist()
        used: set[int] = set()
        applied = 0
        for p in order:
            ga, gb = g1_l[p], g2_l[p]
            if ga in used or gb in used:
                continue
            i, j = divmod(which_l[p], GROUP)
            ca, cb = ga * GROUP + i, gb * GROUP + j
            x[:, [ca, cb]] = x[:, [cb, ca]]
            perm[[ca, cb]] = perm[[cb, ca]]
            used.update((ga, gb))
            applied += 1
        rounds += 1
        if applied:
            stall = 0
        elif exhaustive and complete:
            converged = True
            break
        else:
            stall += 1
            if stall >= 20:
                break
    after = _kept_ratio(a[:, perm])
    if after < before:  # float noise only; keep the guarantee exact
        perm, after = torch.arange(k), before
    return SearchResult(perm, before, after, rounds, time.perf_counter() - t0, converged)


# ----------------------------------------------------------------------------- the whole model


@dataclass
class PermuteOutcome:
    """What :func:`permute_for_two_four_` did.

    Attributes:
        masks: the masks, reordered where their weights moved.
        layers: consumer weight name -> :meth:`SearchResult.report` (kept ratios, rounds, ...).
        perms: consumer weight name -> channel order applied (list of ints).
        skipped: weight name -> why it was not permuted.
    """

    masks: dict[str, torch.Tensor]
    layers: dict[str, dict] = field(default_factory=dict)
    perms: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def permute_for_two_four_(
    model: torch.nn.Module, names, masks: dict[str, torch.Tensor] | None = None, seconds: float = 1.0, seed: int = 0
) -> PermuteOutcome:
    """Search and apply (in place) a channel order for each Linear weight in ``names``.

    The score is ``|W|`` times the weight's mask in ``masks`` (2:4 will choose among the
    surviving weights). The model's function is unchanged (with or without the masks applied).

    Args:
        names: Linear weight names to optimize (others in the model are untouched).
        masks: masks in force; returned reordered in the outcome, never modified in place.
        seconds: time budget per layer (s).
    """
    groups, why = find_channel_groups(model)
    params = dict(model.named_parameters())
    out = PermuteOutcome(masks=dict(masks or {}))
    for name in names:
        if name not in groups:
            out.skipped[name] = why.get(name, "not an nn.Linear weight")
            continue
        g = groups[name]
        mag = params[name].detach().abs().float()
        if name in out.masks:
            mag = mag * out.masks[name].to(mag.device)
        res = search_permutation(mag, g.block, seconds, seed)
        out.layers[name] = {"producer": g.producer, "block": g.block, **res.report()}
        if res.kept_after > res.kept_before:
            permute_(model, g, res.perm)
            out.masks = permute_masks(out.masks, g, res.perm)
            out.perms[name] = res.perm.tolist()
    return out


__all__ = [
    "ChannelGroup", "SearchResult", "PermuteOutcome", "find_channel_groups", "permute_", "permute_masks",
    "search_permutation", "permute_for_two_four_",
]
