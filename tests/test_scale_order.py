"""The simulation scales an int8 op's integer sum in the order this CPU's oneDNN kernels do: a process default
probed once, and each exact conv/linear's own kernel probed per input shape (oneDNN picks kernels by shape)."""

import copy
import pickle

import pytest
import torch
from torch import nn

import fxq
from fxq.backends import fake_ops, x86_ops
from fxq.errors import FxqWarning
from fxq.quant import quantizer as Q
from fxq.quant import int_sums as S
from tests.int8 import skip_without_int8


def _exact(x, zp, w):
    return ((x.double() - zp) @ w.double().t()).float()


def _product_kernel(x, xs, zp, w, ws):  # AMX brgemm kernels (Intel Xeon, measured)
    return _exact(x, zp, w) * (torch.tensor(xs, dtype=torch.float32) * ws)


def _sequential_kernel(x, xs, zp, w, ws):  # AVX512-VNNI kernels (AMD Zen 4, measured)
    return (_exact(x, zp, w) * xs) * ws


def test_probe_tells_the_orders_apart():
    assert S.probe_scale_order(_product_kernel) == "product"
    assert S.probe_scale_order(_sequential_kernel) == "sequential"


def test_probe_warns_when_no_order_matches():
    def rounded_once(x, xs, zp, w, ws):
        return ((x.double() - zp) @ w.double().t() * xs * ws.double()).float()

    with pytest.warns(FxqWarning, match="no known order"):
        assert S.probe_scale_order(rounded_once) == "sequential"


def _exact_linear(seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(96, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 96, generator=gen) * 0.1)
        linear.bias.copy_(torch.randn(48, generator=gen))
    wqp = Q.symmetric_qparams(linear.weight.detach().abs().amax(1), 8, axis=0)
    xqp = Q.QParams(torch.tensor(0.0213), torch.tensor(121.0), 8, False, None)
    module = fake_ops.ExactLinear.from_float(linear, nn.Parameter(Q.fake_quantize(linear.weight.detach(), wqp)),
                                             wqp, xqp)
    return module, wqp, xqp


def _emulated_kernel(monkeypatch, pick):
    """QLinear computing its output in the order pick(rows) (None: rounded once, in no known order)."""
    def forward(self, x, g=None, other=None):
        d = self.derived()
        xs, xz = d["x"][0]
        acc = (x.double() - xz) @ self._codes().double().t()
        order = pick(x.shape[0])
        if order is None:
            return (acc * xs * self.w_scale.double() + self.bias.double()).float()
        return S.scale_accumulator(acc, torch.tensor(xs), self.w_scale, order) + self.bias
    monkeypatch.setattr(x86_ops.QLinear, "forward", forward)


def test_exact_linear_follows_its_kernels_order_per_input_shape(monkeypatch):
    # as on an AMX host: a one-row linear takes a kernel of the other order than a batch
    default = S.kernel_scale_order()
    other = next(o for o in S.SCALE_ORDERS if o != default)
    _emulated_kernel(monkeypatch, lambda rows: other if rows == 1 else default)
    module, wqp, xqp = _exact_linear()
    gen = torch.Generator().manual_seed(3)
    for rows, order in ((1, other), (64, default), (1, other)):
        x = Q.fake_quantize(torch.randn(rows, 96, generator=gen) * 2, xqp)
        acc = S.centered_codes(x, xqp).double() @ S.centered_codes(module.weight.detach(), wqp).double().t()
        want = S.scale_accumulator(acc, xqp.scale, module.w_scale, order) + module.bias.detach()
        assert torch.equal(module(x), want)
        wrong = S.scale_accumulator(acc, xqp.scale, module.w_scale, default if order == other else other)
        assert not torch.equal(want, wrong + module.bias.detach())  # the data tells the orders apart
    assert set(module._orders) == {(1, 96), (64, 96)}  # probed once per shape


def test_exact_linear_warns_when_its_kernel_fits_no_order(monkeypatch):
    _emulated_kernel(monkeypatch, lambda rows: None)
    module, _, xqp = _exact_linear()
    x = Q.fake_quantize(torch.randn(8, 96), xqp)
    with pytest.warns(FxqWarning, match="ExactLinear at input shape"):
        module(x)


def test_exact_ops_above_8_bits_keep_the_default_order():
    module, _, xqp = _exact_linear()
    module.act_bits = 16  # no int8 kernel serves it: nothing to probe
    module(Q.fake_quantize(torch.randn(4, 96), xqp))
    assert module._orders == {(4, 96): None}


def test_probe_without_int8_kernels_keeps_the_default():
    def missing(*args):
        raise RuntimeError("no oneDNN int8 here")

    assert S.probe_scale_order(missing) == "sequential"


def test_this_cpus_kernel_is_reproduced():
    # the real oneDNN int8 linear on this CPU, through the probe's own data: one of the orders must match
    assert S.kernel_scale_order() in S.SCALE_ORDERS


@pytest.mark.parametrize("order", S.SCALE_ORDERS)
def test_scale_accumulator_follows_the_order(monkeypatch, order):
    monkeypatch.setattr(S, "_scale_order", order)
    gen = torch.Generator().manual_seed(1)
    acc = torch.randint(-2 ** 20, 2 ** 20, (256, 32), generator=gen).float()
    xs, ws = torch.tensor(0.0137), torch.rand(32, generator=gen) * 0.01 + 1e-4
    want = acc * (xs * ws) if order == "product" else (acc * xs) * ws
    assert torch.equal(S.scale_accumulator(acc, xs, ws), want)
    other = (acc * xs) * ws if order == "product" else acc * (xs * ws)
    assert not torch.equal(want, other)  # the data tells the orders apart


def _few_row_kernel_of_the_other_order(monkeypatch):
    """oneDNN's int8 linear as on an AMX host, where a call of few rows takes a kernel of the other order: here up
    to 4 rows (QLinear runs 1-3 rows padded to 4, so those are the calls a kernel of few rows would get)."""
    other = next(o for o in S.SCALE_ORDERS if o != S.kernel_scale_order())
    real = torch.ops.onednn.qlinear_pointwise

    def kernel(x, xs, xz, packed, w_scale, w_zp, bias, os_, oz, odt, attr, scalars, algo):
        y = real(x, xs, xz, packed, w_scale, w_zp, bias, os_, oz, odt, attr, scalars, algo)
        if x.numel() // x.shape[-1] <= 4:
            acc = (x.reshape(-1, x.shape[-1]).double() - xz) @ packed.to_dense().t().double().t()
            y = (S.scale_accumulator(acc, torch.tensor(xs), w_scale, other) + bias).reshape(y.shape)
        return y
    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", kernel)


def test_a_mixed_timestep_batch_follows_each_groups_kernel(monkeypatch):
    # the int8 linear runs a batch mixing groups once per group, on that group's rows: here one row each, which
    # takes the other kernel; the fake must scale each row as its group's call does
    _few_row_kernel_of_the_other_order(monkeypatch)
    torch.manual_seed(0)
    linear = nn.Linear(96, 48)
    wqp = Q.symmetric_qparams(linear.weight.detach().abs().amax(1), 8, axis=0)
    xqp = Q.QParams(torch.tensor([0.0213, 0.0371]), torch.tensor([121.0, 98.0]), 8, False, None)
    fake = fake_ops.ExactLinear.from_float(linear, nn.Parameter(Q.fake_quantize(linear.weight.detach(), wqp)),
                                           wqp, xqp)
    int8 = x86_ops.QLinear.from_float(linear, wqp, xqp)
    for g in (torch.tensor([0, 1]), torch.tensor([1, 0, 1])):
        x = torch.randn(len(g), 96) * 2
        qp = Q.select_group(xqp, g, x)
        y8 = int8(Q.codes(x, qp).to(torch.uint8), g)
        assert torch.equal(fake(Q.fake_quantize(x, qp), g), y8)


def test_convs_with_string_padding_probe_their_kernel():
    torch.manual_seed(0)
    for padding in ("same", "valid", 1):
        conv = nn.Conv2d(8, 4, 3, padding=padding)
        wqp = Q.symmetric_qparams(conv.weight.detach().abs().flatten(1).amax(1), 8, axis=0)
        xqp = Q.QParams(torch.tensor(0.02), torch.tensor(100.0), 8, False, None)
        module = fake_ops._ExactConv.from_float(conv, nn.Parameter(Q.fake_quantize(conv.weight.detach(), wqp)),
                                                wqp, xqp)
        module(Q.fake_quantize(torch.randn(2, 8, 6, 6), xqp))
        assert list(module._orders.values()) == [S.kernel_scale_order()], padding  # probed, not the default None


def test_probe_draws_again_when_its_data_fits_both_orders(monkeypatch):
    # a one-output linear: on one random draw both orders often give the same float32; the probe must not take
    # the first order on such a draw
    _few_row_kernel_of_the_other_order(monkeypatch)
    other = next(o for o in S.SCALE_ORDERS if o != S.kernel_scale_order())
    for seed in range(20):
        torch.manual_seed(seed)
        linear = nn.Linear(16, 1)
        wqp = Q.symmetric_qparams(linear.weight.detach().abs().amax(1), 8, axis=0)
        xqp = Q.QParams(torch.tensor(0.05), torch.tensor(110.0), 8, False, None)
        module = fake_ops.ExactLinear.from_float(linear, nn.Parameter(Q.fake_quantize(linear.weight.detach(), wqp)),
                                                 wqp, xqp)
        assert module._kernel_order((1, 16), -1) in (other, None), seed


def test_copies_probe_again_on_their_own_cpu():
    module, _, xqp = _exact_linear()
    module(Q.fake_quantize(torch.randn(4, 96), xqp))
    assert module._orders
    assert copy.deepcopy(module)._orders == {} and pickle.loads(pickle.dumps(module))._orders == {}


def test_the_order_of_an_op_with_one_output_is_told_apart_not_defaulted():
    # the two orders agree on most values: with one output per try, eight tries often cannot tell them apart,
    # and the process default (another kernel's order on AMX hosts) stood in for this kernel's
    from fxq.backends import fake_ops
    skip_without_int8()
    undecided = []
    for seed in range(24):
        torch.manual_seed(seed)
        calib = [(torch.randn(1, 6),) for _ in range(2)]
        q = fxq.quantize(nn.Linear(6, 1).eval(), calib[0], calib, fxq.QuantConfig(timestep_arg=None))
        exact = next(m for m in q.modules() if isinstance(m, fake_ops.ExactLinear))
        if exact._kernel_order((1, 6), -1) is None:
            undecided.append(seed)
    assert not undecided
