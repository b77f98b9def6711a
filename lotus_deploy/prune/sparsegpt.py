"""SparseGPT (Frantar and Alistarh, 2023): layer-wise OBS pruning with weight reconstruction.

For a Linear ``(out, K)`` and its calibration inputs ``X`` ``(N·T, K)``, SparseGPT prunes the
columns left to right and, after each column, updates the columns to its right so that ``X Wᵀ``
changes as little as possible (optimal brain surgeon with the Hessian ``H = 2 XᵀX``):

1. ``H += λ I`` with ``λ`` = ``damp`` (1 %) of the mean of ``diag(H)``; the upper Cholesky
   factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) gives every row of the sequential update.
2. Columns are processed in blocks of ``block`` (128). Unstructured: at the start of a block,
   its mask is chosen *adaptively* from the current (already updated) weights: the block's share
   of zeros goes to the smallest ``w² / U_jj²``. n:m (2:4): at the start of each group of ``m``
   columns, the ``m − n`` smallest ``w² / U_jj²`` of each row go.
3. For column ``j``: ``err = (w_j − q_j) / U_jj`` (``q_j`` = ``w_j`` with the pruned entries
   zeroed); the block's later columns take ``− err ⊗ U_j,j:``; after the block, the columns to
   its right take ``− Err @ U_block,right`` (lazy batch update).

Masks in force (``existing``) are respected: their weights are pruned first in every block and
group, count toward the target and stay exactly zero (the reconstruction writes ``q_j``, which
is zero there). Zero counts per block are shared by :func:`lotus_deploy.masks.spread`, so the
layer has exactly the asked-for zeros. Unlike the reference code, inputs that are always zero
keep their weights (``H_jj`` is set to 1 so the factorization exists; the mask decides). Pure:
the weight is copied. torch is imported inside the functions.

Damping matters where ``XᵀX`` is near-singular: a LayerNorm still at its initial affine
(γ = 1, β = 0) makes the inputs of the Linears after it sum to zero over channels, and on small
layers (32 channels) SparseGPT at 1 % damping then reconstructs worse than plain magnitude
pruning (more damping, as ModelOpt's default 10 %, recovers it); trained LayerNorms lift that.
"""

from __future__ import annotations

BLOCK = 128
DAMP = 0.01


def inverse_hessian_factor(gram, damp: float = DAMP):
    """Upper Cholesky factor ``U`` of ``(H + λI)⁻¹`` for ``H = gram`` (float32, ``(K, K)``).

    Dead inputs (``H_jj == 0``) get ``H_jj = 1``. When the factorization fails, the damping is
    raised tenfold (at most 4 times).
    """
    import torch

    h = gram.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diag(h).mean())
    eye = torch.eye(h.shape[0], device=h.device)
    for attempt in range(5):
        try:
            lower = torch.linalg.cholesky(h + (damp * 10**attempt) * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses it
            continue
    raise RuntimeError("sparsegpt: the damped Hessian is not positive definite even with 10,000x damping")


def sparsegpt_prune(weight, gram, n_zero: int | None = None, nm: tuple[int, int] | None = None, existing=None,
                    block: int = BLOCK, damp: float = DAMP):
    """Prune one Linear weight with SparseGPT; returns ``(mask, reconstructed weight)``.

    Args:
        weight: ``(out, K)`` Linear weight (not modified).
        gram: ``(K, K)`` ``XᵀX`` of the layer's calibration inputs.
        n_zero: unstructured: zeros in the whole weight, ``existing``'s included.
        nm: ``(n, m)``: keep at most ``n`` of every ``m`` consecutive weights along K (2:4 is
            ``(2, 4)``); ``K % m == 0``.
        existing: ``(out, K)`` bool mask in force (True = keep); the result is a subset of it.
        block: columns per block of the lazy update (a multiple of ``m``).
        damp: damping as a fraction of the mean Hessian diagonal.

    Returns:
        ``mask`` (bool, True = keep) and the reconstructed weight (dtype of ``weight``), zero
        wherever the mask is False.
    """
    import torch

    from lotus_deploy.masks import spread

    if (n_zero is None) == (nm is None):
        raise ValueError("give n_zero (unstructured) or nm (n:m), not both")
    rows, cols = weight.shape
    if nm is not None:
        n_keep, m = nm
        if cols % m or block % m:
            raise ValueError(f"K={cols} and block={block} must be multiples of m={m}")
    w = weight.detach().float().clone()  # (out, K), updated in place column by column
    u = inverse_hessian_factor(gram.to(w.device), damp)  # (K, K) upper
    gone = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)  # True = pruned
    if existing is not None:
        gone |= ~existing.to(device=w.device, dtype=torch.bool)
    starts = list(range(0, cols, block))
    if n_zero is not None:  # each block's zeros, as even as existing zeros allow
        sizes = [rows * (min(i + block, cols) - i) for i in starts]
        floors = [int(gone[:, i : i + block].sum()) for i in starts]
        quota = spread(n_zero, sizes, floors)
    for bi, i1 in enumerate(starts):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()  # (out, B)
        u1 = u[i1:i2, i1:i2]  # (B, B)
        d = torch.diag(u1)  # (B,)
        g1 = gone[:, i1:i2].clone()  # (out, B)
        if n_zero is not None:  # adaptive mask of the whole block from its current weights
            score = (w1**2 / d**2).masked_fill(g1, -1.0).flatten()
            g1.view(-1)[torch.argsort(score, stable=True)[: quota[bi]]] = True
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            if nm is not None and j % m == 0:  # choose this group of m from the current weights
                score = (w1[:, j : j + m] ** 2 / d[j : j + m] ** 2).masked_fill(g1[:, j : j + m], -1.0)
                drop = torch.argsort(score, dim=1, stable=True)[:, : m - n_keep]  # (out, m - n)
                g1[:, j : j + m].scatter_(1, drop, True)
            q = w1[:, j].masked_fill(g1[:, j], 0.0)  # (out,)
            q1[:, j] = q
            e = (w1[:, j] - q) / d[j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            err1[:, j] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
        gone[:, i1:i2] = g1
    keep = ~gone
    return keep, (w * keep).to(weight.dtype)
