"""Which modules an fxq file can rebuild, and how.

- torch's stock layers: the constructor arguments are read from the instance (an argument is the attribute of
  the same name; a `bias=True`-style flag is whether that tensor exists) and checked at save time by building
  the layer again from them and comparing (extra_repr, tensor names and shapes);
- plain containers (nn.Module, Sequential, ModuleList, ModuleDict) and GraphModules (see serialize.py);
- classes with fxq's module protocol:

      def fxq_spec(self) -> dict                   # constructor arguments, JSON-able (tuples, dtypes ok)
      @classmethod
      def from_fxq_spec(cls, spec) -> "cls"        # an instance whose tensors then load by load_state_dict

  Derived state (packed weights) is the class's business: rebuild it in `_load_from_state_dict`, keep it out of
  the state dict (non-persistent). Submodules of a protocol module are saved on their own and attached after
  `from_fxq_spec`, replacing whatever it made under the same names, so a wrapper around a GraphModule needs to
  save only its own plain state in `fxq_spec`.

A protocol class loads only when fxq can name it without importing arbitrary code: it is fxq's own (under the
`fxq.` package), or it was registered with `register_module` (in the saving and in the loading process).
"""

from __future__ import annotations

import importlib
import inspect
import re

import torch
import torch.fx as fx
from torch import nn

from fxq.errors import ModelFileError, SaveError

_STOCK_NAMES = (
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear", "Bilinear",
    "Identity", "Flatten", "Unflatten", "GroupNorm", "LayerNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d",
    "BatchNorm3d", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "ReLU", "ReLU6", "LeakyReLU", "PReLU",
    "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "Sigmoid", "Tanh", "Hardtanh", "Hardswish", "Hardsigmoid",
    "Softplus", "Softsign", "Softmax", "LogSoftmax", "Softmax2d", "GLU", "Dropout", "Dropout1d", "Dropout2d",
    "Dropout3d", "AlphaDropout", "Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d", "PixelShuffle",
    "PixelUnshuffle", "AvgPool1d", "AvgPool2d", "AvgPool3d", "MaxPool1d", "MaxPool2d", "MaxPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d",
    "AdaptiveMaxPool3d", "Embedding", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d",
    "ConstantPad3d", "ReflectionPad1d", "ReflectionPad2d", "ReflectionPad3d", "ReplicationPad1d",
    "ReplicationPad2d", "ReplicationPad3d", "CircularPad1d", "CircularPad2d", "CircularPad3d",
    "MultiheadAttention",
)
STOCK = {f"torch.nn.{n}": getattr(nn, n) for n in _STOCK_NAMES if hasattr(nn, n)}
_STOCK_KEYS = {cls: key for key, cls in STOCK.items()}
CONTAINERS = {"torch.nn.Module": nn.Module, "torch.nn.Sequential": nn.Sequential,
              "torch.nn.ModuleList": nn.ModuleList, "torch.nn.ModuleDict": nn.ModuleDict}
_CONTAINER_KEYS = {cls: key for key, cls in CONTAINERS.items()}

# Constructor arguments that only shape the initial values (the file's tensors replace them), or are deprecated
# spellings of others.
_INIT_ONLY = {nn.PReLU: ("init",), nn.Hardtanh: ("min_value", "max_value")}
# Arguments whose attribute has another name.
_READERS = {nn.MultiheadAttention: {"bias": lambda m: m.in_proj_bias is not None,
                                    "add_bias_kv": lambda m: m.bias_k is not None}}

# fxq's protocol classes under names that stay when a class moves to another module.
_FXQ_CLASSES = {"fxq:FakeQuantize": ("fxq.backends.fake", "FakeQuantize"),
                "fxq:QuantizedModel": ("fxq.qmodel", "QuantizedModel")}
_REGISTERED: dict[str, type] = {}
_MODULE_PATH = re.compile(r"^fxq(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def has_protocol(cls) -> bool:
    return callable(getattr(cls, "fxq_spec", None)) and callable(getattr(cls, "from_fxq_spec", None))


def register_module(cls, name: str | None = None) -> type:
    """Let fxq files hold modules of `cls` (which implements fxq_spec / from_fxq_spec): register it before
    fxq.save and, in the loading process, before fxq.load. Usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and has_protocol(cls)):
        raise SaveError(f"register_module takes an nn.Module class with fxq_spec() and from_fxq_spec(spec); got "
                        f"{cls!r}")
    name = name or f"{cls.__module__}:{cls.__qualname__}"
    if _REGISTERED.get(name, cls) is not cls:
        raise SaveError(f"another class is already registered as {name!r}; pass name=... to tell them apart")
    _REGISTERED[name] = cls
    return cls


def kind_of(module: nn.Module, path: str) -> tuple[str, str | None]:
    """("graph" | "container" | "stock" | "protocol", class name) of a module to save; SaveError if none fits."""
    cls = type(module)
    if isinstance(module, fx.GraphModule):
        return "graph", None
    if cls in _CONTAINER_KEYS:
        return "container", _CONTAINER_KEYS[cls]
    for name, registered in _REGISTERED.items():
        if registered is cls:
            return "protocol", name
    if cls in _STOCK_KEYS:
        return "stock", _STOCK_KEYS[cls]
    if has_protocol(cls):
        for name, (mod, qualname) in _FXQ_CLASSES.items():
            if cls.__module__ == mod and cls.__qualname__ == qualname:
                return "protocol", name
        if _MODULE_PATH.match(cls.__module__) and cls.__module__ != "fxq.__main__":
            return "protocol", f"{cls.__module__}:{cls.__qualname__}"
    where = f"module `{path}`" if path else "the model itself"
    raise SaveError(
        f"{where} is a {cls.__module__}.{cls.__qualname__}, which fxq.load could not rebuild: fxq files hold "
        "torch's stock layers, fxq's own modules and GraphModules, never code. Either let fxq trace through it (drop "
        "it from QuantConfig.leaf_modules), or give the class fxq_spec(self) -> dict and a classmethod "
        "from_fxq_spec(cls, spec) and register it with fxq.serialize.register_module(cls) before fxq.save and "
        "before fxq.load")


def resolve_class(kind: str, name, path: str) -> type:
    """The class a saved module entry names, from the registry only; ModelFileError otherwise."""
    table = CONTAINERS if kind == "container" else STOCK if kind == "stock" else None
    if table is not None and name in table:
        return table[name]
    if kind == "protocol" and isinstance(name, str):
        if name in _REGISTERED:
            return _REGISTERED[name]
        module, _, qualname = name.partition(":")
        module, qualname = _FXQ_CLASSES.get(name, (module, qualname))
        if _MODULE_PATH.match(module) and module != "fxq.__main__" and qualname.isidentifier():
            try:
                cls = getattr(importlib.import_module(module), qualname, None)
            except ImportError:
                cls = None
            if isinstance(cls, type) and issubclass(cls, nn.Module) and has_protocol(cls):
                return cls
    raise ModelFileError(
        f"module `{path}` is a {name!r} ({kind}), a class this fxq cannot rebuild: fxq.load builds only torch's "
        "stock layers, fxq's own modules and classes registered with fxq.serialize.register_module. If it is your "
        "class, register it before fxq.load; if it is fxq's, this file needs a newer fxq")


# ------------------------------------------------------------------------------------------------ stock layers

def _constructor_args(cls):
    skipped = _INIT_ONLY.get(cls, ())
    for name, p in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name in ("device", "dtype") or name.startswith("_") \
                or name in skipped:
            continue
        yield name, p


def stock_spec(module: nn.Module) -> dict:
    """Constructor arguments of a stock layer, read from the instance."""
    cls = type(module)
    readers = _READERS.get(cls, {})
    spec = {}
    for name, p in _constructor_args(cls):
        if name in readers:
            value = readers[name](module)
        elif hasattr(module, name):
            value = getattr(module, name)
            if isinstance(value, torch.Tensor) or (value is None and isinstance(p.default, bool)):
                value = value is not None  # `bias=True`: whether the tensor exists
        else:
            raise SaveError(f"internal: {cls.__name__} has no attribute for its constructor argument {name!r}")
        spec[name] = value
    return spec


def build_stock(cls, spec: dict, path: str) -> nn.Module:
    """A stock layer on the meta device (no memory, no random init): the file's tensors are assigned after."""
    if not isinstance(spec, dict) or not all(isinstance(k, str) for k in spec):
        raise ModelFileError(f"module `{path}`: its constructor arguments are malformed")
    try:
        with torch.device("meta"):
            return cls(**spec)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"module `{path}`: {cls.__name__}(**{spec}) fails: {e}") from None


def check_stock(module: nn.Module, spec: dict, path: str) -> None:
    """SaveError unless the arguments read from `module` build the same layer (a reader that missed something)."""
    probe = build_stock(type(module), spec, path)
    same = probe.extra_repr() == module.extra_repr() and {
        k: tuple(v.shape) for k, v in probe.state_dict().items()} == {
        k: tuple(v.shape) for k, v in module.state_dict().items()}
    if not same:
        raise SaveError(f"module `{path}` ({type(module).__name__}): the constructor arguments read from it ({spec}) "
                        "build a different layer; this layer configuration is not supported by fxq.save")


def build_protocol(cls, spec, path: str) -> nn.Module:
    try:
        module = cls.from_fxq_spec(spec)
    except Exception as e:  # the class's own validation, whatever it raises
        raise ModelFileError(f"module `{path}`: {cls.__qualname__}.from_fxq_spec rejects the saved spec "
                             f"({type(e).__name__}: {e})") from None
    if not isinstance(module, cls):
        raise ModelFileError(f"module `{path}`: {cls.__qualname__}.from_fxq_spec returned a "
                             f"{type(module).__name__}")
    return module
