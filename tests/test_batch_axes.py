"""find_batch_axes: each observed tensor's batch axis and row order; per-group ranges that follow the samples
whatever the layout; a clear error where rows cannot be mapped to samples."""

import pytest
import torch
from torch import nn

import fxq
from fxq.quant import quantizer as Q
from fxq.backends import fake_ops
from fxq.backends.fake import FakeQuantize
from fxq.errors import ConfigError, InputError
from fxq.passes.batch_axes import FindBatchAxes
from fxq.passes.select_ops import SelectOps

LAYOUTS = ("batch_first", "seq_first", "head_major")


class Attention(nn.Module):
    """Self-attention over the H*W positions of an image, with its heads folded into the batch for torch.bmm.

    batch_first: tokens [B, L, C], heads folded b * heads + i (reshape(B * heads, ...));
    seq_first:   tokens [L, B, C] as nn.MultiheadAttention keeps them (its linears see [L, B, C]), heads
                 folded b * heads + i by reshape(L, B * heads, d).transpose(0, 1), as inside it;
    head_major:  tokens [B, L, C], heads folded i * B + b (rearrange "b l h d -> (h b) l d").
    The three compute the same numbers in different layouts.
    """

    def __init__(self, layout="batch_first", c=8, heads=2):
        super().__init__()
        self.layout, self.c, self.heads = layout, c, heads
        self.conv_in = nn.Conv2d(3, c, 1)
        self.temb = nn.Linear(2, c)  # 2 inputs: a one-term product stays float
        self.q, self.k, self.v, self.out = (nn.Linear(c, c) for _ in range(4))

    def _split(self, z, B, L, d):
        if self.layout == "seq_first":
            return z.reshape(L, B * self.heads, d).transpose(0, 1)
        z = z.reshape(B, L, self.heads, d)
        if self.layout == "head_major":
            return z.permute(2, 0, 1, 3).reshape(self.heads * B, L, d)
        return z.transpose(1, 2).reshape(B * self.heads, L, d)

    def _merge(self, o, B, L, d):
        if self.layout == "seq_first":
            return o.transpose(0, 1).reshape(L, B, self.c)
        if self.layout == "head_major":
            return o.reshape(self.heads, B, L, d).permute(1, 2, 0, 3).reshape(B, L, self.c)
        return o.reshape(B, self.heads, L, d).transpose(1, 2).reshape(B, L, self.c)

    def forward(self, x, t):
        B, _, H, W = x.shape
        L, d = H * W, self.c // self.heads
        h = self.conv_in(x) + self.temb(torch.stack([t.float() / 1000, t.float().sqrt() / 30], -1))[:, :, None, None]
        tokens = h.flatten(2).transpose(1, 2)
        if self.layout == "seq_first":
            tokens = tokens.transpose(0, 1)
        q, k, v = (self._split(f(tokens), B, L, d) for f in (self.q, self.k, self.v))
        a = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * d ** -0.5, -1)
        y = self.out(self._merge(torch.bmm(a, v), B, L, d))
        if self.layout == "seq_first":
            y = y.transpose(0, 1)
        return y.transpose(1, 2).reshape(B, self.c, H, W)


def _example(b=2):
    return torch.randn(b, 3, 4, 4), torch.tensor([10, 900, 400, 650][:b])


def _batch_meta(model, example):
    gm = fxq.trace(model, example)
    gm = SelectOps(fxq.QuantConfig())(gm).graph_module
    gm = FindBatchAxes((example, {}), "t")(gm).graph_module
    found = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("fxq")
        for pos in meta["act_inputs"] if meta else ():
            key = node.target if meta["kind"] != "attn_matmul" else f"{node.name}.{pos}"
            found[key] = node.args[pos].meta["fxq_batch"]
    return found


@pytest.mark.parametrize("layout", LAYOUTS)
def test_batch_axis_and_row_order_of_each_observed_tensor(layout):
    found = _batch_meta(Attention(layout).eval(), _example())
    token_axis = 1 if layout == "seq_first" else 0
    expected = {"conv_in": 0, "temb": 0, "q": token_axis, "k": token_axis, "v": token_axis, "out": token_axis,
                "bmm.0": 0, "bmm.1": 0, "bmm_1.0": 0, "bmm_1.1": 0}
    assert {k: v["axis"] for k, v in found.items()} == expected
    for key in ("bmm.0", "bmm.1", "bmm_1.0", "bmm_1.1"):  # heads folded into the batch: the row order matters
        assert found[key]["batch_major"] == (layout != "head_major"), found[key]["why"]


def _calibration(n=16, seed=0):
    """Mixed-timestep items whose scale depends strongly on the timestep group (of 4)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (n,), generator=g)
    x = torch.randn(n, 3, 4, 4, generator=g) * (1 + 4 * (t // 250)).float()[:, None, None, None]
    return [(x[i:i + 1], t[i:i + 1]) for i in range(n)]


def _quantizers(q):
    """FakeQuantize modules keyed by what they feed: (consumer, input position), matmuls by their order."""
    out, matmuls = {}, 0
    for node in q.graph.nodes:
        meta = node.meta.get("fxq")
        if not meta:
            continue
        name = node.target if meta["kind"] != "attn_matmul" else f"matmul{matmuls}"
        matmuls += meta["kind"] == "attn_matmul"
        for pos in meta["act_inputs"]:
            out[name, pos] = q.graph_module.get_submodule(node.args[pos].target)
    return out


def test_every_layout_gets_the_same_per_group_ranges_from_mixed_timestep_batches():
    cfg = fxq.QuantConfig(timestep_groups=4, act_estimator="minmax", first_last_bits=None)
    quantized = {}
    for layout in LAYOUTS:
        torch.manual_seed(0)  # the same weights in every layout
        model = Attention(layout).eval()
        quantized[layout] = _quantizers(fxq.quantize(model, _example(), _calibration(), cfg, batch_size=4))
    reference = quantized["batch_first"]
    for layout in LAYOUTS[1:]:
        assert quantized[layout].keys() == reference.keys()
        for key, fq in quantized[layout].items():
            ref = reference[key]
            assert fq.groups == 4
            # the group ranges differ a lot from each other (scale 1 + 4g), so a row in the wrong group shows
            assert torch.allclose(fq.scale, ref.scale, rtol=1e-5), (layout, key, fq.scale, ref.scale)
            assert (fq.zero_point - ref.zero_point).abs().max() <= 1, (layout, key)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_mixed_timestep_batch_gives_each_sample_its_own_groups_result(layout):
    torch.manual_seed(0)
    model = Attention(layout).eval()
    q = fxq.quantize(model, _example(), _calibration(), fxq.QuantConfig(timestep_groups=4), batch_size=4)
    x, t = _example(4)
    x = x * (1 + 4 * (t // 250)).float()[:, None, None, None]
    together = q(x, t)
    for i in range(4):
        alone = q(x[i:i + 1], t[i:i + 1])
        assert torch.allclose(together[i:i + 1], alone, atol=1e-5), (layout, i)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_exact_ops_give_each_row_its_groups_parameters(layout, monkeypatch):
    # fake_ops reads integer codes back from its fake-quantized inputs; a row given another group's parameters is
    # off that grid and silently takes the float op (not what int8 computes), so check every call found its codes
    torch.manual_seed(0)
    model = Attention(layout).eval()
    q = fxq.quantize(model, _example(), _calibration(), fxq.QuantConfig(timestep_groups=4), batch_size=4)
    assert {type(m) for m in q.modules() if isinstance(m, fake_ops._ExactBase)} >= {fake_ops.ExactLinear,
                                                                                     fake_ops.ExactMatmul}
    on_grid, missed = fake_ops._ExactBase._on_grid, []

    def spy(self, x, qp):
        codes = on_grid(self, x, qp)
        missed.extend([type(self).__name__] if codes is None else [])
        return codes

    monkeypatch.setattr(fake_ops._ExactBase, "_on_grid", spy)
    q(*_example(4))  # four samples in four groups
    assert not missed


class Pooled(nn.Module):
    """A linear on a batch mean: its one row belongs to no sample."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.mix = nn.Linear(4, 4)

    def forward(self, x, t):
        h = self.conv(x).mean((2, 3))
        return h + self.mix(h.mean(0, keepdim=True))


class RepeatedTimeEmbedding(nn.Module):
    """Two rows per sample computed from t alone: no float input reaches them, so their order is unknowable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.emb = nn.Linear(1, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, x, t):
        e = self.emb(t.float()[:, None]).repeat_interleave(2, 0)  # [2B, 4]
        return self.conv(x).mean((2, 3)) + self.mix(e).reshape(-1, 2, 4).sum(1)


@pytest.mark.parametrize("model, module", [(Pooled(), "mix"), (RepeatedTimeEmbedding(), "mix")])
def test_rows_that_cannot_be_mapped_to_samples_are_refused_at_quantize_time(model, module):
    calib = _calibration(4)
    with pytest.raises(ConfigError, match=rf"(?s)`{module}`.*keep_float=\['{module}'\].*timestep_groups=1"):
        fxq.quantize(model, _example(), calib, fxq.QuantConfig(timestep_groups=4))
    fxq.quantize(model, _example(), calib, fxq.QuantConfig(timestep_groups=4, keep_float=(module,)))
    fxq.quantize(model, _example(), calib, fxq.QuantConfig(timestep_groups=1))


def test_a_timestep_given_once_per_call_is_every_samples_timestep():
    # fxq.quantize normalizes a 0-d t to one entry per sample, so the time embedding has a batch axis too
    model = fxq.models.DDPMUNet(ch=32, ch_mult=(1,), attn_resolutions=(), num_res_blocks=1, resolution=8)
    x = torch.randn(2, 3, 8, 8)
    calib = [(torch.randn(2, 3, 8, 8), torch.tensor(t)) for t in (10, 300, 600, 900)]
    q = fxq.quantize(model, (x, torch.tensor(500)), calib, fxq.QuantConfig(timestep_groups=4))
    assert all(m.batch_axis == 0 for m in q.modules() if isinstance(m, FakeQuantize))
    assert torch.equal(q(x, torch.tensor(900)), q(x, torch.tensor([900, 900])))
    mixed = q(x, torch.tensor([10, 900]))
    assert torch.equal(mixed[:1], q(x[:1], 10)) and torch.equal(mixed[1:], q(x[1:], 900))


def test_a_tensor_without_batch_axis_takes_the_batchs_one_group_or_refuses_a_mixed_batch():
    qp = Q.QParams(torch.tensor([0.1, 1.0]), torch.tensor([0.0, 3.0]), 8, False, None, None)
    fq = FakeQuantize(qp)
    x = torch.full((3, 2), 0.26)
    assert torch.equal(fq(x, torch.tensor([1, 1])), Q.fake_quantize(x, Q.QParams(qp.scale[1], qp.zero_point[1], 8,
                                                                                 False)))
    with pytest.raises(InputError, match="different timestep groups"):
        fq(x, torch.tensor([0, 1]))


def test_rows_group_orders():
    g = torch.tensor([0, 2, 1])
    assert Q.rows_group(g, 6, batch_major=True).tolist() == [0, 0, 2, 2, 1, 1]
    assert Q.rows_group(g, 6, batch_major=False).tolist() == [0, 2, 1, 0, 2, 1]


def test_an_older_files_grouped_exact_op_is_refused_and_an_ungrouped_one_loads():
    # before batch axes the exact ops read t (num_timesteps in their spec); now they read the timestep-group node
    old = {"act_bits": 8, "timestep_groups": 2, "num_timesteps": 1000}
    with pytest.raises(InputError, match="quantize the model again"):
        fake_ops.ExactMatmul.from_fxq_spec(old)
    assert fake_ops.ExactMatmul.from_fxq_spec({**old, "timestep_groups": 1}).batch_axes == [[0, True], [0, True]]
    spec = fake_ops.ExactMatmul(8, 2, [[1, True], [None, False]]).fxq_spec()
    assert fake_ops.ExactMatmul.from_fxq_spec(spec).batch_axes == [[1, True], [None, False]]
    with pytest.raises(InputError, match="batch_axes"):
        fake_ops.ExactMatmul(8, 2, [[1.5, True]])
