"""Run-time guards for the shapes a traced graph was specialized on, and where in the user's code they came from.

When the model's Python turns a shape into a Python value (`if x.ndim == 4`, `len(t.shape)`, `range(x.shape[1])`),
the tracer takes the branch the example inputs took and adds a guard node that re-checks the same value at run
time. The guard functions here only compare Python values (ints, bools, dtypes), so a graph moved to CUDA carries
no CPU tensors through them.
"""

from __future__ import annotations

import ast
import dis
import functools
import inspect
import linecache
import operator
import os
import sys

import torch
from torch.fx.node import has_side_effect

from fxq.errors import SpecializationError

_HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_SKIPPED = (
    os.path.join(_HERE, "tracer.py"),
    os.path.join(_HERE, "_proxy.py"),
    os.path.join(_HERE, "_guards.py"),
    os.path.join(_TORCH, "fx") + os.sep,
    os.path.join(_TORCH, "nn", "modules", "module.py"),
    os.path.join(_TORCH, "overrides.py"),
    os.path.join(_TORCH, "utils", "_pytree.py"),
)

@has_side_effect
def check_specialized(observed, expected, what: str, traced_at: str) -> None:
    """Raise SpecializationError unless `observed` (computed from this call's inputs) equals the traced value."""
    if type(observed) is not type(expected) or observed != expected:
        raise SpecializationError(
            f"{what} is {observed!r} for this call but was {expected!r} when the model was traced, and the "
            f"graph holds only the code path for that value (specialized at {traced_at}). Trace again with "
            f"example inputs shaped like this call (fxq.trace / fxq.quantize example_inputs)."
        )


def input_kind(value) -> str:
    """What a model input is, as far as the traced graph cares: a tensor, a number, or another Python type."""
    if isinstance(value, torch.Tensor):
        return "tensor"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"
    return type(value).__name__


def dict_keys(value) -> tuple:
    return tuple(value.keys())


# The Python conversions a guard re-computes. Graph nodes call these rather than the builtins, so that fx can
# re-trace the generated code (it does when a GraphModule is unpickled) with them as opaque calls.
def as_bool(value) -> bool:
    return bool(value)


def as_len(value) -> int:
    return len(value)


def as_int(value) -> int:
    return int(value)


def as_float(value) -> float:
    return float(value)


def as_index(value) -> int:
    return operator.index(value)


def as_key(value):
    """What a guard compares once the model has hashed a value (a dict key, a set member): the value itself, a
    torch.Size as the tuple it equals (fx stores constants as plain tuples)."""
    return tuple(value) if isinstance(value, torch.Size) else value


# hash() specializes on the value itself, not on its hash: equal hashes do not make equal keys.
GRAPH_CONVERSIONS = {bool: as_bool, len: as_len, int: as_int, float: as_float, operator.index: as_index,
                     hash: as_key}
GUARD_FUNCTIONS = (check_specialized, input_kind, dict_keys, *GRAPH_CONVERSIONS.values())


def is_guard(node) -> bool:
    """A guard node or a node that only computes a value for a guard."""
    return node.op == "call_function" and node.target in GUARD_FUNCTIONS


# ---------------------------------------------------------------------------------------------- source locations


def _skipped(filename: str) -> bool:
    path = os.path.abspath(filename)
    return any(path == s or (s.endswith(os.sep) and path.startswith(s)) for s in _SKIPPED)


def is_internal(frame) -> bool:
    """Whether `frame` runs fxq's tracer or torch.fx itself rather than model code."""
    return _skipped(frame.f_code.co_filename)


def user_frame(depth: int = 1):
    """The innermost frame outside fxq's tracer and torch.fx: the model code that is running."""
    frame = sys._getframe(depth)
    while frame is not None and _skipped(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def describe_frame(frame) -> str:
    """`file.py:LINE` of a frame; inside torch itself, also the first model frame that called into torch."""
    if frame is None:
        return "<unknown location>"
    where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
    if os.path.abspath(frame.f_code.co_filename).startswith(_TORCH + os.sep):
        caller = frame.f_back
        while caller is not None and os.path.abspath(caller.f_code.co_filename).startswith(_TORCH + os.sep):
            caller = caller.f_back
        if caller is not None:
            where += f" (called from {caller.f_code.co_filename}:{caller.f_lineno})"
    return where


def describe_traceback(tb) -> str:
    """Location of the innermost model frame of an exception's traceback."""
    found = None
    while tb is not None:
        if not _skipped(tb.tb_frame.f_code.co_filename):
            found = tb
        tb = tb.tb_next
    return f"{found.tb_frame.f_code.co_filename}:{found.tb_lineno}" if found else "<unknown location>"


# ------------------------------------------------------------------------------------- value-neutral branches


@functools.lru_cache(maxsize=256)
def _if_statements(filename: str) -> tuple:
    source = "".join(linecache.getlines(filename))
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ()
    return tuple(node for node in ast.walk(tree) if isinstance(node, ast.If))


def _neutral_statement(stmt) -> bool:
    # `name = name.contiguous(...)` changes memory layout only; `pass` does nothing.
    if isinstance(stmt, ast.Pass):
        return True
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        return False
    call = stmt.value
    return (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and call.func.attr == "contiguous"
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == stmt.targets[0].id
    )


def in_value_neutral_if(frame) -> bool:
    """True when `frame` is evaluating the test of an `if` whose branches compute the same values.

    diffusers guards upsampling with `if x.shape[0] >= 64: x = x.contiguous()`; either outcome gives the same
    tensor values, so specializing on it would only make the graph fail at other batch sizes for no reason.
    """
    if frame is None:
        return False
    line = frame.f_lineno
    for node in _if_statements(frame.f_code.co_filename):
        if node.test.lineno <= line <= (node.test.end_lineno or node.test.lineno):
            return all(_neutral_statement(s) for s in node.body + node.orelse)
    return False


# ------------------------------------------------------------------------------------------------ cache calls

_CALL_OPS = frozenset({"CALL", "CALL_KW", "CALL_FUNCTION_EX", "PRECALL", "CALL_FUNCTION", "CALL_METHOD"})


def cache_called_at(frame):
    """The cache-wrapped function that `frame` is calling at its current instruction, or None.

    A cache is what `functools.lru_cache` / `functools.cache` make, or any wrapper that offers `cache_clear()`
    and `__wrapped__`. Hashing a traced value for such a call only builds the cache key, so the tracer need not
    specialize on it. The callee is read from the call's source text (Python >= 3.11 records each instruction's
    columns) and resolved through names and attributes without running any code; anything else gives None.
    """
    func = _called_expression(frame.f_code, frame.f_lasti)
    if func is None:
        return None
    try:
        obj = _resolve(func, frame)
    except (LookupError, AttributeError):
        return None
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if callable(getattr(obj, "cache_clear", None)) and hasattr(obj, "__wrapped__"):
        return obj
    return None


@functools.lru_cache(maxsize=4096)
def _called_expression(code, offset: int):
    """The callee expression (an ast node) of the call instruction at `offset` of `code`, or None."""
    instr = next((i for i in dis.get_instructions(code) if i.offset == offset), None)
    positions = getattr(instr, "positions", None)
    if instr is None or instr.opname not in _CALL_OPS or positions is None:
        return None
    first, last, start, end = positions.lineno, positions.end_lineno, positions.col_offset, positions.end_col_offset
    if None in (first, last, start, end):
        return None
    lines = [line.encode() for line in linecache.getlines(code.co_filename)[first - 1:last]]
    if len(lines) != last - first + 1:
        return None
    lines[-1] = lines[-1][:end]  # columns count UTF-8 bytes
    lines[0] = lines[0][start:]
    try:
        tree = ast.parse("(" + b"".join(lines).decode() + ")", mode="eval")
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None
    return tree.body.func if isinstance(tree.body, ast.Call) else None


def _resolve(expr, frame):
    """The object a name / attribute chain denotes in `frame`, looked up without calling descriptors."""
    if isinstance(expr, ast.Name):
        for scope in (frame.f_locals, frame.f_globals, frame.f_builtins):
            if expr.id in scope:
                return scope[expr.id]
        raise LookupError(expr.id)
    if isinstance(expr, ast.Attribute):
        return inspect.getattr_static(_resolve(expr.value, frame), expr.attr)
    raise LookupError(ast.dump(expr))


# --------------------------------------------------------------------------------- readable guard expressions

_BINARY = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.floordiv: "//", operator.truediv: "/",
    operator.mod: "%", operator.eq: "==", operator.ne: "!=", operator.lt: "<", operator.le: "<=",
    operator.gt: ">", operator.ge: ">=", operator.and_: "&", operator.or_: "|",
}
_CONVERSIONS = {as_bool: "bool", as_len: "len", as_int: "int", as_float: "float", as_index: "int", as_key: "hash"}


def conversion_name(conversion) -> str:
    """How messages spell a Python conversion (a key of GRAPH_CONVERSIONS): operator.index reads as int."""
    return _CONVERSIONS[GRAPH_CONVERSIONS[conversion]]


def _arg(a, depth: int, named) -> str:
    if isinstance(a, torch.fx.Node):
        return describe_node(a, named, depth)
    if isinstance(a, slice):
        parts = [_arg(p, depth, named) if p is not None else "" for p in (a.start, a.stop)]
        return ":".join(parts) + (f":{_arg(a.step, depth, named)}" if a.step is not None else "")
    if isinstance(a, tuple):
        return ", ".join(_arg(e, depth, named) for e in a)
    return repr(a)


def describe_node(node, named=frozenset(), depth: int = 0) -> str:
    """A Python-like expression for a (shape) node: `sample.shape[1]`, `len(t.shape)`, `add_3.ndim == 4`.

    Nodes in `named` (intermediate tensors) are shown by their node name rather than expanded.
    """
    if depth > 6 or (node in named and node.op != "placeholder"):
        return node.name
    d = depth + 1
    if node.op == "placeholder":
        return node.target
    if node.op == "call_function":
        if node.target is getattr:
            return f"{_arg(node.args[0], d, named)}.{node.args[1]}"
        if node.target is operator.getitem:
            return f"{_arg(node.args[0], d, named)}[{_arg(node.args[1], d, named)}]"
        if node.target in _BINARY and len(node.args) == 2:
            return f"({_arg(node.args[0], d, named)} {_BINARY[node.target]} {_arg(node.args[1], d, named)})"
        if node.target in _CONVERSIONS:
            return f"{_CONVERSIONS[node.target]}({_arg(node.args[0], d, named)})"
    if node.op == "call_method" and node.args:
        rest = ", ".join(_arg(a, d, named) for a in node.args[1:])
        return f"{_arg(node.args[0], d, named)}.{node.target}({rest})"
    return node.name
