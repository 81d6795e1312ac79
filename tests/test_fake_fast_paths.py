"""The fake backend's fast paths compute what its plain exact path computes, bit for bit.

- Wide sums: where a float32 sum of integer products could pass 2^24 (and round), the exact ops sum slices of the
  reduction axis in float32 (`S.exact_chunks`) instead of the whole in float64; the result must be the float64
  path's, which is the int8 kernel's.
"""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxq.backends import fake_ops
from fxq.quant import quantizer as Q
from fxq.quant import int_sums as S


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
    chunks = S.exact_chunks(sums, max_code, "cpu")
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
    assert torch.equal(S.exact_sum([i.float() for i in ints]), total.float())  # int64 -> float32: one rounding


# --- codes handed over by the quantizer ------------------------------------------------------------------------------
# A FakeQuantize output carries a tag (fake_ops.Codes); an exact op fed that very tensor, unchanged, with its own
# parameters equal to the quantizer's, takes the codes from the tag instead of reading them back and checking that
# the input is on its grid. The law: the op's result never depends on the tag, so op(t) == op(t.clone()) (a clone
# carries no tag: the checked path) for any input, from its quantizer or not.

def _qparams(g, groups, axis=0):
    shape = (groups,) if groups > 1 else ()
    scale = torch.rand(shape, generator=g) * 0.05 + 0.01
    zp = torch.randint(0, 256, shape, generator=g).float()
    return Q.QParams(scale, zp, 8, False, None, axis, True)


def _conv_pair(g, groups, same_params):
    """(FakeQuantize, exact conv) whose input parameters are the quantizer's or other ones."""
    from fxq.backends.fake import FakeQuantize
    conv = nn.Conv2d(4, 5, 3, padding=1)
    wqp = Q.symmetric_qparams(conv.weight.detach().abs().flatten(1).amax(1), 8, 0)
    xqp = _qparams(g, groups)
    fq = FakeQuantize(xqp if same_params else _qparams(g, groups))
    module = fake_ops._ExactConv.from_float(conv, nn.Parameter(Q.fake_quantize(conv.weight.detach(), wqp)), wqp, xqp)
    return fq, module


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.sampled_from([1, 3]), same_params=st.booleans(),
       change=st.sampled_from(["none", "in_place", "same_groups_new_tensor", "other_groups"]))
def test_exact_conv_result_does_not_depend_on_the_quantizers_tag(seed, groups, same_params, change):
    g = torch.Generator().manual_seed(seed)
    fq, module = _conv_pair(g, groups, same_params)
    group = torch.randint(0, groups, (2,), generator=g)
    for call in range(2):  # the first call reads the codes back; from the second on the quantizer keeps them
        x_hat = fq(torch.randn(2, 4, 6, 6, generator=g) * 4, group)
        assert isinstance(x_hat.fxq_codes, fake_ops.Codes)
        if change == "in_place":
            x_hat.mul_(1.001)  # off the grid now: the float conv, as for the clone
        other = {"same_groups_new_tensor": group.clone(), "other_groups": (group + 1) % groups}.get(change, group)
        assert torch.equal(module(x_hat, other), module(x_hat.clone(), other))
    served = same_params and change == "none"
    assert fq.keep_codes == served  # the op asked for codes exactly where the tag served


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.sampled_from([1, 2]), same_a=st.booleans(), same_b=st.booleans())
def test_exact_matmul_result_does_not_depend_on_the_quantizers_tags(seed, groups, same_a, same_b):
    from fxq.backends.fake import FakeQuantize
    g = torch.Generator().manual_seed(seed)
    aqp, bqp = _qparams(g, groups), _qparams(g, groups)
    fa = FakeQuantize(aqp if same_a else _qparams(g, groups))
    fb = FakeQuantize(bqp if same_b else _qparams(g, groups))
    module = fake_ops.ExactMatmul.from_qparams(aqp, bqp)
    group = torch.randint(0, groups, (3,), generator=g)
    for _ in range(2):
        a = fa(torch.randn(3, 4, 7, generator=g) * 3, group)
        b = fb(torch.randn(3, 7, 5, generator=g) * 3, group)
        assert torch.equal(module(a, b, group), module(a.clone(), b.clone(), group))
    assert (fa.keep_codes, fb.keep_codes) == (same_a, same_b)


def test_the_kept_codes_are_the_read_back_codes_of_the_output():
    g = torch.Generator().manual_seed(0)
    fq, _ = _conv_pair(g, 3, True)
    fq.keep_codes = True
    group = torch.tensor([2, 0])
    x_hat = fq(torch.randn(2, 4, 6, 6, generator=g) * 4, group)
    tag = x_hat.fxq_codes
    assert torch.equal(tag.codes, S.centered_codes(x_hat, tag.qp)) and torch.equal(tag.codes * tag.qp.scale, x_hat)
    assert torch.equal(x_hat, Q.fake_quantize(x_hat.clone(), tag.qp))  # and the output is what it was


def test_a_quantized_model_gives_the_same_output_with_and_without_tags(monkeypatch):
    import fxq
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 36, 4)).eval()
    calib = [(torch.randn(2, 3, 6, 6),) for _ in range(2)]
    q = fxq.quantize(model, calib[0], calib, fxq.QuantConfig(timestep_arg=None))
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        first, second = q(x), q(x)  # read back, then the kept codes
        quantizers = [m for m in q.modules() if type(m).__name__ == "FakeQuantize"]
        assert quantizers and all(m.keep_codes for m in quantizers)
        monkeypatch.setattr(fake_ops.Codes, "serves", lambda self, *a: False)
        checked = q(x)
    assert torch.equal(first, checked) and torch.equal(second, checked)
