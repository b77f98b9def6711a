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

Tensor shapes: ``B`` images, ``N = prefix + P`` tokens, ``P`` patches, ``H`` heads, ``D`` head
width, ``L`` chosen blocks, ``K`` kept patches.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import contextmanager
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
    """Score every image of ``dataset`` (in order) with ``model``; sink -> (len, P) float32 on CPU."""
    was = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    out: dict[str, list[torch.Tensor]] = {s: [] for s in SINKS}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for batch in bar(loader, desc=desc, unit="batch"):
        with autocast:
            s = score_images(model, batch[0].to(device, non_blocking=True), block_ids)
        for k, v in s.items():
            out[k].append(v.float().cpu())
    model.train(was)
    return {k: torch.cat(v) for k, v in out.items()}


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

    Args:
        info: everything the scores depend on (teacher weights hash, data, subset indices,
            transform, blocks); its sha256 names the file.
        compute: () -> sink -> (n, P) scores.

    Returns:
        (scores, ``cache`` or ``computed``, file path).
    """
    from lotus_deploy.files import load_tensors, save_tensors, sha256_json

    key = sha256_json(info)
    path = Path(directory) / f"scores-{split}-{key[:16]}.safetensors"
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") == key:
            return load_tensors(path), "cache", path
    scores = compute()
    save_tensors(path, scores, metadata={"key": key, "info": json.dumps(info, sort_keys=True, default=str)})
    return scores, "computed", path


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
