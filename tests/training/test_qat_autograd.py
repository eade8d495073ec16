"""The backward pass of hfquant::qlinear (activations, packed scales, bias) and the scale
layout built from trainable scales: gradcheck of the formulas in float64 against ref.py's
forward, and the native op's gradients against autograd through the float64 reference."""
import pytest
import torch

import hfquant  # noqa: F401  (registers the op's autograd formula)
from hfquant import formats, ops, ref
from hfquant.nn import QuantLinear
from hfquant.qat.autograd import packed_scales_from, qlinear_backward
from hfquant.qat.scale_training import enable_scale_training

from _utils import assert_close

# (bits, group_size, symmetric); K = 100 leaves a short last group and pads the kernel's k
SCHEMES = [(4, -1, True), (4, 32, False), (4, 64, True), (8, -1, False), (8, 32, True)]
IDS = [f"w{b}{'c' if g == -1 else f'g{g}'}{'' if s else 'a'}" for b, g, s in SCHEMES]
N, K = 37, 100


class QLinearRefFunction(torch.autograd.Function):
    """ref.qlinear_ref forward with the analytic backward of hfquant/qat/autograd.py: the
    gradcheck target in float64 (the native op computes in float32 only)."""

    @staticmethod
    def forward(ctx, x, packed_weight, packed_scales, bias, bits, group_size, out_features, in_features):
        ctx.save_for_backward(x, packed_weight, packed_scales, bias)
        ctx.args = (bits, group_size, out_features, in_features)
        return ref.qlinear_ref(x, packed_weight, packed_scales, bias, bits, group_size, out_features, in_features)

    @staticmethod
    def backward(ctx, grad_y):
        x, packed_weight, packed_scales, bias = ctx.saved_tensors
        gx, gps, gb = qlinear_backward(grad_y, x, packed_weight, packed_scales, bias, *ctx.args,
                                       needs=ctx.needs_input_grad[:4])
        return gx, None, gps, gb, None, None, None, None


def _layer(bits, group_size, symmetric, seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, K, generator=g) * 0.05
    q = formats.quantize_rtn(w, bits, group_size, symmetric)
    bias = torch.randn(n, generator=g)
    return q, bias


@pytest.mark.parametrize("bits,group_size,symmetric", SCHEMES, ids=IDS)
def test_packed_scales_equal_repack(bits, group_size, symmetric):
    q, _ = _layer(bits, group_size, symmetric)
    _, ps = ops.repack(q.qweight, q.scales, q.zeros, bits, group_size, K)
    assert torch.equal(packed_scales_from(q.scales, q.zeros, bits), ps)
    # the CUDA layout, built by the reference on the CPU
    _, ps_cuda = ref.repack_cuda_ref(q.qweight, q.scales, q.zeros, bits, group_size, K)
    assert torch.equal(packed_scales_from(q.scales, q.zeros, bits, "cuda"), ps_cuda)


@pytest.mark.parametrize("layout", ["cpu", "cuda"])
@pytest.mark.parametrize("bits,group_size,symmetric", SCHEMES, ids=IDS)
def test_gradcheck_float64(bits, group_size, symmetric, layout):
    n = 6  # every input element is perturbed: a small layer (rows padded to 8 in the CPU layout)
    q, bias = _layer(bits, group_size, symmetric, n=n)
    repack = ref.repack_ref if layout == "cpu" else ref.repack_cuda_ref
    pw, ps = repack(q.qweight, q.scales, q.zeros, bits, group_size, K)
    x = torch.randn(2, K, dtype=torch.float64, requires_grad=True)
    psd = ps.double().requires_grad_()
    b = bias.double().requires_grad_()
    # fast mode: Jacobian-vector products with random vectors, analytic vs numerical
    assert torch.autograd.gradcheck(
        lambda a, p, bb: QLinearRefFunction.apply(a, pw, p, bb, bits, group_size, n, K), (x, psd, b),
        fast_mode=True)


@pytest.mark.parametrize("shape", [(1, K), (17, K), (2, 5, K)], ids=["M1", "M17", "3d"])
@pytest.mark.parametrize("bits,group_size,symmetric", SCHEMES, ids=IDS)
def test_native_backward_matches_reference_autograd(bits, group_size, symmetric, shape):
    q, bias = _layer(bits, group_size, symmetric)
    pw, ps = ops.repack(q.qweight, q.scales, q.zeros, bits, group_size, K)
    x = torch.randn(shape, requires_grad=True)
    psn = ps.clone().requires_grad_()
    bn = bias.clone().requires_grad_()
    y = ops.qlinear(x, pw, psn, bn, bits, group_size, N, K)
    gy = torch.randn_like(y)
    y.backward(gy)
    # oracle: torch's own autograd through the pure-torch twin, in float64
    xr = x.detach().double().requires_grad_()
    psr = ps.double().requires_grad_()
    br = bias.double().requires_grad_()
    ref.qlinear_ref(xr, pw, psr, br, bits, group_size, N, K).backward(gy.double())
    assert_close(x.grad, xr.grad, msg="grad x")
    assert_close(psn.grad, psr.grad, msg="grad packed_scales")
    assert_close(bn.grad, br.grad, msg="grad bias")


def test_opcheck_with_gradients():
    q, bias = _layer(4, 32, False)
    pw, ps = ops.repack(q.qweight, q.scales, q.zeros, 4, 32, K)
    x = torch.randn(5, K, requires_grad=True)
    torch.library.opcheck(torch.ops.hfquant.qlinear.default,
                          (x, pw, ps.clone().requires_grad_(), bias.clone().requires_grad_(), 4, 32, N, K))


@pytest.mark.parametrize("bits,group_size,symmetric", SCHEMES, ids=IDS)
def test_scale_training_gradients(bits, group_size, symmetric):
    """Gradients of a scale-trainable QuantLinear's scales and zero points, through the native
    op, against autograd through (v - z) * s in float64."""
    q, bias = _layer(bits, group_size, symmetric)
    layer = QuantLinear.from_quantized(q, bias)
    model = torch.nn.Sequential(layer)
    enable_scale_training(model)
    x = torch.randn(9, K)
    y = model(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    codes, z = formats.v1.codes_and_zeros(q.qweight, q.zeros, bits, K)
    s = q.scales.double().requires_grad_()
    zf = (z.double() if q.zeros is not None else z.double().expand(N, s.shape[1]).clone()).requires_grad_()
    gidx = torch.arange(K) // (K if group_size == -1 else group_size)
    w = (codes.double() - zf[:, gidx]) * s[:, gidx]
    (x.double() @ w.t() + bias.double()).backward(gy.double())
    assert_close(layer.scales.grad, s.grad, msg="grad scales")
    if not symmetric:
        assert_close(layer.zeros.grad, zf.grad, msg="grad zeros")
    assert layer.bias.grad is None  # frozen
