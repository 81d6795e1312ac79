"""The fake backend's fast paths compute what its plain exact path computes, bit for bit.

- Wide sums: where a float32 sum of integer products could pass 2^24 (and round), the exact ops sum slices of the
  reduction axis in float32 (`Q.exact_chunks`) instead of the whole in float64; the result must be the float64
  path's, which is the int8 kernel's.
"""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxq.backends import fake_ops
from fxq.quant import quantizer as Q


def _large_sum_weight(shape, g):
    # all-positive codes near the top of the range against all-positive inputs: the true sums pass 2^24
    return torch.randint(90, 128, shape, generator=g).float()


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), cin=st.integers(100, 160), k=st.sampled_from([1, 3]), bias=st.booleans())
def test_conv_sliced_float32_sums_equal_float64_sums(seed, cin, k, bias):
    g = torch.Generator().manual_seed(seed)
    if k == 1:
        cin *= 9  # as many terms per output as a 3x3 kernel
    conv = nn.Conv2d(cin, 3, k, padding=k // 2, bias=bias)
    wqp = Q.QParams(torch.rand(3, generator=g) * 0.01 + 1e-3, torch.zeros(3), 8, True, 0)
    w_hat = nn.Parameter(_large_sum_weight(conv.weight.shape, g) * wqp.scale.reshape(-1, 1, 1, 1))
    xqp = Q.QParams(torch.tensor(0.05), torch.tensor(0.0), 8, False)
    x_hat = torch.randint(200, 256, (2, cin, 5, 5), generator=g).float() * xqp.scale
    module = fake_ops._ExactConv.from_float(conv, w_hat, wqp, xqp)
    assert module._weight_codes()[1] == torch.float64 and module._chunks is not None  # the sliced path
    sliced = module(x_hat)
    module._chunks = None  # the whole sum in float64
    assert torch.equal(sliced, module(x_hat))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(800, 2000), lead=st.sampled_from([(4,), (2, 3)]))
def test_linear_sliced_float32_sums_equal_float64_sums(seed, n, lead):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(n, 4)
    wqp = Q.QParams(torch.rand(4, generator=g) * 0.01 + 1e-3, torch.zeros(4), 8, True, 0)
    w_hat = nn.Parameter(_large_sum_weight(linear.weight.shape, g) * wqp.scale.reshape(-1, 1))
    xqp = Q.QParams(torch.tensor(0.1), torch.tensor(0.0), 8, False)
    x_hat = torch.randint(200, 256, (*lead, n), generator=g).float() * xqp.scale
    module = fake_ops.ExactLinear.from_float(linear, w_hat, wqp, xqp)
    assert module._weight_codes()[1] == torch.float64 and module._chunks is not None
    sliced = module(x_hat)
    module._chunks = None
    assert torch.equal(sliced, module(x_hat))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), outs=st.integers(1, 5), n=st.integers(1, 300), top=st.integers(1, 2 ** 17),
       max_code=st.integers(1, 255))
def test_exact_chunks_cover_the_axis_in_slices_below_2_to_24(seed, outs, n, top, max_code):
    g = torch.Generator().manual_seed(seed)
    sums = torch.randint(0, top + 1, (outs, n), generator=g)
    chunks = Q.exact_chunks(sums, max_code, "cpu")
    whole = float(sums.double().sum(1).max()) * max_code
    if chunks is None:  # float32 is exact already, or one column alone can reach 2^24
        assert whole < 2 ** 24 or float(sums.max()) * max_code >= 2 ** 24
        return
    assert whole >= 2 ** 24 and chunks[0][0] == 0 and chunks[-1][1] == n
    assert all(a < b for a, b in chunks) and all(b == a2 for (_, b), (a2, _) in zip(chunks, chunks[1:]))
    assert all(float(sums[:, a:b].double().sum(1).max()) * max_code < 2 ** 24 for a, b in chunks)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), parts=st.integers(1, 5))
def test_exact_sum_is_the_exact_integer_sum_rounded_once(seed, parts):
    g = torch.Generator().manual_seed(seed)
    ints = [torch.randint(-(2 ** 24) + 1, 2 ** 24, (64,), generator=g, dtype=torch.int64) for _ in range(parts)]
    total = torch.stack(ints).sum(0)
    assert torch.equal(Q.exact_sum([i.float() for i in ints]), total.float())  # int64 -> float32: one rounding
