"""Data lottery tickets: per-patch attention scores, ticket selection and token dropping.

LOTUS (arXiv 2405.00906) and the Data-Level Lottery Ticket Hypothesis for ViTs (Shen et al.,
IJCAI 2023) keep, for each image, the patches the pretrained model attends to most. Here:

* **Scores**: a teacher's CLS-to-patch attention averaged over heads (and over the chosen
  blocks). timm's fused attention stays on: a forward hook on ``blocks[i].attn.qkv`` captures
  ``qkv`` and only the CLS row of ``softmax(q k^T * scale)`` is recomputed, for the chosen blocks.
* **Sink**: ``normalize`` (LOTUS) replaces the prefix (CLS, register) columns of each head's
  CLS row by the mean patch weight and renormalizes; ``exclude`` (Data-LTH) slices them off.
  Within one head both give the same patch order (the renormalization is a per-row constant), so
  they differ only through the averaging over heads/blocks: ``normalize`` divides each head by
  the attention it puts on patches, so heads whose CLS row goes mostly to the sink weigh as much
  as the others; ``exclude`` lets them fade. (Normalizing *after* the head average would change
  no selection at all.) :func:`ticket_overlap` measures how far the two selections differ.
* **Tickets**: ``K = ceil(keep * patches)`` patch indices per image (static shapes), sorted
  ascending; prefix tokens are always kept. K is resolved once (:func:`num_kept`) and passed
  as an integer. ``attention``, ``random`` (seeded per image and epoch) and ``full`` are
  :class:`Selection` strategies in :data:`SELECTIONS` and run through the same code path.
* **Token dropping**: :func:`forward_tokens` gathers the kept patch tokens after the positional
  embedding, so every block runs on ``prefix + K`` tokens (no masking).
* **Hierarchical dropping** (Data-LTH / EViT): a :class:`DropPlan` cuts the tokens entering
  some blocks (``at``) to ``K_i`` patches, chosen by the CLS attention of the block just before
  (:func:`forward_features_dropping`: online inside the model's own forward, or on given nested
  tickets, e.g. a frozen teacher's from :func:`hierarchical_tickets`). Tokens are gathered after
  the positional embedding, so each carries its own position.

Tensor shapes: ``B`` images, ``N = prefix + P`` tokens, ``P`` patches, ``H`` heads, ``D`` head
width, ``L`` chosen blocks, ``K`` kept patches.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from lotus_deploy.progress import bar
from lotus_deploy.registry import Registry

SINKS = ("normalize", "exclude")

# ----------------------------------------------------------------------------- model checks


def check_token_model(model: nn.Module) -> None:
    """Raise ``TypeError`` unless ``model`` is a timm ViT the token-dropping forward supports."""
    need = ("patch_embed", "_pos_embed", "norm_pre", "blocks", "norm", "forward_head", "num_prefix_tokens")
    missing = [a for a in need if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"token dropping needs a timm VisionTransformer; {type(model).__name__} lacks {', '.join(missing)}"
        )


def num_patches(model: nn.Module) -> int:
    """Patch tokens per image at the model's input size."""
    pe = model.patch_embed
    n = getattr(pe, "num_patches", None)
    if n is None:
        gh, gw = pe.grid_size
        n = gh * gw
    return int(n)


def num_kept(patches: int, keep: float) -> int:
    """``K = ceil(keep * patches)``, at least 1 (a 1e-6 tolerance absorbs float error: 0.7 * 10 -> 7)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return max(1, min(patches, math.ceil(keep * patches - 1e-6)))


def resolve_blocks(model: nn.Module, blocks: str | Sequence[int]) -> list[int]:
    """Block indices from ``last``, ``mean`` (all blocks) or a list (negative indices allowed)."""
    n = len(model.blocks)
    if blocks == "last":
        return [n - 1]
    if blocks == "mean":
        return list(range(n))
    if isinstance(blocks, str):
        raise ValueError(f"blocks must be 'last', 'mean' or a list of indices, got {blocks!r}")
    out = []
    for b in blocks:
        i = int(b) + n if int(b) < 0 else int(b)
        if not 0 <= i < n:
            raise ValueError(f"block {b} out of range for a model with {n} blocks")
        out.append(i)
    if not out:
        raise ValueError("blocks: empty list")
    return sorted(set(out))


def _attn_module(model: nn.Module, i: int) -> nn.Module:
    attn = getattr(model.blocks[i], "attn", None)
    ok = attn is not None and isinstance(getattr(attn, "qkv", None), nn.Linear) and hasattr(attn, "num_heads")
    if not ok or "rope" in type(attn).__name__.lower() or getattr(attn, "rope", None) is not None:
        raise TypeError(
            f"blocks[{i}].attn ({type(attn).__name__}) is not a timm Attention with a fused qkv Linear "
            "(rotary or split q/k/v attention cannot be rescored from qkv)"
        )
    return attn


# ----------------------------------------------------------------------------- attention from qkv


def attention_from_qkv(attn: nn.Module, qkv: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """Recompute a timm ``Attention``'s softmax from its ``qkv`` Linear output.

    Args:
        attn: the block's Attention module (``num_heads``, ``scale``, ``q_norm``, ``k_norm``).
        qkv: ``attn.qkv(x)``, shape (B, N, 3 * H * D).
        rows: query rows to compute (``slice(0, 1)``: the CLS row only); default all.

    Returns:
        Attention probabilities in float32, (B, H, R, N); each row sums to 1.
    """
    B, N, _ = qkv.shape
    H = attn.num_heads
    D = getattr(attn, "head_dim", qkv.shape[-1] // (3 * H))
    q, k, _ = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rows is not None:
        q = q[:, :, rows]  # (B, H, R, D)
    scale = getattr(attn, "scale", D**-0.5)
    return torch.softmax((q.float() * scale) @ k.float().transpose(-2, -1), dim=-1)  # (B, H, R, N)


@contextmanager
def capture_qkv(model: nn.Module, block_ids: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks on ``blocks[i].attn.qkv``; yields block index -> last qkv output (B, N, 3HD)."""
    out: dict[int, torch.Tensor] = {}
    handles = []
    for i in block_ids:
        attn = _attn_module(model, i)

        def hook(_m, _inp, y, i=i):
            out[i] = y.detach()

        handles.append(attn.qkv.register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _embed(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch embedding and positional embedding: (B, 3, H, W) -> (B, prefix + P, C)."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])


@torch.no_grad()
def cls_attention(model: nn.Module, x: torch.Tensor, block_ids: Sequence[int]) -> torch.Tensor:
    """The CLS query's attention over all tokens, per chosen block and head.

    Runs the model only up to the last chosen block (fused attention untouched).

    Returns:
        float32 (B, L, H, N), rows summing to 1.
    """
    if getattr(model, "cls_token", None) is None:
        raise ValueError("attention tickets need a CLS token (this model has none); use selection random or full")
    attns = {i: _attn_module(model, i) for i in block_ids}
    with capture_qkv(model, block_ids) as qkv:
        h = model.norm_pre(_embed(model, x))
        for blk in model.blocks[: max(block_ids) + 1]:
            h = blk(h)
    rows = [attention_from_qkv(attns[i], qkv[i], rows=slice(0, 1))[:, :, 0] for i in block_ids]  # L x (B, H, N)
    return torch.stack(rows, dim=1)  # (B, L, H, N)


def patch_scores(cls_rows: torch.Tensor, num_prefix: int, sink: str) -> torch.Tensor:
    """Per-patch scores from CLS attention rows, averaged over blocks and heads.

    Args:
        cls_rows: (B, L, H, N) from :func:`cls_attention`.
        num_prefix: prefix tokens (CLS + registers) at the start of the N tokens.
        sink: ``normalize`` (each row's prefix weights -> mean patch weight, then renormalize)
            or ``exclude`` (prefix columns dropped, patch weights as they are).

    Returns:
        (B, P) scores; higher = more attended.
    """
    p = cls_rows[..., num_prefix:]  # (B, L, H, P)
    if sink == "normalize":
        m = p.mean(-1, keepdim=True)  # (B, L, H, 1): the weight given to each prefix column
        p = p / (p.sum(-1, keepdim=True) + num_prefix * m).clamp_min(1e-12)
    elif sink != "exclude":
        raise ValueError(f"sink must be one of {SINKS}, got {sink!r}")
    return p.mean(dim=(1, 2))  # (B, P)


@torch.no_grad()
def score_images(model: nn.Module, x: torch.Tensor, block_ids: Sequence[int], sinks: Sequence[str] = SINKS) -> dict[str, torch.Tensor]:
    """sink -> (B, P) patch scores of a batch (one forward serves every sink mode)."""
    rows = cls_attention(model, x, block_ids)
    return {s: patch_scores(rows, model.num_prefix_tokens, s) for s in sinks}


@torch.no_grad()
def score_dataset(
    model: nn.Module,
    dataset: Dataset,
    block_ids: Sequence[int],
    device: torch.device,
    batch_size: int = 64,
    workers: int = 0,
    desc: str = "ticket scores",
) -> dict[str, torch.Tensor]:
    """Score every image of ``dataset`` (in order) with ``model``; sink -> (len, P) float32 on CPU.

    In a distributed run the batches are spread over the ranks and gathered back in order
    (:func:`sharded_batches`): every rank returns the scores of every image, equal to one
    process's bit for bit (each batch is the one a single process would score).
    """
    was = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def score(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast:
            s = score_images(model, x.to(device, non_blocking=True), block_ids)
        return {k: v.float().cpu() for k, v in s.items()}  # sink -> (B, P)

    per_batch = sharded_batches(dataset, batch_size, workers, score, desc)
    model.train(was)
    return {k: torch.cat([b[k] for b in per_batch]) for k in SINKS}


def sharded_batches(dataset: Dataset, batch_size: int, workers: int, fn: Callable[[torch.Tensor], object], desc: str) -> list:
    """``fn(images)`` of every in-order batch of ``dataset``, in batch order (CPU results).

    One process runs every batch. In a distributed run (:mod:`lotus_deploy.distributed`) rank
    ``r`` runs batches ``r, r + world, ...`` of the same batching (so each batch, and its
    result, is the one a single process computes) and every rank receives every result.

    Args:
        fn: images (B, 3, H, W) -> a picklable result on the CPU (tensors, lists of tensors).
    """
    from lotus_deploy import distributed as dist

    if not dist.active():
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
        return [fn(batch[0]) for batch in bar(loader, desc=desc, unit="batch")]
    n = len(dataset)
    starts = list(range(0, n, batch_size))
    mine = list(dist.shard_indices(len(starts)))  # batch numbers of this rank
    batches = [list(range(starts[b], min(starts[b] + batch_size, n))) for b in mine]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers)
    done = {b: fn(batch[0]) for b, batch in zip(mine, bar(loader, desc=desc, unit="batch"))}
    out: dict[int, object] = {}
    for part in dist.all_gather_object(done, what=f"{desc}: gathering the batches"):
        out.update(part)
    return [out[b] for b in range(len(starts))]


# ----------------------------------------------------------------------------- tickets


def ticket_generator(seed: int, epoch: int = 0) -> torch.Generator:
    """The CPU generator of random tickets for ``seed`` and ``epoch`` (different every epoch)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def random_scores(n_images: int, patches: int, seed: int, epoch: int = 0) -> torch.Tensor:
    """Uniform scores (n_images, P), fixed by ``seed`` and ``epoch`` (different every epoch)."""
    return torch.rand(n_images, patches, generator=ticket_generator(seed, epoch))


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest-scoring patch indices per row, sorted ascending; ties go to lower indices.

    Returns:
        int64 (B, K).
    """
    order = torch.argsort(-scores, dim=1, stable=True)[:, :k]  # (B, K)
    return order.sort(dim=1).values


class Selection:
    """How tickets are drawn: one registered strategy per recipe value of ``selection``.

    Attributes:
        name: the recipe value (``attention``, ``random``, ``full``).
        needs_teacher: tickets come from a teacher's CLS attention scores.
        redraws: new tickets every epoch (else epoch 0's tickets serve every epoch).
    """

    name = ""
    needs_teacher = False
    redraws = False

    def pick(self, scores: torch.Tensor | None, n: int, patches: int, k: int, generator: torch.Generator) -> torch.Tensor:
        """Kept patch indices (n, K) of ``n`` images, int64, each row sorted ascending.

        Args:
            scores: (n, P) teacher scores (``needs_teacher`` only, else ignored).
            k: K, patches kept per image (:func:`num_kept`).
            generator: CPU generator of random draws (``random`` only).
        """
        raise NotImplementedError


class AttentionSelection(Selection):
    """The K patches the teacher's CLS token attends to most."""

    name = "attention"
    needs_teacher = True

    def pick(self, scores, n, patches, k, generator):
        if scores is None or tuple(scores.shape) != (n, patches):
            got = None if scores is None else tuple(scores.shape)
            raise ValueError(f"attention selection needs scores of shape ({n}, {patches}), got {got}")
        return top_k(scores, k)


class RandomSelection(Selection):
    """K uniformly random patches per image, drawn again every epoch (control)."""

    name = "random"
    redraws = True

    def pick(self, scores, n, patches, k, generator):
        return top_k(torch.rand(n, patches, generator=generator), k)


class FullSelection(Selection):
    """Every patch, in order (control); K is P."""

    name = "full"

    def pick(self, scores, n, patches, k, generator):
        return torch.arange(patches).expand(n, patches).clone()


SELECTIONS: Registry[Selection] = Registry("ticket selection")
for _s in (AttentionSelection(), RandomSelection(), FullSelection()):
    SELECTIONS.add(_s.name, _s)
del _s


def select_tickets(
    scores: torch.Tensor | None,
    n_images: int,
    patches: int,
    k: int,
    selection: str,
    seed: int = 0,
    epoch: int = 0,
) -> torch.Tensor:
    """Kept patch indices for ``n_images`` images, shape (n_images, K), int64, each row sorted.

    Args:
        scores: (n_images, P) attention scores; needed for ``attention`` only.
        k: K, patches kept per image, resolved once with :func:`num_kept` (``full`` keeps all P).
        selection: a :data:`SELECTIONS` name: ``attention`` (top-K scores), ``random`` (uniform
            K-subset, seeded per image and epoch) or ``full`` (every patch, in order).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {tuple(SELECTIONS)}, got {selection!r}")
    if not isinstance(k, int) or not 0 < k <= patches:
        raise ValueError(f"k must be an int in [1, {patches}] (see num_kept), got {k!r}")
    return SELECTIONS[selection].pick(scores, n_images, patches, k, ticket_generator(seed, epoch))


def ticket_overlap(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How far two ticket tables (n, K) agree.

    Returns:
        ``shared``: mean fraction of the K kept patches common to both; ``images_changed``:
        fraction of images whose ticket differs.
    """
    same = (a[:, :, None] == b[:, None, :]).any(-1)  # (n, K): a's patch also kept in b
    return {
        "shared": same.float().mean().item(),
        "images_changed": (~same.all(1)).float().mean().item(),
    }


def kept_mask(table: torch.Tensor, patches: int) -> torch.Tensor:
    """Boolean (n, P) on the CPU: True where the ticket table (n, K) keeps the patch."""
    keep = torch.zeros(table.shape[0], patches, dtype=torch.bool)
    return keep.scatter_(1, table.cpu().long(), True)


def drop_frequency(table: torch.Tensor, patches: int) -> torch.Tensor:
    """Fraction of images that drop each patch position, from a ticket table.

    Args:
        table: (n, K) kept patch indices.
        patches: P, patches per image.

    Returns:
        float (P,), each in [0, 1]; the mean is ``1 - K / P``.
    """
    return 1.0 - kept_mask(table, patches).float().mean(0)


class TicketDataset(Dataset):
    """``(image, label, kept_indices)`` items: a dataset and its ticket table (len, K)."""

    def __init__(self, base: Dataset, table: torch.Tensor):
        if len(base) != table.shape[0]:
            raise ValueError(f"ticket table has {table.shape[0]} rows for {len(base)} images")
        self.base, self.table = base, table

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i][:2]
        return x, y, self.table[i]


# ----------------------------------------------------------------------------- token-dropping forward


def forward_features_tokens(model: nn.Module, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """timm ViT features on the kept tokens only.

    ``patch_embed -> _pos_embed -> gather kept patches (prefix kept) -> norm_pre -> blocks ->
    norm``. ``patch_drop`` is skipped (tickets replace it).

    Args:
        x: images (B, 3, H, W).
        idx: kept patch indices (B, K) in [0, P); None keeps every token.

    Returns:
        (B, prefix + K, C).
    """
    h = _embed(model, x)  # (B, prefix + P, C)
    if idx is not None:
        npre = model.num_prefix_tokens
        B, _, C = h.shape
        kept = h[:, npre:].gather(1, idx.to(h.device, torch.long)[:, :, None].expand(B, idx.shape[1], C))  # (B, K, C)
        h = torch.cat([h[:, :npre], kept], dim=1)  # (B, prefix + K, C)
    h = model.norm_pre(h)
    h = model.blocks(h)
    return model.norm(h)


def forward_tokens(model: nn.Module, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, classes) of a timm ViT run on the prefix tokens and the kept patches only."""
    return model.forward_head(forward_features_tokens(model, x, idx))


# ----------------------------------------------------------------------------- hierarchical dropping (Data-LTH / EViT)


@dataclass(frozen=True)
class DropPlan:
    """Where tokens are dropped and how many patches continue (hierarchical tickets).

    Attributes:
        at: block indices, ascending, each >= 1: the tokens entering ``blocks[at[i]]`` are cut
            to ``kept[i]`` patches (plus every prefix token), chosen by the CLS attention of
            ``blocks[at[i] - 1]``.
        kept: K_i, patches continuing at each location (non-increasing, absolute counts).
        patches: P, patches per image at the input.
    """

    at: tuple[int, ...]
    kept: tuple[int, ...]
    patches: int

    @property
    def scoring_blocks(self) -> list[int]:
        """The block whose CLS attention decides each location: ``at[i] - 1``."""
        return [a - 1 for a in self.at]

    @property
    def width(self) -> int:
        """Columns of a concatenated ticket row: sum of K_i."""
        return sum(self.kept)

    def tokens_per_block(self, depth: int, num_prefix: int) -> list[int]:
        """Tokens each of ``depth`` blocks runs on (prefix included)."""
        out, n = [], self.patches
        for b in range(depth):
            if b in self.at:
                n = self.kept[self.at.index(b)]
            out.append(num_prefix + n)
        return out

    def split(self, row: torch.Tensor) -> list[torch.Tensor]:
        """Concatenated tickets (B, sum K_i) -> one (B, K_i) tensor per location."""
        if row.shape[-1] != self.width:
            raise ValueError(f"ticket rows have {row.shape[-1]} columns; the plan needs {self.width} (K per location {self.kept})")
        return list(row.split(list(self.kept), dim=-1))


def drop_plan(model: nn.Module, drop_at: Sequence[int], keeps: Sequence[float]) -> DropPlan:
    """The :class:`DropPlan` of ``drop_at`` with a keep ratio per location (relative to the entering patches).

    ``K_i = ceil(keep_i * K_{i-1})`` with ``K_0 = P`` (:func:`num_kept`), resolved once here.

    Raises:
        ValueError: a location outside [1, depth) or not ascending, or a ratio count mismatch.
    """
    depth = len(model.blocks)
    at = tuple(int(a) for a in drop_at)
    if len(keeps) != len(at):
        raise ValueError(f"{len(keeps)} keep ratios for {len(at)} drop locations")
    if not at or any(a < 1 or a >= depth for a in at) or any(a >= b for a, b in zip(at, at[1:])):
        raise ValueError(f"drop_at must be ascending block indices in [1, {depth - 1}] for a model with {depth} blocks, got {list(at)}")
    for a in at:
        _attn_module(model, a - 1)
    P = num_patches(model)
    kept, n = [], P
    for k in keeps:
        n = num_kept(n, k)
        kept.append(n)
    return DropPlan(at, tuple(kept), P)


def _gather_tokens(h: torch.Tensor, num_prefix: int, pos: torch.Tensor) -> torch.Tensor:
    """Prefix tokens plus the patch tokens at positions ``pos`` (B, K) of the current sequence (B, prefix + n, C)."""
    B, _, C = h.shape
    kept = h[:, num_prefix:].gather(1, pos[:, :, None].expand(B, pos.shape[1], C))  # (B, K, C)
    return torch.cat([h[:, :num_prefix], kept], dim=1)  # (B, prefix + K, C)


def _positions(ids: torch.Tensor, ticket: torch.Tensor) -> torch.Tensor:
    """Positions (B, K) in the current patch ids (B, n) of a ticket's patch ids (B, K); both ascending.

    Raises:
        ValueError: the ticket names a patch that was dropped earlier (tickets must be nested).
    """
    ticket = ticket.to(ids.device, torch.long).contiguous()
    pos = torch.searchsorted(ids, ticket).clamp_max(ids.shape[1] - 1)  # (B, K)
    if not torch.equal(ids.gather(1, pos), ticket):
        raise ValueError("hierarchical tickets must be nested: each location keeps a subset of the previous one's patches")
    return pos


def _cls_patch_scores(attn: nn.Module, qkv: torch.Tensor, num_prefix: int, sink: str) -> torch.Tensor:
    """Scores (B, n) of the current patches from one block's qkv (B, prefix + n, 3HD): its CLS attention averaged over heads."""
    rows = attention_from_qkv(attn, qkv, rows=slice(0, 1))[:, :, 0]  # (B, H, prefix + n)
    return patch_scores(rows[:, None], num_prefix, sink)  # (B, n)


def forward_features_dropping(
    model: nn.Module,
    x: torch.Tensor,
    plan: DropPlan,
    tickets: Sequence[torch.Tensor] | None = None,
    selection: str = "attention",
    sink: str = "normalize",
    generator: torch.Generator | None = None,
    upto: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """timm ViT features with tokens dropped progressively before the blocks of ``plan.at``.

    ``patch_embed -> _pos_embed -> norm_pre -> blocks``, and before ``blocks[at[i]]`` only the
    prefix tokens and ``K_i`` patch tokens continue. The tokens are gathered after the
    positional embedding, so each kept token carries its own position. Without ``tickets`` the
    model chooses online: the CLS attention of ``blocks[at[i] - 1]`` on the tokens it saw
    (recomputed from its qkv, detached; ``selection: random`` draws uniformly instead).

    Args:
        x: images (B, 3, H, W).
        tickets: one (B, K_i) tensor per location of original patch indices in [0, P), each
            row ascending and nested in the previous location's; None chooses online.
        generator: CPU generator of random draws (``selection: random`` without tickets).
        upto: stop before running ``blocks[upto]`` (after its drop, if any) and skip the final
            norm (scoring passes).

    Returns:
        (features (B, prefix + K_last, C) after ``norm``, or the tokens entering ``blocks[upto]``;
        the tickets used, one (B, K_i) int64 tensor per location, in original patch indices).
    """
    if tickets is None and selection not in ("attention", "random"):
        raise ValueError(f"hierarchical selection must be attention or random, got {selection!r}")
    npre = model.num_prefix_tokens
    h = model.norm_pre(_embed(model, x))  # (B, prefix + P, C)
    B = h.shape[0]
    ids = torch.arange(plan.patches, device=h.device).expand(B, plan.patches).contiguous()  # (B, n): original patch index of each token
    online = tickets is None and selection == "attention"
    used: list[torch.Tensor] = []
    with capture_qkv(model, plan.scoring_blocks if online else []) as qkv:
        for b, blk in enumerate(model.blocks):
            if b in plan.at:
                i = plan.at.index(b)
                if tickets is not None:
                    pos = _positions(ids, tickets[i])
                else:
                    s = _cls_patch_scores(model.blocks[b - 1].attn, qkv[b - 1], npre, sink) if online else torch.rand(B, ids.shape[1], generator=generator)
                    pos = top_k(s, plan.kept[i]).to(h.device)  # (B, K_i) positions in the current sequence, ascending
                h = _gather_tokens(h, npre, pos)  # (B, prefix + K_i, C)
                ids = ids.gather(1, pos)
                used.append(ids)
            if upto is not None and b >= upto:
                return h, used
            h = blk(h)
    return model.norm(h), used


def forward_tokens_dropping(model: nn.Module, x: torch.Tensor, plan: DropPlan, tickets: Sequence[torch.Tensor] | None = None, **kw) -> torch.Tensor:
    """Logits (B, classes) of :func:`forward_features_dropping` (same arguments)."""
    return model.forward_head(forward_features_dropping(model, x, plan, tickets, **kw)[0])


@torch.no_grad()
def hierarchical_tickets(model: nn.Module, x: torch.Tensor, plan: DropPlan, sink: str = "normalize") -> list[torch.Tensor]:
    """A teacher's nested attention tickets of a batch: one (B, K_i) int64 tensor per location.

    Runs the teacher only up to the block before the last location.
    """
    if getattr(model, "cls_token", None) is None:
        raise ValueError("attention tickets need a CLS token (this model has none); use selection random")
    return forward_features_dropping(model, x, plan, None, "attention", sink, upto=plan.at[-1])[1]


def random_nested_tickets(n_images: int, plan: DropPlan, seed: int, epoch: int = 0) -> list[torch.Tensor]:
    """Uniformly random nested tickets (one (n, K_i) tensor per location), fixed by ``seed`` and ``epoch``."""
    g = ticket_generator(seed, epoch)
    ids = torch.arange(plan.patches).expand(n_images, plan.patches)
    out = []
    for k in plan.kept:
        ids = ids.gather(1, top_k(torch.rand(n_images, ids.shape[1], generator=g), k))
        out.append(ids)
    return out


@torch.no_grad()
def hierarchical_dataset(
    model: nn.Module,
    dataset: Dataset,
    plan: DropPlan,
    device: torch.device,
    sink: str = "normalize",
    batch_size: int = 64,
    workers: int = 0,
    desc: str = "hierarchical tickets",
) -> dict[str, torch.Tensor]:
    """The teacher's nested tickets of every image of ``dataset`` (in order).

    In a distributed run the batches are spread over the ranks and gathered back in order, as
    in :func:`score_dataset`.

    Returns:
        ``at<block>`` -> (len, K_i) int64 on the CPU, one entry per location.
    """
    was = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def tickets(x: torch.Tensor) -> list[torch.Tensor]:
        with autocast:
            t = hierarchical_tickets(model, x.to(device, non_blocking=True), plan, sink)
        return [v.cpu() for v in t]  # one (B, K_i) per location

    per_batch = sharded_batches(dataset, batch_size, workers, tickets, desc)
    model.train(was)
    return {f"at{a}": torch.cat([b[i] for b in per_batch]) for i, a in enumerate(plan.at)}


def plan_tables(tables: dict[str, torch.Tensor], plan: DropPlan) -> torch.Tensor:
    """``at<block>`` tables of :func:`hierarchical_dataset` -> one (n, sum K_i) table (for :class:`TicketDataset`)."""
    return torch.cat([tables[f"at{a}"] for a in plan.at], dim=1)


# ----------------------------------------------------------------------------- score cache


def weights_hash(model: nn.Module) -> str:
    """sha256 over state-dict names, dtypes, shapes and bytes (equal weights, equal hash)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{k}|{t.dtype}|{tuple(v.shape)}".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def cached_scores(
    directory: Path, split: str, info: dict, compute: Callable[[], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], str, Path]:
    """Load scores keyed by ``info`` from ``directory``, or compute and store them.

    In a distributed run (:mod:`lotus_deploy.distributed`) rank 0 alone reads the cache and
    hands what it found to every rank (the run folder need not be visible from every node);
    on a miss every rank runs ``compute`` (which spreads its batches over the ranks and returns
    every image's scores on every rank: :func:`score_dataset`, :func:`hierarchical_dataset`),
    rank 0 alone writes the file and the others wait for it at a barrier.

    Args:
        info: everything the scores depend on (teacher weights hash, data, subset indices,
            transform, blocks); its sha256 names the file.
        compute: () -> sink -> (n, P) scores (or any name -> tensor table).

    Returns:
        (scores, ``cache`` or ``computed``, file path).
    """
    from lotus_deploy import distributed as dist
    from lotus_deploy.files import save_tensors, sha256_json

    key = sha256_json(info)
    path = Path(directory) / f"scores-{split}-{key[:16]}.safetensors"
    cached = dist.main_computes(lambda: _read_cache(path, key), f"reading the ticket cache {path.name}")
    if cached is not None:
        return cached, "cache", path
    scores = compute()
    if dist.is_main():
        save_tensors(path, scores, metadata={"key": key, "info": json.dumps(info, sort_keys=True, default=str)})
    dist.barrier(f"writing the ticket cache {path.name}")
    return scores, "computed", path


def _read_cache(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The tables stored at ``path`` if the file holds ``key``, else None."""
    from safetensors import safe_open

    from lotus_deploy.files import load_tensors

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return load_tensors(path) if meta.get("key") == key else None


# ----------------------------------------------------------------------------- figures (matplotlib in lotus_deploy.plots, imported lazily)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo the input normalization: (B, 3, H, W) -> values in [0, 1]."""
    m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, dtype=x.dtype)[:, None, None]
    return (x.cpu() * s + m).clamp(0, 1)


def grey_dropped(images: torch.Tensor, idx: torch.Tensor, grid: tuple[int, int], grey: float = 0.5) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] with every patch not in ``idx`` (B, K) set to ``grey``.

    The patch grid (gh, gw) tiles the image row-major, as timm's patch embedding does.
    """
    B, _, H, W = images.shape
    gh, gw = grid
    keep = kept_mask(idx, gh * gw).view(B, 1, gh, gw).float()
    keep = torch.nn.functional.interpolate(keep, size=(H, W), mode="nearest")  # (B, 1, H, W)
    return images * keep + grey * (1 - keep)


def save_ticket_grid(
    images: torch.Tensor, idx: torch.Tensor, grid: tuple[int, int], path: str | Path, title: str = "", labels: Sequence[str] | None = None
) -> Path:
    """PNG of images (B, 3, H, W) in [0, 1], each above its ticket (dropped patches grey)."""
    from lotus_deploy.plots import plot_tickets

    return plot_tickets(path, images.cpu(), grey_dropped(images.cpu(), idx, grid), labels, title)


def save_curves(history: list[dict], path: str | Path, title: str = "") -> Path:
    """PNG of per-epoch accuracy (%) and loss: train, eval on all patches, eval on tickets."""
    from lotus_deploy.plots import plot_training_curves

    return plot_training_curves(path, history, title)
