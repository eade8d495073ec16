"""Weight clustering (hfquant/algorithms/clustering.py) on real weights of the default model."""
import pytest
import torch
from safetensors import safe_open

from hfquant.algorithms.clustering import assign_nearest, kmeans_quantize, kmeans_rows
from hfquant.formats import dequantize, quantize_rtn

LAYERS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.7.mlp.down_proj.weight",
          "model.layers.20.mlp.gate_proj.weight"]


@pytest.fixture(scope="module")
def weights(model_dir):
    with safe_open(f"{model_dir}/model.safetensors", "pt") as f:
        # 256 rows of each: enough for the statistics, a few seconds of clustering
        return {name: f.get_slice(name)[:256] for name in LAYERS}


def _kmeans_weight(w, r, group_size):
    N, K = w.shape
    g = K if group_size == -1 else group_size
    gidx = (torch.arange(K) // g).expand(N, -1)
    return r.codebook.float()[torch.arange(N)[:, None], gidx, r.indices]


def _row_mse(a, b):
    return ((a.float() - b.float()) ** 2).mean(1)


@pytest.mark.parametrize("group_size", [-1, 128], ids=["per-row", "g128"])
def test_kmeans_error_below_uniform_rtn(weights, group_size):
    """4-bit k-means beats 4-bit round-to-nearest (symmetric and asymmetric) on every layer,
    in mean squared error and on (nearly) every row; 3 bits cost more error than 4."""
    for name, w in weights.items():
        km = _row_mse(_kmeans_weight(w, kmeans_quantize(w, 4, group_size), group_size), w)
        for sym in (True, False):
            q = quantize_rtn(w, 4, group_size, sym)
            rtn = _row_mse(dequantize(q.qweight, q.scales, q.zeros, 4, group_size, w.shape[1]), w)
            assert km.mean() < 0.8 * rtn.mean(), f"{name} sym={sym}: {km.mean():.3e} vs RTN {rtn.mean():.3e}"
            assert (km <= rtn * 1.0001).float().mean() > 0.97, f"{name} sym={sym}: k-means worse on many rows"
        km3 = _row_mse(_kmeans_weight(w, kmeans_quantize(w, 3, group_size), group_size), w)
        assert km.mean() < km3.mean()


def test_kmeans_codebook_and_indices_are_consistent(weights):
    w = weights[LAYERS[0]]
    for bits in (2, 3, 4):
        r = kmeans_quantize(w, bits, 64, codebook_dtype=torch.bfloat16)
        assert r.codebook.dtype == torch.bfloat16 and r.codebook.shape == (w.shape[0], w.shape[1] // 64, 1 << bits)
        assert r.indices.shape == w.shape and int(r.indices.max()) < (1 << bits)
        cb = r.codebook.float()
        assert torch.all(cb[..., 1:] >= cb[..., :-1]), "codebooks are sorted"
        # every index is the nearest entry of the stored (rounded) codebook
        wq = _kmeans_weight(w, r, 64)
        best = (w[..., None] - cb.repeat_interleave(64, 1)).abs().amin(-1)
        assert torch.allclose((w - wq).abs(), best, atol=0)


def test_kmeans_deterministic_with_seed(weights):
    w = weights[LAYERS[1]][:16]
    for init in ("uniform", "quantile", "kmeans++"):
        a = kmeans_quantize(w, 4, -1, init=init, seed=3)
        b = kmeans_quantize(w, 4, -1, init=init, seed=3)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.codebook, b.codebook), init
    c = kmeans_quantize(w, 4, -1, init="kmeans++", seed=4)
    assert not torch.equal(a.codebook, c.codebook), "another seed gives another k-means++ start"


def test_weighted_kmeans_honours_importance():
    """Heavily weighted points pull centroids onto them: the weighted objective drops overall, the
    heavy points' error drops, and the result is a fixed point of weighted Lloyd (every centroid
    the importance-weighted mean of its members)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=gen)
    imp = torch.ones_like(x)
    imp[:, :8] = 1000.0  # the first 8 weights of each row matter most
    plain = kmeans_quantize(x, 2, -1)
    weighted = kmeans_quantize(x, 2, -1, importance=imp)
    wp, ww = _kmeans_weight(x, plain, -1), _kmeans_weight(x, weighted, -1)
    assert (imp * (ww - x) ** 2).sum() < 0.7 * (imp * (wp - x) ** 2).sum()
    assert (ww - x)[:, :8].abs().mean() < 0.8 * (wp - x)[:, :8].abs().mean()
    cb = weighted.codebook[:, 0]
    for row in range(0, 64, 7):
        for j in weighted.indices[row].unique():
            m = weighted.indices[row] == j
            mean = (imp[row][m] * x[row][m]).sum() / imp[row][m].sum()
            assert torch.isclose(cb[row, j], mean, atol=1e-5), (row, int(j))
    # zero importance on a whole row: still finite, valid centroids
    imp0 = imp.clone()
    imp0[5] = 0
    r = kmeans_quantize(x, 2, -1, importance=imp0)
    assert torch.isfinite(r.codebook).all()


def test_lloyd_converges_to_fixed_point_and_handles_empty_clusters():
    # a row with 3 distinct values and 16 clusters; a constant row; a ragged group (valid mask)
    x = torch.tensor([[0.0] * 10 + [1.0] * 10 + [5.0] * 12, [2.0] * 32, list(range(32))], dtype=torch.float32)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[2, 20:] = False
    cents, it = kmeans_rows(x, 16, valid=valid)
    assert torch.isfinite(cents).all() and torch.all(cents[:, 1:] >= cents[:, :-1])
    a = assign_nearest(x, cents)
    err = (torch.gather(cents, 1, a) - x) ** 2
    assert err[0].max() == 0 and err[1].max() == 0
    assert err[2, :20].max() < 0.3  # 20 valid points, 16 clusters: padding did not pull centroids
    assert cents[2].max() <= 19
    # Lloyd fixed point: every centroid with members is the mean of its members
    for row in range(3):
        m = valid[row]
        for j in a[row][m].unique():
            assert torch.isclose(cents[row, j], x[row][m][a[row][m] == j].mean())


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), "bits=5"),
    (dict(init="random"), "init='random'"),
    (dict(importance=torch.ones(3, 3)), "importance has shape"),
    (dict(importance=-torch.ones(8, 64)), "finite and >= 0"),
])
def test_kmeans_rejects_bad_arguments(kwargs, match):
    args = dict(bits=4, group_size=-1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        kmeans_quantize(torch.randn(8, 64), **args)
    with pytest.raises(ValueError, match="NaN or Inf"):
        kmeans_quantize(torch.full((2, 4), float("nan")), 4)


def test_keep_range_pins_outer_centroids(weights):
    w = weights[LAYERS[2]][:32]
    for gs in (-1, 64):  # 576 = 9 x 64
        r = kmeans_quantize(w, 3, gs, keep_range=True)
        g = w.shape[1] if gs == -1 else gs
        wg = w.reshape(w.shape[0], -1, g)
        assert torch.equal(r.codebook[..., 0], wg.amin(-1)) and torch.equal(r.codebook[..., -1], wg.amax(-1))
