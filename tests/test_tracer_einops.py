"""fxq.trace on einops: its layers and functions trace, match eager at any batch size, and quantize end to end.

einops looks up recipes by rank in a dict and memoizes shape plans with functools.lru_cache, so these tests
exercise the tracer's handling of hashed traced values (dict keys resolved and guarded, cache keys bypassed).
"""

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fxq
from fxq import report
from fxq.tracing.tracer import trace

einops = pytest.importorskip("einops")
from einops import rearrange, reduce, repeat  # noqa: E402
from einops.layers.torch import Rearrange, Reduce  # noqa: E402


@dataclass
class Case:
    op: str  # "rearrange" | "reduce" | "repeat"
    pattern: str
    shape: tuple  # input shape after the batch axis
    lengths: dict  # named axis sizes passed to einops
    traced_lengths: list = field(default_factory=list)  # (name, input dim, inner size): name = x.shape[dim] // inner
    reduction: str | None = None
    layer: bool = False


def _group_text(groups) -> str:
    return " ".join(g[0] if len(g) == 1 else "(" + " ".join(g) + ")" for g in groups)


@st.composite
def einops_cases(draw) -> Case:
    """A pattern over `b` plus 1-3 axes, each kept or split in two `(x0 x1)` with x0 named; then a permutation of
    the (kept, or reduced, or repeated-into) elementary axes, cut into merged output groups."""
    inputs, sizes, lengths, traced = [["b"]], {}, {}, []
    for i, name in enumerate("cde"[:draw(st.integers(1, 3))]):
        if draw(st.booleans()):
            outer, inner = name + "0", name + "1"
            sizes[outer], sizes[inner] = draw(st.integers(1, 3)), draw(st.integers(1, 3))
            lengths[outer] = sizes[outer]
            if draw(st.booleans()):  # the size comes from the input's shape, as a traced value
                traced.append((outer, i + 1, sizes[inner]))
            inputs.append([outer, inner])
        else:
            sizes[name] = draw(st.integers(1, 4))
            inputs.append([name])
    elementary = [a for g in inputs for a in g]
    op = draw(st.sampled_from(["rearrange", "reduce", "repeat"]))
    kept, reduction = elementary, None
    if op == "reduce":
        dropped = draw(st.sets(st.sampled_from(elementary[1:]), min_size=1))
        kept = [a for a in elementary if a not in dropped]
        reduction = draw(st.sampled_from(["mean", "sum", "max", "min"]))
    elif op == "repeat":
        new = [f"r{i}" for i in range(draw(st.integers(1, 2)))]
        lengths.update({r: draw(st.integers(1, 3)) for r in new})
        kept = elementary + new
    order = draw(st.permutations(kept))
    cuts = draw(st.lists(st.booleans(), min_size=len(order) - 1, max_size=len(order) - 1))
    outputs = [[order[0]]]
    for axis, cut in zip(order[1:], cuts):
        outputs.append([axis]) if cut else outputs[-1].append(axis)
    layer = not traced and draw(st.booleans())
    return Case(op, f"{_group_text(inputs)} -> {_group_text(outputs)}",
                tuple(math.prod(sizes[a] for a in g) for g in inputs[1:]), lengths, traced, reduction, layer)


class EinopsOp(nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        self.case = case
        if case.layer:
            self.layer = (Rearrange(case.pattern, **case.lengths) if case.op == "rearrange"
                          else Reduce(case.pattern, case.reduction or "repeat", **case.lengths))

    def forward(self, x):
        c = self.case
        if c.layer:
            return self.layer(x)
        lengths = dict(c.lengths)
        for name, dim, inner in c.traced_lengths:
            lengths[name] = x.shape[dim] // inner
        if c.op == "rearrange":
            return rearrange(x, c.pattern, **lengths)
        if c.op == "reduce":
            return reduce(x, c.pattern, c.reduction, **lengths)
        return repeat(x, c.pattern, **lengths)


@settings(max_examples=40, deadline=None)
@given(case=einops_cases(), other_batch=st.sampled_from([1, 3, 5]), seed=st.integers(0, 2**16))
def test_random_einops_ops_trace_and_match_eager_at_another_batch(case, other_batch, seed):
    model = EinopsOp(case)
    g = torch.Generator().manual_seed(seed)
    gm = trace(model, torch.randn(2, *case.shape, generator=g))
    for batch in (2, other_batch):
        x = torch.randn(batch, *case.shape, generator=g)
        out = gm(x)
        assert torch.equal(out, model(x)), case


# ------------------------------------------------------------------------------- a UNet block in einops


class EinopsAttention(nn.Module):
    def __init__(self, c: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(4, c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x):
        _, c, h, _ = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three heads d) h w -> three b heads (h w) d",
                            three=3, heads=self.heads)
        weights = torch.einsum("bhid,bhjd->bhij", q, k) * (c // self.heads) ** -0.5
        out = torch.einsum("bhij,bhjd->bhid", weights.softmax(-1), v)
        return x + self.proj(rearrange(out, "b heads (h w) d -> b (heads d) h w", h=h))


class EinopsUNet(nn.Module):
    """Pixel-(un)shuffle resampling with Rearrange layers, global pooling with Reduce, the time embedding
    broadcast with repeat, attention written with rearrange and einsum."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.c = c
        self.inp = nn.Conv2d(3, c, 3, padding=1)
        self.time = nn.Sequential(nn.Linear(c, c), nn.SiLU())
        self.down = nn.Sequential(Rearrange("b c (h p1) (w p2) -> b (c p1 p2) h w", p1=2, p2=2),
                                  nn.Conv2d(4 * c, 2 * c, 1))
        self.attn = EinopsAttention(2 * c)
        self.pool = Reduce("b c h w -> b c", "mean")
        self.up = nn.Sequential(nn.Conv2d(2 * c, 4 * c, 1), Rearrange("b (c p1 p2) h w -> b c (h p1) (w p2)", p1=2, p2=2))
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x, t):
        freqs = torch.exp(-torch.arange(self.c // 2, device=x.device) / (self.c // 2))
        args = t[:, None].float() * freqs[None] / 100
        emb = self.time(torch.cat([args.sin(), args.cos()], dim=-1))
        h0 = self.inp(x) + repeat(emb, "b c -> b c h w", h=x.shape[2], w=x.shape[3])
        h = self.attn(self.down(h0))
        h = h + rearrange(self.pool(h), "b c -> b c 1 1")
        return self.out(self.up(h) + h0)


def _inputs(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, 8, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def test_einops_unet_quantizes_end_to_end():
    torch.manual_seed(0)
    model = EinopsUNet().eval()
    calib = [_inputs(2, s) for s in range(4)]
    q = fxq.quantize(model, calib[0], calib, fxq.QuantConfig())
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert report.quantized_ops(q) == {"conv": convs, "linear": 1, "attn_matmul": 2}
    x, t = _inputs(3, 9)  # another batch size than the example's
    with torch.no_grad():
        assert report.sqnr_db(model(x, t), q(x, t)) > 20
