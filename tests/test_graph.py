import operator

import networkx as nx
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from fxq.tracing.graph import (
    activation_nodes, is_reachable, node_order, owning_module, to_networkx, users_in_order, value_dependent_nodes,
)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.w = nn.Parameter(torch.randn(3, 3))

    def forward(self, x):
        return torch.relu(self.fc(x)) @ self.w.t()


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x, y):
        return self.inner(x) + y * y


@pytest.fixture
def gm():
    return torch.fx.symbolic_trace(Outer())


def test_to_networkx_is_a_frozen_def_use_view(gm):
    g = to_networkx(gm.graph)
    nodes = list(gm.graph.nodes)
    assert list(g.nodes) == [n.name for n in nodes]
    for i, n in enumerate(nodes):
        assert g.nodes[n.name]["node"] is n and g.nodes[n.name]["order"] == i
    expected_edges = {(inp.name, n.name) for n in nodes for inp in n.all_input_nodes}
    assert set(g.edges) == expected_edges
    assert ("y", "mul") in g.edges  # y * y: one edge for two uses
    assert nx.is_directed_acyclic_graph(g)
    assert nx.is_frozen(g)
    with pytest.raises(nx.NetworkXError):
        g.add_edge("output", "x")
    assert len(gm.graph.nodes) == len(nodes)  # building the view changed nothing


def test_users_in_order_follows_graph_not_insertion():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    late = graph.call_function(torch.relu, (x,))
    with graph.inserting_before(late):
        early = graph.call_function(torch.neg, (x,))  # used after `late` was, but sits before it
    graph.output((early, late))
    assert list(x.users) == [late, early]
    assert users_in_order(x) == [early, late]


def test_activation_nodes_exclude_parameter_math(gm):
    names = {n.name for n in activation_nodes(gm.graph)}
    assert {"x", "y", "inner_fc", "relu", "matmul", "mul", "add", "output"} <= names
    assert not names & {"inner_w", "t"}


def test_owning_module(gm):
    owner = {n.name: owning_module(n) for n in gm.graph.nodes}
    assert owner["inner_fc"] == "inner.fc"
    assert owner["relu"] == owner["matmul"] == owner["t"] == "inner"
    assert owner["mul"] == owner["add"] == owner["x"] == ""


@st.composite
def random_dag(draw):
    """A random fx graph: each node adds together a random subset of earlier nodes."""
    graph = torch.fx.Graph()
    nodes = [graph.placeholder(f"in{i}") for i in range(draw(st.integers(1, 3)))]
    for _ in range(draw(st.integers(1, 12))):
        picks = draw(st.lists(st.sampled_from(nodes), min_size=1, max_size=3))
        nodes.append(graph.call_function(operator.add, (picks[0], *picks[1:2])) if len(picks) > 1
                     else graph.call_function(operator.neg, (picks[0],)))
    graph.output(nodes[-1])
    return graph


@settings(max_examples=25, deadline=None)
@given(random_dag())
def test_reachability_agrees_with_networkx(graph):
    g = to_networkx(graph)
    nodes = list(graph.nodes)
    for a in nodes:
        for b in nodes:
            assert is_reachable(a, b) == nx.has_path(g, a.name, b.name), (a, b)
    order = node_order(graph)
    for n in nodes:
        assert all(order[inp] < order[n] for inp in n.all_input_nodes)


class MetadataReads(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x, t):
        freqs = torch.arange(3, device=t.device).float()      # t's device only
        zeros = torch.zeros_like(x) + x.new_ones(x.shape)      # x's shape, dtype, device only
        w = self.w.to(x.dtype)                                 # x's dtype only
        s = x.size(0) * freqs                                  # a shape times a constant
        e = t.float()[:, None] * freqs                         # t's values
        return zeros + w + s + e + x.type_as(t)                # x's values (type_as reads t's dtype)


def test_value_dependence_follows_values_not_shapes_dtypes_or_devices():
    gm = torch.fx.symbolic_trace(MetadataReads())
    dependent = {n.name for n in value_dependent_nodes(gm.graph)}
    reachable = {n.name for n in activation_nodes(gm.graph)}
    independent = {"getattr_1", "arange", "float_1", "zeros_like", "getattr_2", "new_ones", "add", "w",
                   "getattr_3", "to", "size", "mul", "add_1", "add_2"}
    assert independent <= {n.name for n in gm.graph.nodes}
    assert not dependent & independent, dependent & independent
    assert independent - {"w"} <= reachable  # reachable from an input all the same (through metadata)
    assert {"x", "t", "float_2", "getitem", "mul_1", "type_as", "add_3", "add_4", "output"} == dependent
