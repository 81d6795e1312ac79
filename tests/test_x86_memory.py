"""x86 int8 backend, what the model holds: each weight once (oneDNN's pack, the int8 codes unpacked on demand for
state_dict / save / copies), nothing imported on the first call; and the memory planning (float glue in place,
quantize early) keeps every bit and every layout."""

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxq
from fxq.backends import x86_glue, x86_memplan, x86_ops
from fxq.errors import InputError
from tests.int8 import needs_int8

pytestmark = needs_int8

X86 = dict(backend="x86", timestep_arg=None)


class _Packs(nn.Module):
    """Every kind of packed weight: conv2d, grouped conv2d, transposed conv (a conv of its sub-kernels), conv1d
    (packed with a unit height), linear."""

    def __init__(self):
        super().__init__()
        self.c, self.g = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.t = nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)
        self.c1, self.lin = nn.Conv1d(4, 6, 3), nn.Linear(10, 5)

    def forward(self, x):
        h = self.t(F.relu(self.g(self.c(x))))
        return self.lin(self.c1(h.mean(-1)))


def _weighted(qmodel):
    return [m for m in qmodel.modules() if isinstance(m, x86_ops._WeightedInt8)]


def _fake_and_int8(model_cls, batches: int = 2, size: int = 6):
    """model_cls() quantized to fake-quant and to int8 from one calibration set, and an input (seed 0)."""
    torch.manual_seed(0)
    model = model_cls().eval()
    calib = [(torch.randn(2, 4, size, size),) for _ in range(batches)]
    fake = fxq.quantize(model, calib[0], calib, fxq.QuantConfig(**{**X86, "backend": "fake"}))
    return fake, fxq.quantize(model, calib[0], calib, fxq.QuantConfig(**X86)), torch.randn(2, 4, size, size)


@pytest.fixture(scope="module")
def packs():
    return _fake_and_int8(_Packs)


def _called(int8, x):
    """A copy of the (not yet called) int8 model, called once: its weights are packed."""
    fresh = copy.deepcopy(int8)
    fresh(x)
    return fresh


def test_each_weight_is_held_once_and_comes_back_as_int8_codes(packs):
    fake, int8, x = packs
    before = {k: v.clone() for k, v in int8.state_dict().items()}
    called = _called(int8, x)
    assert len(_weighted(called)) == 5
    for m in _weighted(called):
        assert "weight" not in dict(m.named_buffers(recurse=False))  # the pack alone holds it
        assert m.weight.dtype == torch.int8
    after = called.state_dict()
    assert list(after) == list(before)  # same names, same order
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(called(x), fake(x))


def test_save_and_load_after_a_call_give_the_same_file_and_outputs(packs, tmp_path):
    fake, int8, x = packs
    called = copy.deepcopy(int8)
    fxq.save(called, tmp_path / "before.fxq")
    called(x)
    fxq.save(called, tmp_path / "after.fxq")
    assert (tmp_path / "before.fxq").read_bytes() == (tmp_path / "after.fxq").read_bytes()
    loaded = fxq.load(tmp_path / "after.fxq")
    assert torch.equal(loaded(x), fake(x)) and torch.equal(called(x), fake(x))


def test_copies_moves_and_reloads_after_a_call_keep_the_weights(packs):
    fake, int8, x = packs
    state = {k: v.clone() for k, v in int8.state_dict().items()}
    expected = fake(x)
    called = _called(int8, x)
    assert torch.equal(copy.deepcopy(called)(x), expected)
    moved = _called(int8, x).to(torch.float32)  # derived state dropped: the plain weights come back first
    assert all("weight" in dict(m.named_buffers(recurse=False)) for m in _weighted(moved))
    assert torch.equal(moved(x), expected)
    reloaded = _called(int8, x)
    reloaded.load_state_dict(state)
    assert torch.equal(reloaded(x), expected)


def test_a_pack_that_does_not_reorder_back_exactly_leaves_the_plain_weight(packs, monkeypatch):
    fake, int8, x = packs
    monkeypatch.setattr(x86_ops.QConv, "_unpack", lambda self, pack: pack.to_dense().reshape(self.weight.shape) ^ 1)
    called = _called(int8, x)
    convs = [m for m in _weighted(called) if isinstance(m, x86_ops.QConv)]
    assert convs and all("weight" in dict(m.named_buffers(recurse=False)) for m in convs)
    assert torch.equal(called(x), fake(x))


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.sampled_from([1, 2, 3]), max_size=4), min_size=1, max_size=3))
def test_broadcast_shapes_is_torchs(shapes):
    try:
        expected = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        with pytest.raises(InputError):
            x86_glue.broadcast_shapes(*shapes)
        return
    assert x86_glue.broadcast_shapes(*shapes) == expected


def test_the_first_call_imports_nothing():
    # torch.broadcast_shapes imported sympy and torch's symbolic shapes on the first call: ~40 MiB resident
    script = textwrap.dedent("""
        import json, sys, torch, fxq
        from torch import nn

        class Attn(nn.Module):
            def __init__(self):
                super().__init__()
                self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

            def forward(self, x):
                return torch.softmax(torch.matmul(self.q(x), self.k(x).transpose(-1, -2)), -1)

        x = torch.randn(2, 5, 8)
        q = fxq.quantize(Attn().eval(), (x,), [(x,)], fxq.QuantConfig(backend="x86", timestep_arg=None))
        before = set(sys.modules)
        q(x)
        print(json.dumps(sorted(set(sys.modules) - before)))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# --- float glue in place ---------------------------------------------------------------------------------------

_LAYOUTS = {"contiguous": lambda t: t.contiguous(), "channels_last": lambda t: t.contiguous(
    memory_format=torch.channels_last), "permuted": lambda t: t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)}


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
       la=st.sampled_from(sorted(_LAYOUTS)), lb=st.sampled_from(sorted(_LAYOUTS)),
       b_kind=st.sampled_from(["same", "bias", "wider", "scalar"]), op=st.sampled_from(["add", "mul", "silu"]),
       a_first=st.booleans())
def test_glue_in_place_gives_the_out_of_place_tensor(shape, la, lb, b_kind, op, a_first):
    # values and strides (GroupNorm rounds layouts differently) as the out-of-place op, first call and later ones
    g = torch.Generator().manual_seed(0)
    shape = (1,) + shape[1:] if b_kind == "wider" else shape  # b broadcasts a to a larger result
    a0 = _LAYOUTS[la](torch.randn(shape, generator=g))
    b_shape = {"same": shape, "bias": shape[:2] + (1, 1), "wider": (2,) + shape[1:]}.get(b_kind)
    b = 1.5 if b_kind == "scalar" else _LAYOUTS[lb](torch.randn(b_shape, generator=g))
    fn, ref = {"add": (x86_memplan.add_, torch.add), "mul": (x86_memplan.mul_, torch.mul),
               "silu": (lambda a, b, first: x86_memplan.silu_(a), lambda a, b: F.silu(a))}[op]
    expected = ref(a0, b) if a_first or op == "silu" else ref(b, a0)
    for _ in range(2):
        out = fn(a0.clone(), b, a_first)
        assert torch.equal(out, expected) and out.stride() == expected.stride() and out.dtype == expected.dtype


def test_glue_writes_in_place_once_the_layout_is_known():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 1, 1)
    x86_memplan.add_(a.clone(), b)  # the first call with this layout runs out of place
    again = a.clone()
    assert x86_memplan.add_(again, b).data_ptr() == again.data_ptr()


class _Glue(nn.Module):
    """A SiLU of a product (in place: the product is read by nothing else), a time-embedding-like broadcast add
    into a conv's output, and a SiLU whose input, a norm's output, is read again later (not in place). (A SiLU
    that is a GroupNorm's only reader runs inside the norm's kernel.)"""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.norm = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.emb = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        h = self.c1(x) + self.emb
        n = self.norm(h)
        kept = F.silu(n) + n  # n is read after the SiLU: it must stay as it is
        return self.c2(F.silu(kept * 0.5))


def test_float_glue_runs_in_place_only_on_tensors_nothing_reads_later():
    fake, int8, _ = _fake_and_int8(_Glue)
    calls = [n.target for n in int8.graph.nodes if n.op == "call_function"]
    assert calls.count(x86_memplan.silu_) == 1 and calls.count(F.silu) == 1  # the product's SiLU; not n's
    assert calls.count(x86_memplan.add_) == 2  # conv + emb, silu(n) + n (into the SiLU's output)
    for _ in range(2):  # the first call learns the layouts, the second writes in place
        x = torch.randn(2, 4, 6, 6)
        assert torch.equal(int8(x), fake(x))


class _LateQuant(nn.Module):
    """A UNet up block's shape: h feeds a concat (float: GroupNorm follows) and, after the block, a 1x1 conv
    (int8: its Quantize was placed there)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.norm = nn.GroupNorm(2, 16)

    def forward(self, x):
        h = self.a(x)
        return self.b(F.silu(self.norm(torch.cat([h, h * 2], 1)))) + self.c(h)


def test_a_float_read_by_a_concat_is_quantized_before_it_so_only_its_codes_wait():
    fake, int8, x = _fake_and_int8(_LateQuant)
    nodes = list(int8.graph.nodes)
    (h,) = [n for n in nodes if n.op == "call_module" and n.target == "a"]
    (quant_h,) = [u for u in h.users if u.op == "call_module"
                  and isinstance(int8.graph_module.get_submodule(u.target), x86_ops.Quantize)]
    (cat,) = [n for n in nodes if n.target is torch.cat]
    assert nodes.index(quant_h) == nodes.index(cat) - 1  # after the concat, h's float storage is free
    assert torch.equal(int8(x), fake(x))


class _ReadAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = self.a(x)
        return self.c(h) * h  # h is read after its Quantize: that one stays where it is


def test_a_quantize_that_is_not_the_last_reader_stays():
    fake, int8, x = _fake_and_int8(_ReadAfter)
    assert torch.equal(int8(x), fake(x))


# --- aliasing: the memory planning must see in-place writes and views (found by review) ----------------------------

class _TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.d = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)


class _WritesInPlace(_TwoConvs):
    """The user's own in-place op between a conv and the conv that reads its result."""

    def forward(self, x):
        h = self.c(x)
        h.mul_(2.0)
        return self.d(h)


class _ViewReadLater(_TwoConvs):
    """A view of h taken before h + 1 and read after it: h must not be written in place."""

    def forward(self, x):
        h = self.c(x)
        t = h.transpose(2, 3)
        y = h + 1.0
        return self.d(y) + t


class _AddsItsOwnView(_TwoConvs):
    def forward(self, x):
        h = self.c(x)
        return self.d(h + h.transpose(2, 3))


@pytest.mark.parametrize("model", [_WritesInPlace, _ViewReadLater, _AddsItsOwnView])
def test_memory_planning_respects_in_place_writes_and_views(model):
    fake, int8, x = _fake_and_int8(model, batches=3, size=8)
    want = fake(x)
    for _ in range(3):  # the runtime writes in place from the second call on
        assert torch.equal(int8(x), want)


def test_fake_quant_runs_under_inference_mode():
    fake, _, x = _fake_and_int8(_ViewReadLater, batches=3, size=8)
    want = fake(x)
    with torch.inference_mode():
        assert torch.equal(fake(x), want)


class _WeightReadByTheGraph(nn.Module):
    """A linear whose weight a functional linear reuses: the lowered graph reads the module's weight."""

    def __init__(self):
        super().__init__()
        self.inp, self.lin = nn.Linear(8, 16), nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(F.linear(self.inp(x), self.lin.weight))


def test_a_file_saved_after_a_call_loads_when_the_graph_reads_a_packed_weight(tmp_path):
    # once called, the int8 weight is held packed (no plain buffer): the file must still list it as the module's
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    qmodel = fxq.quantize(_WeightReadByTheGraph().eval(), (x,), [(x,)], fxq.QuantConfig(**X86))
    y = qmodel(x)
    fxq.save(qmodel, tmp_path / "m.fxq")
    assert torch.equal(fxq.load(tmp_path / "m.fxq")(x), y)
