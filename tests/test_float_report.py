"""fxq.report.float_ops / float_summary say which products stayed in float and why; QuantConfig.require turns
those of named modules into an error naming node, module and reason."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxq
from fxq.backends.fake_ops import ExactConv2d
from fxq.errors import FxqWarning, InputError, UnsupportedOpError


class Doubled(nn.Conv2d):  # a conv subclass with its own forward: traced through unless kept whole
    def forward(self, x):
        return super().forward(x) * 2


class Leaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x))


class Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return F.linear(x, self.w * x.mean())  # the weight depends on the input's values


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.custom = nn.Conv2d(3, 4, 3, padding=1), Doubled(4, 4, 1)
        self.head, self.leaf, self.dyn = nn.Linear(4, 4), Leaf(), Dynamic()

    def forward(self, x):
        v = self.custom(self.stem(x)).mean((2, 3))
        v = self.dyn(self.leaf(self.head(v)))
        return v + torch.tensordot(v, v, dims=([1], [1])).sum()


EXPECTED = [("custom", "conv", "custom_module"), ("head", "linear", "keep_float"), ("leaf.a", "linear", "opaque"),
            ("leaf.b", "linear", "opaque"), ("dyn", "linear", "dynamic_weight"), ("", None, "unsupported")]


def _quantize(**config):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    cfg = fxq.QuantConfig(timestep_arg=None, leaf_modules=("leaf", "custom"), **config)
    return fxq.quantize(Model().eval(), (x,), [(x,)], cfg)


def test_float_ops_lists_every_product_left_in_float_with_its_reason():
    q = _quantize(keep_float=("head",))
    got = fxq.report.float_ops(q)
    assert [(f.module, f.kind, f.reason) for f in got] == EXPECTED
    assert fxq.report.quantized_ops(q) == {"conv": 1}
    dyn = next(f for f in got if f.reason == "dynamic_weight")
    assert dyn.op == "F.linear" and dyn.node == "linear" and "inputs' values" in dyn.detail
    assert "'head'" in next(f for f in got if f.reason == "keep_float").detail
    assert "its own forward (Doubled.forward)" in got[0].detail


def test_a_conv_subclass_traced_through_is_quantized_as_the_functional_conv_it_runs():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 3)
    model = nn.Sequential(Doubled(4, 4, 1)).eval()
    q = fxq.quantize(model, (x,), [(x,)], fxq.QuantConfig(timestep_arg=None))
    assert fxq.report.quantized_ops(q) == {"conv": 1} and not fxq.report.float_ops(q)
    (node,) = [n for n in q.graph.nodes if "fxq" in n.meta]  # the F.conv2d it runs, as the int8 kernel would
    assert node.op == "call_module" and type(q.graph_module.get_submodule(node.target)) is ExactConv2d


def test_float_summary_reads_as_one_line_per_float_op():
    text = fxq.report.float_summary(_quantize(keep_float=("head",)))
    lines = text.splitlines()
    assert lines[0] == "quantized ops: 1 (conv 1); stayed in float: 6"
    assert len(lines) == 1 + 6 + 1
    assert lines[1].startswith("  custom: conv call of module `custom` (node custom): module with its own")
    assert lines[3].startswith("  leaf.a: linear call of module `leaf`") and "leaf_modules" in lines[3]
    assert lines[5].startswith("  dyn: linear F.linear (node linear): dynamic weight")
    assert lines[6].startswith("  <top level>: torch.tensordot")
    assert lines[-1].startswith("by reason: inside a module the tracer kept whole x2;")


def test_report_refuses_what_fxq_did_not_make():
    with pytest.raises(InputError, match="not a model made by fxq.quantize"):
        fxq.report.float_ops(nn.Linear(2, 2))


@pytest.mark.parametrize("require, named", [
    (("dyn",), ["`linear` (F.linear: linear) in module `dyn`"]),
    (("leaf*",), ["in module `leaf.a`", "in module `leaf.b`"]),
    (("head",), ["module matches keep_float pattern 'head'"]),
    (("*",), ["module `custom`", "module `dyn`", "module `<top level>`", "module `leaf.b`"]),
])
def test_required_modules_that_stay_float_raise_naming_node_module_and_reason(require, named):
    with pytest.raises(UnsupportedOpError) as info:
        _quantize(keep_float=("head",), require=require)
    message = str(info.value)
    for part in named:
        assert part in message, message
    assert "QuantConfig.require" in message


def test_required_modules_that_quantize_pass_and_unmatched_patterns_warn():
    q = _quantize(require=("stem", "head"))
    assert fxq.report.quantized_ops(q) == {"conv": 1, "linear": 1}
    with pytest.warns(FxqWarning, match="require pattern 'nothing'"):
        _quantize(require=("nothing",))
