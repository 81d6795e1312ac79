import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.passes.shape_prop import ShapeProp

import fxq
from fxq.passes.fold_bn import fold_bn
from tests.graph_structure import assert_same_structure, shaped_trace

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomize_bn(bn: nn.Module, gen: torch.Generator) -> None:
    n = bn.num_features
    bn.running_mean.copy_(torch.randn(n, generator=gen))
    bn.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.1)
    if bn.affine:
        with torch.no_grad():
            bn.weight.copy_(torch.randn(n, generator=gen))
            bn.bias.copy_(torch.randn(n, generator=gen))


def bn_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), BN_TYPES)]


class Pair(nn.Module):
    def __init__(self, layer, bn):
        super().__init__()
        self.layer, self.bn = layer, bn

    def forward(self, x):
        return torch.relu(self.bn(self.layer(x)))


@st.composite
def layer_and_input(draw):
    kind = draw(st.sampled_from(["conv1d", "conv2d", "linear"]))
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    bias = draw(st.booleans())
    batch = draw(st.integers(1, 3))
    if kind == "linear":
        return nn.Linear(cin, cout, bias=bias), nn.BatchNorm1d, (batch, cin)
    k = draw(st.integers(1, 3))
    size = draw(st.integers(k, 6))
    if kind == "conv1d":
        return nn.Conv1d(cin, cout, k, groups=groups, bias=bias), nn.BatchNorm1d, (batch, cin, size)
    return nn.Conv2d(cin, cout, k, groups=groups, bias=bias, padding=k // 2), nn.BatchNorm2d, (batch, cin, size, size)


@settings(max_examples=25, deadline=None)
@given(layer_and_input(), st.booleans(), st.floats(1e-5, 1e-1), st.integers(0, 2**31 - 1))
def test_fold_preserves_outputs(spec, affine, eps, seed):
    layer, bn_type, shape = spec
    gen = torch.Generator().manual_seed(seed)
    bn = bn_type(layer.weight.shape[0], eps=eps, affine=affine)
    randomize_bn(bn, gen)
    model = Pair(layer, bn).eval()
    x = torch.randn(shape, generator=gen)
    gm = shaped_trace(model, x)
    with torch.no_grad():
        before = gm(x)

    result = fold_bn(gm)

    assert result.modified and result.graph_module is gm
    gm.graph.lint()
    assert not bn_nodes(gm)
    assert not hasattr(gm, "bn")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), before, rtol=1e-5, atol=1e-5)
    # A second application finds nothing and changes nothing.
    code = gm.code
    again = fold_bn(gm)
    assert not again.modified and gm.code == code
    with torch.no_grad():
        torch.testing.assert_close(gm(x), before, rtol=1e-5, atol=1e-5)


def test_user_model_and_parameters_untouched():
    model = Pair(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    randomize_bn(model.bn, torch.Generator().manual_seed(0))
    weight, bias = model.layer.weight, model.layer.bias
    saved = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        ref = model(x)
    gm = shaped_trace(model, x)  # shares the leaf modules with `model`

    fold_bn(gm)

    assert model.layer.weight is weight and model.layer.bias is bias
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert gm.layer is not model.layer
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
        torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)


class Before(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv3d(4, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(2, affine=False)
        self.fc = nn.Linear(8, 5)
        self.bn1 = nn.BatchNorm1d(5)

    def forward(self, x, y):
        a = torch.relu(self.bn(self.conv(x)))
        b = self.bn3(self.conv3(a.unsqueeze(2)))
        return b, self.bn1(self.fc(y))


class Expected(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv3 = nn.Conv3d(4, 2, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x, y):
        a = torch.relu(self.conv(x))
        b = self.conv3(a.unsqueeze(2))
        return b, self.fc(y)


def test_before_expected():
    model = Before().eval()
    gen = torch.Generator().manual_seed(1)
    for bn in (model.bn, model.bn3, model.bn1):
        randomize_bn(bn, gen)
    x, y = torch.randn(2, 3, 5, 5), torch.randn(3, 8)
    gm = shaped_trace(model, x, y)
    with torch.no_grad():
        ref = gm(x, y)

    fold_bn(gm)

    assert_same_structure(gm, torch.fx.symbolic_trace(Expected()))
    assert gm.conv3.bias is not None  # a bias-free conv gains the BN shift as its bias
    with torch.no_grad():
        for got, want in zip(gm(x, y), ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class BnOfSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x) + x)


class SubclassConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("make", [
    lambda: Pair(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)).train(),          # train-mode BN
    lambda: Pair(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)).eval(),
    lambda: TwoUsers().eval(),                                             # conv output used twice
    lambda: BnOfSum().eval(),                                              # BN input is not the conv
    lambda: Pair(SubclassConv(2, 2, 1), nn.BatchNorm2d(2)).eval(),         # conv with its own forward
], ids=["train_bn", "no_running_stats", "two_users", "bn_of_sum", "custom_forward"])
def test_leaves_unfoldable_alone(make):
    torch.manual_seed(0)
    gm = shaped_trace(make(), torch.randn(2, 2, 3, 3))
    code = gm.code
    result = fold_bn(gm)
    assert not result.modified
    assert gm.code == code
    assert len(bn_nodes(gm)) == 1


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)), self.conv(x)


def test_shared_conv_gets_own_module():
    model = SharedConv().eval()
    randomize_bn(model.bn, torch.Generator().manual_seed(2))
    x = torch.randn(1, 2, 3, 3)
    gm = shaped_trace(model, x)
    with torch.no_grad():
        ref = gm(x)

    assert fold_bn(gm).modified

    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(set(targets)) == 2 and "conv" in targets  # the unfused call keeps the original conv
    assert gm.get_submodule("conv") is model.conv
    with torch.no_grad():
        for got, want in zip(gm(x), ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class SharedBn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)), self.bn(x)


def test_bn_module_kept_while_used():
    gm = shaped_trace(SharedBn().eval(), torch.randn(1, 2, 3, 3))
    assert fold_bn(gm).modified
    assert len(bn_nodes(gm)) == 1
    assert isinstance(gm.bn, nn.BatchNorm2d)
    gm(torch.randn(1, 2, 3, 3))


def test_linear_on_3d_input_with_shape_metadata_not_folded():
    # Linear(4 -> 4) on (N, 4, 4) then BatchNorm1d(4) normalizes dim 1, which is not the Linear's feature axis.
    model = Pair(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    randomize_bn(model.bn, torch.Generator().manual_seed(3))
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 4, 4)
    ShapeProp(gm).propagate(x)
    with torch.no_grad():
        ref = gm(x)
    assert not fold_bn(gm).modified
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref)


@pytest.mark.parametrize("shape, folds", [((3, 4), True), ((3, 4, 4), False), ((3, 4, 5), False)])
def test_linear_bn1d_folds_only_where_bn_normalizes_the_linear_features(shape, folds):
    # On [N, L, C] BatchNorm1d normalizes L; with L == C the sizes match and a fold gave errors of ~4.
    model = Pair(nn.Linear(shape[-1], 4), nn.BatchNorm1d(4)).eval()
    randomize_bn(model.bn, torch.Generator().manual_seed(4))
    x = torch.randn(*shape[:-1], shape[-1]) if folds else torch.randn(3, 4, shape[-1])
    gm = fxq.trace(model, (x,))  # the tracer records the ranks
    with torch.no_grad():
        ref = model(x)
    assert fold_bn(gm).modified == folds
    assert len(bn_nodes(gm)) == (0 if folds else 1)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: Pair(nn.Linear(4, 4), nn.BatchNorm1d(4)),
                                  lambda: Pair(nn.Conv1d(4, 4, 1), nn.BatchNorm1d(4)),
                                  lambda: Pair(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))])
def test_unknown_rank_is_not_folded(make):
    gm = torch.fx.symbolic_trace(make().eval())  # no shape metadata
    assert not fold_bn(gm).modified and len(bn_nodes(gm)) == 1


def test_parametrized_conv_is_left_alone():
    # its weight is a property computed at each call: assigning a folded weight fails (fold_constants makes
    # such a module plain first, in the quantize pipeline)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(2, 2, 1))
    gm = shaped_trace(Pair(conv, nn.BatchNorm2d(2)).eval(), torch.randn(1, 2, 3, 3))
    assert not fold_bn(gm).modified and len(bn_nodes(gm)) == 1
