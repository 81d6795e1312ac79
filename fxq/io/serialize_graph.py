"""The JSON form of a torch.fx graph in an fxq file: values, call targets, nodes.

Values (node arguments, metadata, module specs) are JSON with tags for what JSON lacks: a JSON array is a tuple,
and single-key objects mark the rest ({"$list": [...]}, {"$node": "name"}, {"$dtype": "float32"}, ...).

Loading must not run code the file chooses. So a call_function target resolves only from an allow-list: public
functions of torch, torch.nn.functional, torch.linalg/fft/special, Tensor methods, registered torch.ops, math, a
fixed subset of operator and builtins, einops' functions, fxq's own graph functions (registered: the guards and
the timestep-group node; or defined under fxq.backends), and dataclass outputs of diffusers/transformers (a model's return type). Names that reach files,
storages, hooks, compilation or global state are refused everywhere, and so are underscore names in call_method
and getattr (no way to `__class__`, `__globals__`). Generated code is exec'd by torch.fx, so every string the
file puts into it as code (targets, placeholders) must be a plain identifier path.
"""

from __future__ import annotations

import builtins
import collections
import dataclasses
import importlib
import keyword
import math
import operator
import re

import torch
import torch.fx as fx

from fxq.errors import ModelFileError, SaveError

# ------------------------------------------------------------------------------------------------------- values

_TAGS = ("$list", "$node", "$dict", "$slice", "$ellipsis", "$float", "$complex", "$dtype", "$device",
         "$memory_format", "$layout", "$size", "$quant_config")


class Unencodable(Exception):
    """A value the JSON form has no spelling for (internal; callers turn it into SaveError or drop the value)."""


def encode_value(v):
    """JSON form of a value (tensors have none: they live in the state dict, and fx cannot generate code for a
    tensor constant in an argument anyway)."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else {"$float": repr(v)}
    if isinstance(v, fx.Node):
        return {"$node": v.name}
    if isinstance(v, torch.Size):
        return {"$size": [int(d) for d in v]}
    if type(v) is tuple:
        return [encode_value(e) for e in v]
    if isinstance(v, list):  # fx's immutable_list too
        return {"$list": [encode_value(e) for e in v]}
    if isinstance(v, dict):  # fx's immutable_dict, OrderedDict
        return {"$dict": [[encode_value(k), encode_value(e)] for k, e in v.items()]}
    if isinstance(v, slice):
        return {"$slice": [encode_value(e) for e in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"$ellipsis": None}
    if isinstance(v, complex):
        return {"$complex": [encode_value(v.real), encode_value(v.imag)]}
    if isinstance(v, torch.dtype):
        return {"$dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"$device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"$memory_format": str(v).removeprefix("torch.")}
    if isinstance(v, torch.layout):
        return {"$layout": str(v).removeprefix("torch.")}
    from fxq.config import QuantConfig
    if isinstance(v, QuantConfig):
        return {"$quant_config": encode_value(v.to_dict())}
    raise Unencodable(f"a {type(v).__module__}.{type(v).__qualname__} ({v!r:.80})")


def _torch_constant(name, kind, what: str):
    value = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(value, kind):
        raise ModelFileError(f"{what} {name!r} is not a torch {kind.__name__}")
    return value


def decode_value(obj, nodes: dict | None = None):
    """Inverse of encode_value. `nodes`: name -> fx.Node defined so far (None: node references refused)."""
    if obj is None or isinstance(obj, (bool, str, int, float)):
        return obj
    if isinstance(obj, list):
        return tuple(decode_value(e, nodes) for e in obj)
    if not (isinstance(obj, dict) and len(obj) == 1):
        raise ModelFileError(f"a value of the graph description is malformed: {obj!r:.120}")
    (tag, body), = obj.items()
    if tag == "$list":
        return [decode_value(e, nodes) for e in _array(body, tag)]
    if tag == "$node":
        if nodes is None or body not in nodes:
            raise ModelFileError(f"a graph value refers to node {body!r}, which is not defined before its use")
        return nodes[body]
    if tag == "$dict":
        return {decode_value(k, nodes): decode_value(v, nodes) for k, v in _pairs(body)}
    if tag == "$slice":
        return slice(*(decode_value(e, nodes) for e in _array(body, tag, 3)))
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$float":
        if body not in ("inf", "-inf", "nan"):
            raise ModelFileError(f"{body!r} is not a non-finite float")
        return float(body)
    if tag == "$complex":
        re_, im = _array(body, tag, 2)
        return complex(decode_value(re_), decode_value(im))
    if tag == "$dtype":
        return _torch_constant(body, torch.dtype, "dtype")
    if tag == "$memory_format":
        return _torch_constant(body, torch.memory_format, "memory format")
    if tag == "$layout":
        return _torch_constant(body, torch.layout, "layout")
    if tag == "$device":
        try:
            return torch.device(body)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ModelFileError(f"{body!r} is not a torch device ({e})") from None
    if tag == "$size":
        return torch.Size(_ints(body, tag))
    if tag == "$quant_config":
        from fxq.config import QuantConfig
        fields = decode_value(body)
        if not isinstance(fields, dict):
            raise ModelFileError("the saved QuantConfig is not a set of fields")
        try:
            return QuantConfig(**fields)
        except TypeError as e:
            raise ModelFileError(f"the saved QuantConfig has fields this fxq does not know ({e}); upgrade fxq") \
                from None
        except ValueError as e:
            raise ModelFileError(f"the saved QuantConfig is not valid in this fxq: {e}") from None
    raise ModelFileError(f"unknown value tag {tag!r} in the graph description (known: {', '.join(_TAGS)})")


def _array(body, tag, length=None) -> list:
    if not isinstance(body, list) or (length is not None and len(body) != length):
        raise ModelFileError(f"{tag} holds {body!r:.80}, not a list" + (f" of {length}" if length else ""))
    return body


def _pairs(body) -> list:
    if not all(isinstance(p, list) and len(p) == 2 for p in _array(body, "$dict")):
        raise ModelFileError("$dict must hold [key, value] pairs")
    return body


def _ints(body, tag) -> list:
    if not all(type(d) is int for d in _array(body, tag)):
        raise ModelFileError(f"{tag} must hold integers, got {body!r:.80}")
    return body


# ------------------------------------------------------------------------------------------ call_function targets

# Names that reach files, storages, hooks, code or global state: these anywhere in a name (CamelCase too)...
_DENIED_PARTS = ("file", "storage", "pickle", "save", "load", "hook", "library")
# ... and these as a whole word between underscores.
_DENIED_WORDS = frozenset({"compile", "exec", "eval", "import", "open", "system", "mmap", "share", "set", "seed",
                           "spawn"})
_DENIED_EXCEPTIONS = frozenset({"storage_offset"})  # a metadata read
_OPERATOR = frozenset({
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "invert", "and_", "or_", "xor",
    "lshift", "rshift", "matmul", "eq", "ne", "lt", "le", "gt", "ge", "not_", "truth", "is_", "is_not",
    "contains", "getitem", "setitem", "index", "concat", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod",
    "ipow", "iand", "ior", "ixor", "ilshift", "irshift", "imatmul",
})
_BUILTINS = frozenset({
    "getattr", "len", "abs", "min", "max", "sum", "round", "int", "float", "bool", "pow", "divmod", "range",
    "tuple", "list", "dict", "slice", "any", "all",
})
_EINOPS = frozenset({"rearrange", "reduce", "repeat", "einsum", "pack", "unpack", "parse_shape"})
_TORCH_PRIVATE = frozenset({"_assert"})  # what torch.fx itself emits for `assert`
_TORCH_CLASSES = frozenset({"Size", "device", "Generator"})  # the classes of torch a graph may construct
# Packages whose dataclasses a model may return (diffusers' UNet2DOutput): rebuilt from their own module.
OUTPUT_PACKAGES = ("diffusers", "transformers")
_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def denied(name: str) -> bool:
    if name in _DENIED_EXCEPTIONS:
        return False
    lower = name.lower()
    return any(part in lower for part in _DENIED_PARTS) or any(w in _DENIED_WORDS for w in lower.split("_"))


def public_name(name) -> bool:
    """An attribute/method name a saved graph may use: a plain public identifier with no file/code reach."""
    return isinstance(name, str) and name.isidentifier() and not name.startswith("_") and not denied(name)


def _namespaces() -> dict:
    # namespace -> (object, name filter); looked up lazily so torch submodules are not imported before use
    ns = {
        "torch": (torch, lambda n: public_name(n) or n in _TORCH_PRIVATE),
        "torch.nn.functional": (torch.nn.functional, public_name),
        "torch.linalg": (torch.linalg, public_name),
        "torch.fft": (torch.fft, public_name),
        "torch.special": (torch.special, public_name),
        "torch.Tensor": (torch.Tensor, public_name),
        "torch._C._nn": (torch._C._nn, public_name),
        "math": (math, public_name),
        "operator": (operator, _OPERATOR.__contains__),
        "builtins": (builtins, _BUILTINS.__contains__),
    }
    return ns


_REGISTERED: dict[str, object] = {}  # name -> function, for fxq's graph functions and the user's
_REGISTERED_IDS: dict[int, str] = {}
_INDEX: dict[int, tuple[object, str]] | None = None  # id(function) -> (function, "namespace:name")


def register_function(fn, name: str | None = None) -> None:
    """Let saved graphs call `fn` (a function of yours that a graph calls, e.g. through torch.fx.wrap): register it
    before fxq.save and, in the loading process, before fxq.load. Name: "module:qualname" unless given."""
    if not callable(fn):
        raise SaveError(f"register_function takes a function, got {type(fn).__name__}")
    name = name or f"{fn.__module__}:{fn.__qualname__}"
    if _REGISTERED.get(name, fn) is not fn:
        raise SaveError(f"another function is already registered as {name!r}; pass name=... to tell them apart")
    _REGISTERED[name] = fn
    _REGISTERED_IDS[id(fn)] = name


def _lookup(ns_obj, name):
    return ns_obj.get(name) if isinstance(ns_obj, dict) else getattr(ns_obj, name, None)


def _callable_in(ns: str, name: str, fn) -> bool:
    if not callable(fn) or isinstance(fn, type(torch)):
        return False
    return not (ns == "torch" and isinstance(fn, type) and name not in _TORCH_CLASSES)


def _index() -> dict:
    global _INDEX
    if _INDEX is None:
        index = {}
        for ns, (obj, allowed) in _namespaces().items():
            names = vars(obj) if ns == "torch" else (obj if isinstance(obj, dict) else dir(obj))
            for name in list(names):
                if not allowed(name):
                    continue
                fn = _lookup(obj, name)
                if _callable_in(ns, name, fn):
                    index.setdefault(id(fn), (fn, f"{ns}:{name}"))
        _INDEX = index
    return _INDEX


def function_name(fn, where: str) -> str:
    """The allow-listed name of a call_function target; SaveError when fxq.load could not resolve it back."""
    name = _REGISTERED_IDS.get(id(fn))
    if name is None and isinstance(fn, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = "torch.ops:" + (str(fn) if isinstance(fn, torch._ops.OpOverload) else fn._qualified_op_name
                              ).replace("::", ".")
    if name is None and isinstance(fn, type) and dataclasses.is_dataclass(fn):
        name = f"{fn.__module__}:{fn.__qualname__}"
    if name is None and getattr(fn, "__module__", "").startswith("fxq.backends."):
        name = f"{fn.__module__}:{fn.__qualname__}"
    if name is None and id(fn) in _index():
        name = _index()[id(fn)][1]
    if name is None and getattr(fn, "__module__", None) == "einops.einops":
        name = f"einops:{fn.__name__}"
    resolved = None
    if name is not None:
        try:
            resolved = resolve_function(name)
        except ModelFileError:
            pass
    if resolved is not fn:
        label = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        raise SaveError(
            f"{where} calls {label}, which fxq.load would not call (it resolves functions only from torch, "
            "operator, math, einops and fxq's own graph functions). If the graph should call it, register it with "
            "fxq.serialize.register_function(fn) before fxq.save and before fxq.load; or trace through it")
    return name


def resolve_function(name) -> object:
    """The function an allow-listed name stands for; ModelFileError for anything else."""
    if not isinstance(name, str) or name.count(":") != 1:
        raise ModelFileError(f"call target {name!r:.80} is not of the form 'namespace:name'")
    if name in _REGISTERED:
        return _REGISTERED[name]
    ns, attr = name.split(":")
    refused = ModelFileError(
        f"the graph calls {name!r}, which is not on fxq's allow-list (torch, torch.nn.functional, torch.ops, "
        "operator, math, einops, fxq graph functions); fxq.load never imports or calls anything else. If it is "
        "your function, register it with fxq.serialize.register_function before fxq.load")
    namespaces = _namespaces()
    if ns in namespaces:
        obj, allowed = namespaces[ns]
        fn = _lookup(obj, attr) if allowed(attr) else None
        if _callable_in(ns, attr, fn):
            return fn
        raise refused
    if ns == "torch.ops":
        return _resolve_op(attr, refused)
    if ns == "einops" and attr in _EINOPS:
        try:
            return getattr(importlib.import_module("einops"), attr)
        except ImportError:
            raise ModelFileError(f"the graph calls einops.{attr}: install einops to load it") from None
    if _MODULE_PATH.match(ns) and _MODULE_PATH.match(attr) and ns.startswith("fxq.backends."):
        fn = _import_attr(ns, attr, refused)
        if callable(fn) and not isinstance(fn, type):
            return fn
        raise refused
    if _MODULE_PATH.match(ns) and _MODULE_PATH.match(attr) and ns.split(".")[0] in OUTPUT_PACKAGES:
        cls = _import_attr(ns, attr, refused)
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            return cls
    raise refused


def _import_attr(module: str, qualname: str, refused: ModelFileError):
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise ModelFileError(f"the graph needs {module}.{qualname}, but {module} cannot be imported here ({e}); "
                             f"install the package it belongs to") from None
    for part in qualname.split("."):
        if part.startswith("_"):
            raise refused
        obj = getattr(obj, part, None)
    return obj


def _resolve_op(path: str, refused: ModelFileError):
    parts = path.split(".")
    if not 2 <= len(parts) <= 3 or not all(p.isidentifier() for p in parts) or any(denied(p) for p in parts):
        raise refused
    try:
        op = getattr(getattr(torch.ops, parts[0]), parts[1])
        if len(parts) == 3:
            op = getattr(op, parts[2])
    except (AttributeError, RuntimeError):
        raise ModelFileError(f"the graph calls torch.ops.{path}, which is not registered in this torch (a custom "
                             "op: import the library that defines it before fxq.load)") from None
    if not isinstance(op, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        raise refused
    return op


# ------------------------------------------------------------------------------------------------------- graphs

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
_PLACEHOLDER = re.compile(r"^\*{0,2}[A-Za-z_][A-Za-z0-9_]*$")
_ATTR_PATH = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
# Node metadata kept: fxq's own decisions and module paths (reports and messages read them). Not stack traces:
# they are most of the text and hold the saving machine's file paths.
_KEPT_META = ("fxq", "fxq_float")  # fxq_float: what stayed float and why (fxq.report.float_ops)


def check_call(op: str, target, args, kwargs, where: str, error=ModelFileError) -> None:
    """Refuse what a saved graph must not do: underscore or file-reaching method/attribute names, non-literal
    getattr names, and target strings or keyword names that are not plain identifiers (fx writes them into the
    code it generates and execs)."""
    bad = [k for k in kwargs if not (isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k))]
    if bad:
        raise error(f"{where} passes keyword argument(s) {bad!r:.80}, which are not identifiers")
    if op == "call_method" and not public_name(target):
        raise error(f"{where} calls method {target!r}, which a saved graph may not call (underscore names and "
                    "names that reach files, storages or hooks are refused)")
    if op == "call_function" and target is getattr:
        name = args[1] if len(args) > 1 else None
        if not public_name(name):
            raise error(f"{where} reads attribute {name!r} with getattr; a saved graph may read only public "
                        "attributes named by a literal string")
    if op == "placeholder" and not (isinstance(target, str) and _PLACEHOLDER.match(target)):
        raise error(f"{where} has input name {target!r}, not an identifier")
    if op in ("get_attr", "call_module") and not (
            isinstance(target, str) and _ATTR_PATH.match(target) and not any(
                p.startswith("__") for p in target.split("."))):
        raise error(f"{where} targets {target!r}, not a dotted path of plain names")


def _encode_meta(meta: dict) -> dict:
    out = {}
    for key in _KEPT_META:
        if key in meta:
            try:
                out[key] = encode_value(meta[key])
            except Unencodable:
                pass  # metadata only informs; a value with no JSON spelling is left behind
    stack = meta.get("nn_module_stack")
    if stack:
        out["nn_module_stack"] = [
            [str(k), *(  # (path, type) as symbolic_trace records it, or the path alone
                [str(v[0]), v[1] if isinstance(v[1], str) else f"{v[1].__module__}.{v[1].__qualname__}"]
                if isinstance(v, tuple) and len(v) == 2 else [str(v), ""])] for k, v in stack.items()]
    return out


def _decode_meta(node: fx.Node, meta) -> None:
    if not isinstance(meta, dict):
        raise ModelFileError(f"node {node.name}: metadata is not an object")
    for key in _KEPT_META:
        if key in meta:
            node.meta[key] = decode_value(meta[key])
    if "nn_module_stack" in meta:
        entries = meta["nn_module_stack"]
        if not all(isinstance(e, list) and len(e) == 3 and all(isinstance(s, str) for s in e) for e in entries):
            raise ModelFileError(f"node {node.name}: nn_module_stack is malformed")
        node.meta["nn_module_stack"] = collections.OrderedDict((k, (path, cls)) for k, path, cls in entries)


def encode_graph(graph: fx.Graph, where: str) -> dict:
    """JSON form of `graph`."""
    nodes = []
    for node in graph.nodes:
        at = f"{where}, node {node.name!r}"
        check_call(node.op, node.target, node.args, node.kwargs, at, SaveError)
        if node.op == "call_function":
            target = function_name(node.target, at)
        elif isinstance(node.target, str):
            target = node.target
        else:
            raise SaveError(f"{at}: a {node.op} node with target {node.target!r} cannot be saved")
        try:
            entry = {"op": node.op, "name": node.name, "target": target,
                     "args": encode_value(tuple(node.args)),
                     "kwargs": {k: encode_value(v) for k, v in node.kwargs.items()}}
        except Unencodable as e:
            raise SaveError(f"{at} takes an argument that fxq files cannot hold: {e}") from None
        meta = _encode_meta(node.meta)
        if meta:
            entry["meta"] = meta
        nodes.append(entry)
    return {"nodes": nodes, "codegen": _encode_codegen(graph, where)}


def _encode_codegen(graph: fx.Graph, where: str):
    codegen = graph._codegen
    if type(codegen) is fx.graph.CodeGen:
        return None
    if type(codegen) is fx.graph._PyTreeCodeGen:
        from torch.utils._pytree import treespec_dumps
        info = codegen.pytree_info
        return {"pytree": {"orig_args": list(info.orig_args),
                           "in_spec": treespec_dumps(info.in_spec) if info.in_spec else None,
                           "out_spec": treespec_dumps(info.out_spec) if info.out_spec else None}}
    raise SaveError(f"{where}: its graph uses code generator {type(codegen).__name__}, which fxq files do not hold")


def _decode_codegen(graph: fx.Graph, spec) -> None:
    if spec is None:
        return
    try:
        from torch.utils._pytree import treespec_loads
        info = spec["pytree"]
        in_spec = treespec_loads(info["in_spec"]) if info["in_spec"] else None
        out_spec = treespec_loads(info["out_spec"]) if info["out_spec"] else None
        orig_args = list(info["orig_args"])
    except Exception as e:  # treespec_loads raises whatever its JSON walk meets
        raise ModelFileError(f"the graph's input/output structure is malformed ({type(e).__name__}: {e})") \
            from None
    # fx writes the argument names and the input spec's dict keys into the code it generates and runs: each must
    # be a plain identifier, or a file could write code
    names = orig_args + (_kwarg_names(in_spec) if in_spec is not None else [])
    bad = [a for a in names if not (isinstance(a, str) and a.isidentifier() and not keyword.iskeyword(a)
                                    and not a.startswith("__"))]
    if bad:
        raise ModelFileError(f"the graph's input structure names {bad[0]!r:.60}, not a plain argument name")
    graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(orig_args, in_spec, out_spec))


def _kwarg_names(spec) -> list:
    """The keyword names fx spells out in the generated signature: those of an (args, kwargs) input spec's dict
    (nested structure stays in the spec object, not in the code)."""
    children = spec.children() if hasattr(spec, "children") else spec.children_specs
    if spec.type is tuple and len(children) == 2 and children[0].type is tuple and children[1].type is dict:
        return list(children[1].context)
    return []


def decode_graph(desc, where: str) -> fx.Graph:
    """Rebuild the fx.Graph of encode_graph's output. Nothing here runs: fx generates the code afterwards."""
    from fxq.tracing._proxy import ReplayTracer

    if not isinstance(desc, dict) or not isinstance(desc.get("nodes"), list):
        raise ModelFileError(f"{where}: the graph description has no node list")
    graph = fx.Graph()
    graph._tracer_cls = ReplayTracer  # as fxq.trace leaves it: what fx re-traces the code with on unpickling
    nodes: dict[str, fx.Node] = {}
    for i, entry in enumerate(desc["nodes"]):
        if not isinstance(entry, dict) or entry.get("op") not in _OPS or not isinstance(entry.get("name"), str):
            raise ModelFileError(f"{where}: node #{i} is malformed ({entry!r:.120})")
        op, name = entry["op"], entry["name"]
        at = f"{where}, node {name!r}"
        target = resolve_function(entry.get("target")) if op == "call_function" else entry.get("target")
        if not isinstance(target, str) and op != "call_function":
            raise ModelFileError(f"{at}: target {target!r} is not a string")
        args = decode_value(entry.get("args"), nodes)
        kwargs = entry.get("kwargs")
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ModelFileError(f"{at}: args/kwargs are malformed")
        kwargs = {k: decode_value(v, nodes) for k, v in kwargs.items()}
        check_call(op, target, args, kwargs, at)
        if name in nodes:
            raise ModelFileError(f"{where}: node name {name!r} appears twice")
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise ModelFileError(f"{at}: {name!r} is not a valid node name")
        nodes[name] = node
        if "meta" in entry:
            _decode_meta(node, entry["meta"])
    outputs = sum(n.op == "output" for n in graph.nodes)
    if outputs != 1:  # without one the model would return None
        raise ModelFileError(f"{where}: the graph has {outputs} output nodes, not one")
    _decode_codegen(graph, desc.get("codegen"))
    return graph


def _register_fxq_functions() -> None:
    from fxq.tracing import _guards
    from fxq.quant.quantizer import timestep_group
    from fxq.passes.decompose_attention import add_attn_mask
    # stable names, so files keep loading wherever the guards' (and the quantizer's, the passes') module moves
    for fn in (*_guards.GUARD_FUNCTIONS, timestep_group, add_attn_mask):
        register_function(fn, f"fxq:{fn.__name__}")


_register_fxq_functions()
