"""Weight clustering: 1-D k-means per output row (or per row and group), all rows at once.

Each row (or row-group) of a weight gets its own codebook of k = 2^bits centroids and every
weight is replaced by the index of its nearest centroid. The fit is Lloyd's algorithm run
on all rows together in torch:

- assignment: in one dimension the nearest of sorted centroids is found by a binary search
  over the midpoints between neighbours (``torch.searchsorted``, batched over rows), so an
  iteration costs O(n log k) and no [n, k] distance matrix is built;
- update: per-cluster (weighted) sums and counts by one ``index_add_`` over the flattened
  rows; centroids are kept sorted;
- empty clusters: the centroid moves onto the weight of its row with the largest
  (importance-weighted) squared error, one per row and iteration, so no code is wasted
  while a row has more distinct values than clusters;
- stop: when no assignment changes, or after ``max_iter`` iterations.

Initialisation is deterministic: ``"uniform"`` (default) starts from the uniform grid
between each row's minimum and maximum, the grid of asymmetric round-to-nearest, so Lloyd
only improves on it; ``"quantile"`` puts the centroids at the (weighted) quantiles
(i + 0.5) / k; ``"kmeans++"`` samples them with D^2 weighting from a generator seeded
with ``seed``. (On the default model's weights quantile starts end worse than uniform at
group 128: heavy tails get too few centroids.)

``importance`` (same shape as the weight, >= 0) turns the objective into
sum_i importance_i (w_i - c(w_i))^2: the weighted k-means of SqueezeLLM, whose sensitivity
is the diagonal of the Fisher information. A calibrated method passes it; the data-free
method leaves it None (all ones).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

INITS = ("uniform", "quantile", "kmeans++")


@dataclass
class KMeansResult:
    indices: torch.Tensor  # int64 [N, K], index into the codebook of the element's row/group
    codebook: torch.Tensor  # [N, G, k] in the requested dtype, sorted ascending per row/group
    iterations: int  # Lloyd iterations run


def _grouped(x: torch.Tensor, group_size: int, fill: float) -> torch.Tensor:
    """[N, K] -> [N * G, g]; the ragged last group padded with ``fill``."""
    N, K = x.shape
    g = K if group_size == -1 else group_size
    G = -(-K // g)
    if G * g != K:
        x = torch.nn.functional.pad(x, (0, G * g - K), value=fill)
    return x.reshape(N * G, g)


def _quantile_init(x: torch.Tensor, wt: torch.Tensor, k: int) -> torch.Tensor:
    """Weighted quantiles (i + 0.5) / k of each row; padding has weight 0. x, wt: [B, n]."""
    xs, order = torch.sort(x, dim=1)
    cw = torch.cumsum(torch.gather(wt, 1, order), dim=1)
    total = cw[:, -1:].clamp_min(torch.finfo(cw.dtype).tiny)
    targets = (torch.arange(k, dtype=x.dtype, device=x.device) + 0.5) / k
    pos = torch.searchsorted(cw / total, targets.expand(x.shape[0], k).contiguous())
    return torch.gather(xs, 1, pos.clamp_max(x.shape[1] - 1))


def _kmeanspp_init(x: torch.Tensor, wt: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ (Arthur & Vassilvitskii 2007) per row: each next centroid drawn with
    probability proportional to importance x squared distance to the nearest one so far."""
    B, n = x.shape
    rows = torch.arange(B, device=x.device)
    p = wt.clamp_min(0)
    p = torch.where(p.sum(1, keepdim=True) > 0, p, torch.ones_like(p))
    first = torch.multinomial(p, 1, generator=gen).squeeze(1)
    cents = [x[rows, first]]
    d2 = (x - cents[0][:, None]) ** 2
    for _ in range(1, k):
        q = d2 * wt
        # rows whose points are all covered draw uniformly (the centroid duplicates one)
        q = torch.where(q.sum(1, keepdim=True) > 0, q, p)
        nxt = torch.multinomial(q, 1, generator=gen).squeeze(1)
        c = x[rows, nxt]
        cents.append(c)
        d2 = torch.minimum(d2, (x - c[:, None]) ** 2)
    return torch.stack(cents, 1)


@torch.no_grad()
def kmeans_rows(x: torch.Tensor, k: int, importance: torch.Tensor | None = None, valid: torch.Tensor | None = None,
                init: str = "uniform", max_iter: int = 100, seed: int = 0,
                keep_range: bool = False) -> tuple[torch.Tensor, int]:
    """Lloyd's k-means on every row of x [B, n] at once.

    importance: [B, n] >= 0 or None; valid: bool [B, n] (False = padding, ignored) or None.
    Returns (centroids float32 [B, k] sorted ascending, iterations run); ``assign_nearest``
    gives the assignment.

    Each row is sorted once; in one dimension the clusters of sorted centroids are
    contiguous runs of the sorted row, so an iteration finds the k - 1 run boundaries by
    binary search and the (weighted) cluster sums as differences of prefix sums (float64):
    O(k log n) per row instead of O(n). Rows whose boundaries stopped moving are dropped
    from the working set (compacted when it halves).
    """
    if init not in INITS:
        raise ValueError(f"kmeans: init={init!r} is not supported (use one of {INITS})")
    if k < 2:
        raise ValueError(f"kmeans: k={k} must be at least 2")
    x = x.to(torch.float32)
    B, n = x.shape
    dev = x.device
    wt = torch.ones_like(x) if importance is None else importance.to(torch.float32)
    member = torch.ones_like(x) if valid is None else valid.to(torch.float32)
    wt = wt * member
    if init == "uniform":
        lo_ = torch.where(member > 0, x, torch.inf).amin(1, keepdim=True)
        hi_ = torch.where(member > 0, x, -torch.inf).amax(1, keepdim=True)
        cents = lo_ + (hi_ - lo_) * torch.linspace(0, 1, k, device=dev)
    elif init == "quantile":
        cents = _quantile_init(x, wt, k)
    else:
        gen = torch.Generator(device=dev).manual_seed(seed)
        cents = _kmeanspp_init(x, wt, k, gen)
    cents, _ = torch.sort(cents, dim=1)
    # padding sorts to the end and weighs nothing; xsv has +inf there so no boundary passes it
    xsv, order = torch.sort(torch.where(member > 0, x, torch.inf), dim=1)
    xs = torch.where(torch.isinf(xsv), 0.0, xsv)
    ws = torch.gather(wt, 1, order)
    zero = torch.zeros(B, 1, dtype=torch.float64, device=dev)
    cw = torch.cat([zero, ws.double().cumsum(1)], 1)  # [B, n + 1]
    cwx = torch.cat([zero, (ws.double() * xs.double()).cumsum(1)], 1)
    last = member.sum(1).long()[:, None]  # members are the first `last` sorted entries
    rows = torch.arange(B, device=dev)  # global row of each working row
    return _lloyd(cents, xsv, xs, ws, cw, cwx, last, rows, max_iter, keep_range)


@contextlib.contextmanager
def _one_thread():
    """Clustering runs in one intra-op thread: the Lloyd loop is ~25 small ops ([rows, k]) per
    iteration, and with several threads each pays a fork/join; on the default model with 2
    threads on a busy 2-core machine that measured 2-5x slower than one thread (quantize on
    load works through layers one at a time, so there is no other work to overlap)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _lloyd(cents, xsv, xs, ws, cw, cwx, last, rows, max_iter, keep_range=False):
    out = cents.clone()
    a_cents = cents
    bounds = None
    it = 0
    for it in range(1, max_iter + 1):
        mid = ((a_cents[:, 1:] + a_cents[:, :-1]) * 0.5).contiguous()
        # cluster j holds sorted entries [lo_j, hi_j): x <= mid_j goes left (as assign_nearest)
        b = torch.searchsorted(xsv, mid, right=True)
        if bounds is not None:
            moving = (b != bounds).any(1)
            n_moving = int(moving.sum())
            if n_moving == 0:
                break
            if 2 * n_moving <= rows.numel():
                out[rows] = a_cents
                keep = moving.nonzero().squeeze(1)
                rows, a_cents, b = rows[keep], a_cents[keep], b[keep]
                xsv, xs, ws, cw, cwx, last = xsv[keep], xs[keep], ws[keep], cw[keep], cwx[keep], last[keep]
        bounds = b
        lo = torch.cat([torch.zeros_like(last), b], 1)
        hi = torch.cat([b, last], 1)
        sw = cw.gather(1, hi) - cw.gather(1, lo)
        swx = cwx.gather(1, hi) - cwx.gather(1, lo)
        # a cluster whose members all have importance 0 (or none) keeps its centroid
        new = torch.where(sw > 0, swx / sw.clamp_min(1e-300), a_cents.double()).float()
        empty = hi == lo
        if empty.any():
            er = empty.any(1).nonzero().squeeze(1)
            srt = torch.sort(new[er], 1)[0]
            xr = xs[er]
            err = ws[er] * (xr - torch.gather(srt, 1, assign_nearest(xr, srt))) ** 2
            best_err, best = err.max(1)
            slot = empty[er].to(torch.int8).argmax(1)  # first empty cluster of the row
            ok = best_err > 0  # nothing to gain where every weight is already exact
            new[er[ok], slot[ok]] = xr[ok, best[ok]]
        if keep_range:
            # the outermost centroids stay on the row's minimum and maximum (as the uniform
            # grid's ends do), so the largest weights are kept exactly
            new[:, 0] = xs[:, 0]
            new[:, -1] = xs.gather(1, (last - 1).clamp_min(0)).squeeze(1)
        # means of ordered runs are ordered; a kept or moved centroid may not be
        a_cents = torch.sort(new, dim=1)[0] if (sw <= 0).any() else new
    out[rows] = a_cents
    return out, it


def assign_nearest(x: torch.Tensor, cents: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (ties to the lower), cents sorted ascending per row:
    x [B, n], cents [B, k] -> int64 [B, n]."""
    mid = (cents[:, 1:] + cents[:, :-1]) * 0.5
    return torch.searchsorted(mid.contiguous(), x.contiguous(), right=False)


@torch.no_grad()
def kmeans_quantize(weight: torch.Tensor, bits: int, group_size: int = -1, importance: torch.Tensor | None = None,
                    init: str = "uniform", max_iter: int = 100, seed: int = 0,
                    codebook_dtype: torch.dtype | None = None, keep_range: bool = False) -> KMeansResult:
    """Clusters a float weight [N, K] into 2^bits centroids per row (group_size -1) or per row
    and group of ``group_size`` consecutive inputs.

    The centroids are rounded to ``codebook_dtype`` (default: the weight's dtype) and the
    final indices are the nearest of the rounded centroids, so the stored codebook is
    exactly the one the indices were chosen for.
    """
    if weight.dim() != 2:
        raise ValueError(f"kmeans_quantize: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"kmeans_quantize: weight must be floating point, got {weight.dtype}")
    if bits not in (2, 3, 4):
        raise ValueError(f"kmeans_quantize: bits={bits} is not supported (use 2, 3 or 4)")
    if group_size != -1 and group_size <= 0:
        raise ValueError(f"kmeans_quantize: group_size={group_size} must be -1 or positive")
    if not torch.isfinite(weight).all():
        raise ValueError("kmeans_quantize: weight contains NaN or Inf")
    if importance is not None:
        if importance.shape != weight.shape:
            raise ValueError(f"kmeans_quantize: importance has shape {tuple(importance.shape)}, expected "
                             f"{tuple(weight.shape)} (one value per weight)")
        if not torch.isfinite(importance).all() or (importance < 0).any():
            raise ValueError("kmeans_quantize: importance must be finite and >= 0")
    N, K = weight.shape
    k = 1 << bits
    codebook_dtype = codebook_dtype or weight.dtype
    w = weight.detach().to(torch.float32)
    x = _grouped(w, group_size, 0.0)
    valid = _grouped(torch.ones(N, K, dtype=torch.bool, device=w.device), group_size, False) \
        if group_size != -1 and K % group_size else None
    imp = None if importance is None else _grouped(importance.detach().to(torch.float32), group_size, 0.0)
    with _one_thread():
        cents, iters = kmeans_rows(x, k, imp, valid, init=init, max_iter=max_iter, seed=seed,
                                   keep_range=keep_range)
        # round to the stored dtype, keep sorted (rounding is monotone), assign to the stored values
        cents = cents.to(codebook_dtype).to(torch.float32)
        assign = assign_nearest(x, cents)
    G = x.shape[0] // N
    indices = assign.reshape(N, -1)[:, :K]
    return KMeansResult(indices.contiguous(), cents.reshape(N, G, k).to(codebook_dtype).contiguous(), iters)
