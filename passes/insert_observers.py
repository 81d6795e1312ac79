"""insert_observers: put an observer in front of every quantized op input.

Pattern: every node that select_ops marked (`node.meta["fxq"]`).
- Each activation input named in `act_inputs` is routed through an `ActObserver` call_module node. A producer
  feeding several selected ops at the same bit-width gets one shared observer: it is one quantized tensor, as it
  will be in an int8 graph.
- With `timestep_groups` > 1, one call_function node `fxq.quant.quantizer.timestep_group(t, G, T[, edges])` right
  after the placeholders computes each sample's group once per call, and every observer receives it as its second
  input;
  each observer is built with the batch axis that find_batch_axes recorded on its producer
  (`meta["fxq_batch"]`), which must have run.
- conv/linear get a per-output-channel `WeightObserver` submodule along `meta["fxq"]["weight_axis"]` (1 for a
  transposed conv), named in `meta["fxq"]["weight_observer"]`.

Guarantees afterwards: outputs are bit-identical to before (observers are identities); each selected activation
input reads from exactly one observer of its bit-width; running the pass again changes nothing.
"""

from __future__ import annotations

import torch.fx as fx

from fxq.tracing.graph import free_name
from fxq.tracing.meta import VAL_KEY
from fxq.quant.observers import ActObserver, WeightObserver
from fxq.quant.ops import weight_key
from fxq.passes.batch_axes import META_KEY as BATCH_KEY
from fxq.passes.manager import PassError, PassResult
from fxq.quant.quantizer import timestep_group, timestep_group_args

ACT_PREFIX, WEIGHT_PREFIX = "fxq_obs_", "fxq_wobs_"


def is_act_observer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), ActObserver)


def release_weight_observer(node: fx.Node) -> str | None:
    """Take the name of node's weight observer out of its fxq metadata (lowering, once the weight is quantized);
    returns it, or None. The metadata dict is replaced, not edited: a deepcopy of the graph shares it."""
    meta = node.meta.get("fxq")
    if not meta or "weight_observer" not in meta:
        return None
    node.meta["fxq"] = {k: v for k, v in meta.items() if k != "weight_observer"}
    return meta["weight_observer"]


class InsertObservers:
    def __init__(self, config, timestep: str | None = None):
        self.config = config
        self.timestep = timestep  # name of the placeholder carrying t, or None

    def _timestep_node(self, gm: fx.GraphModule):
        if self.timestep is None:
            return None
        for node in gm.graph.nodes:
            if node.op == "placeholder" and node.name == self.timestep:
                return node
        raise KeyError(f"no placeholder named {self.timestep!r}")

    def _group_node(self, gm: fx.GraphModule, before: fx.Node):
        """The node computing each sample's timestep group: the existing one, else a new one before `before`
        (the first observed op, so it runs after the input guards). None without groups."""
        cfg = self.config
        t_node = self._timestep_node(gm)
        if cfg.timestep_groups == 1 or t_node is None:
            return None
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target is timestep_group:
                return node
        with gm.graph.inserting_before(before):
            args = timestep_group_args(cfg.timestep_groups, cfg.num_timesteps, cfg.group_edges)
            return gm.graph.create_node("call_function", timestep_group, (t_node, *args), name="fxq_timestep_group")

    def _rows(self, src: fx.Node, consumer: fx.Node) -> dict:
        """Constructor arguments saying how the observed tensor's rows map to samples."""
        if self.config.timestep_groups == 1:
            return {}
        found = src.meta.get(BATCH_KEY)
        if found is None:
            raise PassError(f"{src.name} (input of {consumer.name}) has no batch axis recorded: with "
                            "timestep_groups > 1, run find_batch_axes before insert_observers")
        return {"batch_axis": found["axis"], "batch_major": found["batch_major"]}

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        group = None
        shared: dict[tuple[str, int], fx.Node] = {}
        modified = False
        for node in list(gm.graph.nodes):
            meta = node.meta.get("fxq")
            if meta is None:
                continue
            for pos in meta["act_inputs"]:
                src = node.args[pos]
                if not isinstance(src, fx.Node) or is_act_observer(gm, src):
                    continue
                key = (src.name, meta["act_bits"])
                if key not in shared:
                    if group is None:
                        group = self._group_node(gm, node)
                    name = free_name(gm, ACT_PREFIX + src.name)
                    label = f"input `{src.name}` of {meta['kind']} `{meta['module'] or node.name}`"
                    gm.add_submodule(name, ActObserver.from_config(self.config, meta["act_bits"], label=label,
                                                                   **self._rows(src, node)))
                    # before its first consumer: after every placeholder and the group node, so both are defined
                    with gm.graph.inserting_before(node):
                        args = (src,) if group is None else (src, group)
                        shared[key] = gm.graph.call_module(name, args)
                    if VAL_KEY in src.meta:  # an identity: same metadata as what it observes
                        shared[key].meta[VAL_KEY] = src.meta[VAL_KEY]
                node.update_arg(pos, shared[key])
                modified = True
            if meta["weight_bits"] is not None and "weight_observer" not in meta:
                name = free_name(gm, WEIGHT_PREFIX + weight_key(node).replace(".", "_"))
                axis = meta.get("weight_axis") or 0
                gm.add_submodule(name, WeightObserver.from_config(self.config, meta["weight_bits"], axis))
                meta["weight_observer"] = name
                modified = True
        return PassResult(gm, modified)
