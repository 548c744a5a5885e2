import pytest
import torch

from qdistill.quantizers import UniformQuantizer, qrange, search_range
from qdistill.quantizers.uniform import fake_quant


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_outputs_lie_on_the_grid(bits, symmetric):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 3, 3) * torch.linspace(0.1, 3, 16)[:, None, None, None]
    q = UniformQuantizer(bits, symmetric, channel_axis=0, num_channels=16)
    q.init_range(x, "minmax")
    y = q(x)
    delta = q.delta.view(-1, 1, 1, 1)
    codes = y / delta + q.zero.round().view(-1, 1, 1, 1)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    qmin, qmax = qrange(bits, symmetric)
    assert codes.round().min() >= qmin and codes.round().max() <= qmax
    for c in range(16):
        assert y[c].unique().numel() <= 2**bits
    # min/max init covers the range: the error is at most half a step everywhere
    assert ((y - x).abs() <= delta / 2 + 1e-6).all()


def test_per_channel_and_per_tensor_shapes():
    x = torch.randn(8, 5) * torch.logspace(-2, 1, 8)[:, None]
    per_channel = UniformQuantizer(4, channel_axis=0, num_channels=8)
    per_tensor = UniformQuantizer(4, channel_axis=None)
    per_channel.init_range(x)
    per_tensor.init_range(x)
    assert per_channel.delta.shape == (8,) and per_tensor.delta.shape == (1,)
    assert per_channel(x).shape == x.shape == per_tensor(x).shape
    # small-range channels are resolved per channel but collapse to zero per tensor
    assert (per_channel(x) - x)[0].abs().max() < (per_tensor(x) - x)[0].abs().max()


def test_lsq_gradients_reach_step_and_zero_point():
    torch.manual_seed(0)
    x = torch.randn(4, 64, requires_grad=True)
    q = UniformQuantizer(4, symmetric=False, channel_axis=0, num_channels=4)
    q.init_range(x.detach(), "mse")  # MSE clips, so the clipped values give Δ and z a gradient
    target = torch.randn(4, 64)
    ((q(x) - target) ** 2).mean().backward()
    for g in (q.delta.grad, q.zero.grad, x.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_inference_path_equals_training_path():
    torch.manual_seed(0)
    x = torch.randn(3, 100) * 4
    delta, zero = torch.tensor([0.1, 0.3, 0.05]).view(3, 1), torch.tensor([7.0, 8.0, 3.0]).view(3, 1)
    with torch.no_grad():
        fast = fake_quant(x, delta, zero, 0, 15)
    slow = fake_quant(x.requires_grad_(), delta, zero, 0, 15)
    assert torch.equal(fast, slow.detach())


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("dist", ["normal", "laplace", "outlier"])
def test_mse_init_never_worse_than_minmax(bits, dist):
    torch.manual_seed(bits)
    x = {"normal": torch.randn(6, 4096),
         "laplace": torch.distributions.Laplace(0.0, 1.0).sample((6, 4096)),
         "outlier": torch.cat([torch.randn(6, 4095), torch.full((6, 1), 40.0)], 1)}[dist]
    errs = {}
    for method in ("minmax", "mse"):
        q = UniformQuantizer(bits, channel_axis=0, num_channels=6)
        q.init_range(x, method)
        errs[method] = ((q(x) - x) ** 2).mean(1)
    assert (errs["mse"] <= errs["minmax"] + 1e-12).all()
    if dist == "outlier" and bits <= 4:
        assert errs["mse"].mean() < 0.5 * errs["minmax"].mean()  # clipping the outlier really pays


@pytest.mark.parametrize("bits", [1, 9, 0, 4.0])
def test_bits_out_of_range_are_rejected(bits):
    with pytest.raises(ValueError, match="bits must be an integer in 2..8"):
        UniformQuantizer(bits)


def test_search_range_rejects_unknown_method():
    with pytest.raises(ValueError, match="'minmax' or 'mse'"):
        search_range(torch.randn(1, 10), 4, False, "percentile")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, True)])
def test_mse_search_gives_the_same_ranges_however_many_candidates_share_a_pass(dtype, bits, symmetric, monkeypatch):
    """Candidates searched side by side pick exactly what one candidate at a time picks (the first of equal
    errors included: a coarse input with many ties), and MSE is never worse than min/max."""
    import qdistill.quantizers.uniform as uniform

    torch.manual_seed(0)
    smooth = torch.randn(24, 40) * torch.linspace(0.1, 3, 24)[:, None]
    coarse = torch.randint(-3, 4, (24, 40)).float()
    for x in (smooth.to(dtype), coarse.to(dtype)):
        results = []
        for chunk in (1, 7 * x.numel(), 10**9):  # one candidate a pass; 7 (80 is no multiple of 7); all 80
            monkeypatch.setattr(uniform, "SEARCH_CHUNK_ELEMENTS", chunk)
            results.append(search_range(x, bits, symmetric))
        for delta, zero in results[1:]:
            assert torch.equal(delta, results[0][0]) and torch.equal(zero, results[0][1])
        xf, (qmin, qmax) = x.double(), qrange(bits, symmetric)
        mse = (fake_quant(xf, results[0][0][:, None].double(), results[0][1][:, None].double(), qmin, qmax) - xf)
        minmax = search_range(x, bits, symmetric, "minmax")
        mm = (fake_quant(xf, minmax[0][:, None].double(), minmax[1][:, None].double(), qmin, qmax) - xf)
        assert (mse.pow(2).mean(1) <= mm.pow(2).mean(1) * (1 + 1e-6)).all()
