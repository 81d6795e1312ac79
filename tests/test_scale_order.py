"""The simulation scales an int8 op's integer sum in the order this CPU's oneDNN kernels do (probed once)."""

import pytest
import torch

from fxq.errors import FxqWarning
from fxq.quant import quantizer as Q


def _exact(x, zp, w):
    return ((x.double() - zp) @ w.double().t()).float()


def _product_kernel(x, xs, zp, w, ws):  # AMX brgemm kernels (Intel Xeon, measured)
    return _exact(x, zp, w) * (torch.tensor(xs, dtype=torch.float32) * ws)


def _sequential_kernel(x, xs, zp, w, ws):  # AVX512-VNNI kernels (AMD Zen 4, measured)
    return (_exact(x, zp, w) * xs) * ws


def test_probe_tells_the_orders_apart():
    assert Q.probe_scale_order(_product_kernel) == "product"
    assert Q.probe_scale_order(_sequential_kernel) == "sequential"


def test_probe_warns_when_no_order_matches():
    def rounded_once(x, xs, zp, w, ws):
        return ((x.double() - zp) @ w.double().t() * xs * ws.double()).float()

    with pytest.warns(FxqWarning, match="no one known order"):
        assert Q.probe_scale_order(rounded_once) == "sequential"


def test_probe_warns_when_the_order_depends_on_the_shape():
    def by_rows(x, xs, zp, w, ws):  # one order for a single row, the other for batches
        return (_product_kernel if x.shape[0] == 1 else _sequential_kernel)(x, xs, zp, w, ws)

    with pytest.warns(FxqWarning, match="every shape"):
        assert Q.probe_scale_order(by_rows) == "sequential"


def test_probe_without_int8_kernels_keeps_the_default():
    def missing(*args):
        raise RuntimeError("no oneDNN int8 here")

    assert Q.probe_scale_order(missing) == "sequential"


def test_this_cpus_kernel_is_reproduced():
    # the real oneDNN int8 linear on this CPU, through the probe's own data: one of the orders must match
    assert Q.kernel_scale_order() in Q.SCALE_ORDERS


@pytest.mark.parametrize("order", Q.SCALE_ORDERS)
def test_scale_accumulator_follows_the_order(monkeypatch, order):
    monkeypatch.setattr(Q, "_scale_order", order)
    gen = torch.Generator().manual_seed(1)
    acc = torch.randint(-2 ** 20, 2 ** 20, (256, 32), generator=gen).float()
    xs, ws = torch.tensor(0.0137), torch.rand(32, generator=gen) * 0.01 + 1e-4
    want = acc * (xs * ws) if order == "product" else (acc * xs) * ws
    assert torch.equal(Q.scale_accumulator(acc, xs, ws), want)
    other = (acc * xs) * ws if order == "product" else acc * (xs * ws)
    assert not torch.equal(want, other)  # the data tells the orders apart
