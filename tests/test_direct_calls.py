"""A quantized model calls its modules' forwards directly (fxq.direct_calls) only while that computes exactly what
the GraphModule's own code computes: hooks, replaced modules, edited graphs, overridden forwards and copies all
behave as with `graph_module(...)`. The direct path must also really be taken when nothing stands in its way."""

import copy
import pickle

import pytest
import torch
from torch import nn

import fxq
from fxq import direct_calls


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        # not a GroupNorm: the lowerings swap those for fxq's own kernel (and x86 fuses it into a quantize), and
        # these tests want a stock leaf
        self.norm = nn.InstanceNorm2d(8, affine=True)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.1)

    def forward(self, h):
        return h + self.conv(self.drop(torch.nn.functional.silu(self.norm(h))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.emb = nn.Linear(1, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.conv_in(x) + self.emb(t.float()[:, None] / 1000)[:, :, None, None]
        for block in self.blocks:
            h = block(h)
        return self.conv_out(h)


def data(n=3, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g)) for _ in range(n)]


@pytest.fixture(scope="module", params=["fake", "x86"])
def qmodel(request):
    torch.manual_seed(0)
    calib = data()
    return fxq.quantize(Net().eval(), calib[0], calib, fxq.QuantConfig(backend=request.param))


def fresh(qmodel):
    return copy.deepcopy(qmodel)


def run_graph(q, x, t):
    """What the GraphModule's own code computes (the reference the direct path must equal)."""
    with torch.inference_mode(q.quant_config.backend == "x86"):
        return q.graph_module(x, t).clone()


X, T = data(1, seed=5)[0]


def test_the_direct_path_is_taken_and_equals_the_graph_module(qmodel, monkeypatch):
    q = fresh(qmodel)
    expected = run_graph(q, X, T)
    monkeypatch.setattr(type(q.graph_module), "forward", lambda *a, **k: pytest.fail("GraphModule code ran"))
    assert torch.equal(q(X, T), expected)
    assert isinstance(q.__dict__["_fxq_direct"], direct_calls.DirectCalls)


def leaf(q):
    return q.graph_module.get_submodule("blocks.1.norm")


def test_a_forward_hook_on_a_leaf_runs_and_changes_the_output(qmodel):
    q = fresh(qmodel)
    plain = q(X, T)
    seen = []
    handle = leaf(q).register_forward_hook(lambda m, args, out: seen.append(1) or out + 1)
    hooked = q(X, T)
    assert seen == [1] and not torch.equal(hooked, plain)
    assert torch.equal(hooked, run_graph(q, X, T))
    handle.remove()
    assert torch.equal(q(X, T), plain)


@pytest.mark.parametrize("kind", ["pre", "global", "root"])
def test_other_hooks_run_too(qmodel, kind):
    q = fresh(qmodel)
    plain = q(X, T)
    seen = []
    if kind == "pre":
        handle = leaf(q).register_forward_pre_hook(lambda m, args: seen.append(1) or (args[0].flip(-1),))
    elif kind == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(m))
    else:
        handle = q.graph_module.register_forward_hook(lambda m, args, out: seen.append(1) or out * 3)
    try:
        out = q(X, T)
    finally:
        handle.remove()
    assert seen
    if kind == "global":
        assert any(m is leaf(q) for m in seen)  # reached the leaves, not only the QuantizedModel
    else:
        assert not torch.equal(out, plain)


def test_a_replaced_module_is_the_one_that_runs(qmodel):
    q = fresh(qmodel)
    plain = q(X, T)
    gm = q.graph_module
    gm.set_submodule("blocks.1.norm", nn.InstanceNorm2d(8, eps=0.5, affine=True))  # a new leaf, computing something else
    changed = q(X, T)
    assert not torch.equal(changed, plain)
    assert torch.equal(changed, run_graph(q, X, T))
    gm.blocks = copy.deepcopy(gm.blocks)  # a whole new subtree above the leaves
    with torch.no_grad():
        gm.get_submodule("blocks.0.norm").bias.add_(0.5)
    assert torch.equal(q(X, T), run_graph(q, X, T))


def test_an_instance_forward_or_a_patched_class_forward_is_honoured(qmodel, monkeypatch):
    q = fresh(qmodel)
    plain = q(X, T)
    norm = leaf(q)
    norm.forward = lambda h: torch.zeros_like(h)
    assert torch.equal(q(X, T), run_graph(q, X, T)) and not torch.equal(q(X, T), plain)
    del norm.forward
    assert torch.equal(q(X, T), plain)
    monkeypatch.setattr(nn.InstanceNorm2d, "forward", lambda self, h: h * 0.5)
    assert not torch.equal(q(X, T), plain)


def test_an_edited_recompiled_graph_runs_as_edited(qmodel):
    q = fresh(qmodel)
    plain = q(X, T)
    gm = q.graph_module
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        doubled = gm.graph.call_function(torch.mul, (out.args[0], 2.0))
    out.args = (doubled,)
    gm.recompile()
    assert torch.allclose(q(X, T), 2 * plain)


def test_copies_run_their_own_modules(qmodel):
    q = fresh(qmodel)
    plain = q(X, T)
    twin = copy.deepcopy(q)
    with torch.no_grad():
        twin.graph_module.get_submodule("blocks.0.norm").bias.add_(1.0)
    assert not torch.equal(twin(X, T), plain)
    assert torch.equal(twin(X, T), run_graph(twin, X, T))
    assert torch.equal(q(X, T), plain)
    again = pickle.loads(pickle.dumps(q))
    assert torch.equal(again(X, T), plain)


def test_the_int8_graph_holds_no_idle_dropout(qmodel):
    gm = qmodel.graph_module
    dropouts = [m for m in gm.modules() if isinstance(m, nn.Dropout)]
    assert (not dropouts) if qmodel.quant_config.backend == "x86" else len(dropouts) == 2


class FunctionalDropout(Net):
    def forward(self, x, t):
        h = torch.nn.functional.dropout(self.conv_in(x), 0.2, training=self.training)
        h = torch.nn.functional.alpha_dropout(h, 0.1)  # training defaults to False
        return self.conv_out(torch.nn.functional.dropout(h, 0.3, True))  # active: kept


def test_idle_functional_dropouts_leave_the_int8_graph_and_active_ones_stay():
    calib = data()
    model = FunctionalDropout().eval()
    q = fxq.quantize(model, calib[0], calib, fxq.QuantConfig(backend="x86"))
    targets = [n.target for n in q.graph.nodes if n.op == "call_function"]
    dropouts = [t for t in targets if "dropout" in getattr(t, "__name__", "")]
    assert dropouts == [torch.nn.functional.dropout]


def test_a_removed_instance_forward_is_not_called_again(qmodel):
    q = fresh(qmodel)
    norm = leaf(q)
    norm.forward = lambda h: torch.zeros_like(h)
    q(X, T)  # the direct form is built while the override is set
    del norm.forward
    assert torch.equal(q(X, T), run_graph(q, X, T))


def test_a_graph_edited_but_not_recompiled_runs_the_graph_module_s_code(qmodel):
    q = fresh(qmodel)
    gm = q.graph_module
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        out.args = (gm.graph.call_function(torch.mul, (out.args[0], 2.0)),)
    assert torch.equal(q(X, T), run_graph(q, X, T))


class HalfNorm(nn.InstanceNorm2d):
    def forward(self, h):
        return super().forward(h) * 0.5


class CalledPlusOne(nn.InstanceNorm2d):
    def __call__(self, *args, **kwargs):
        return super().__call__(*args, **kwargs) + 1


def test_a_swapped_class_or_a_class_with_its_own_call_is_honoured(qmodel):
    q = fresh(qmodel)
    plain = q(X, T)
    leaf(q).__class__ = HalfNorm
    assert torch.equal(q(X, T), run_graph(q, X, T)) and not torch.equal(q(X, T), plain)
    q = fresh(qmodel)
    new = CalledPlusOne(8, affine=True)
    new.load_state_dict(leaf(q).state_dict())
    q.graph_module.set_submodule("blocks.1.norm", new)
    assert torch.equal(q(X, T), run_graph(q, X, T)) and not torch.equal(q(X, T), plain)
