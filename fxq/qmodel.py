"""`fxq.QuantizedModel`, what `fxq.quantize` returns: the lowered graph, dressed as the original model so that it
drops in wherever the original was used (a diffusers pipeline's `pipe.unet` included).

- Called like the original (fxq.tracing.callspec): every parameter of its `forward`, positional or keyword, with its
  default when omitted; the timestep as a number or a tensor of shape [], [1] or [B]; `return_dict` either way.
  A call the graph cannot serve raises an `FxqError` that says why.
- Read like the original: `.config` (the original's own object), `.dtype`, `.device`, the original's plain
  attributes (JSON-able values: numbers, strings, None, lists, dicts), then the config's entries (as diffusers
  models allow `unet.in_channels`), all read-only. A submodule of the original reads as the lowered graph's module
  at that path where the graph has one (SDXL pipelines read `unet.add_embedding.linear_1.in_features`).
- `graph_module` is the lowered torch.fx GraphModule (`graph` its graph); `quant_config` the QuantConfig.
- `fxq_spec()` holds everything but the graph as JSON-able data; `QuantizedModel.from_spec` rebuilds from it
  (`from_fxq_spec` is the same for fxq.load, which attaches the graph afterwards).
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Mapping

import torch
import torch.fx as fx
from torch import nn

from fxq.tracing.callspec import CallSpec
from fxq import direct_calls
from fxq.config import QuantConfig
from fxq.errors import ConfigError, FxqError, FxqWarning, InputError, ModelFileError, ReadOnlyError

SPEC_FORMAT = "fxq.QuantizedModel"
SPEC_VERSION = 1
_MODULE_ATTRS = frozenset(vars(nn.Module()))


def _is_plain(value) -> bool:
    """JSON-able data: what a pipeline may read from a model's attributes and a file can hold."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _encode(value):
    """Plain data as JSON, tuples kept apart from lists."""
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


class FrozenConfig(Mapping):
    """A read-only mapping whose entries also read as attributes (like diffusers' FrozenDict): the config of a
    model rebuilt from its spec."""

    def __init__(self, data: Mapping):
        object.__setattr__(self, "_data", dict(data))

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __getattr__(self, name):
        if name.startswith("__") or name == "_data":
            raise AttributeError(name)
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"the config has no entry {name!r}") from None

    def __setattr__(self, name, value):
        raise ReadOnlyError(f"a quantized model's config is read-only (setting {name!r})")

    def __repr__(self):
        return f"FrozenConfig({self._data!r})"


def _config_dict(config) -> dict | None:
    if isinstance(config, Mapping):
        data = dict(config)
    elif hasattr(config, "to_dict"):
        data = config.to_dict()
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        data = dataclasses.asdict(config)
    else:
        data = None
    if data is None or not _is_plain(data):
        warnings.warn(f"the model's config ({type(config).__name__}) is not plain data; fxq_spec() leaves it out",
                      FxqWarning, stacklevel=3)
        return None
    return data


def _snapshot(model: nn.Module) -> tuple[dict, list, list]:
    """The original's plain attributes (class-level ones first, the instance's over them), its submodule names,
    and the names of its parameters and buffers."""
    attrs = {}
    for cls in reversed(type(model).__mro__):
        if cls in (object, nn.Module):
            continue
        for name, value in vars(cls).items():
            if not name.startswith("_") and _is_plain(value):
                attrs[name] = copy.deepcopy(value)
    for name, value in vars(model).items():
        if not name.startswith("_") and name not in _MODULE_ATTRS and _is_plain(value):
            attrs[name] = copy.deepcopy(value)
    submodules = []
    for name, module in model._modules.items():
        if module is None:
            attrs[name] = None  # a registered-None slot, e.g. diffusers' class_embedding
        else:
            submodules.append(name)
    tensors = [*model._parameters, *model._buffers]
    attrs.pop("config", None)
    return attrs, submodules, tensors


def _ordinary(obj, inference: bool = True, depth: int = 0):
    """obj with every tensor in it (through tuples, named tuples, lists, dicts and dataclasses such as diffusers'
    outputs) handed back as the original model would: a 4-d tensor that lowering left channels-last (the int8
    convs' layout, which the CPU fake-quant graph copies) in the default layout, so that `.view` works on it as on
    the original's; with `inference`, inference tensors replaced by ordinary clones, which take in-place updates
    and autograd outside inference mode."""
    if isinstance(obj, torch.Tensor):
        relaid = (obj.dim() == 4 and not obj.is_contiguous()
                  and obj.is_contiguous(memory_format=torch.channels_last))
        if inference and obj.is_inference():
            return obj.clone(memory_format=torch.contiguous_format if relaid else torch.preserve_format)
        return obj.contiguous() if relaid else obj
    if depth > 32:
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _ordinary(getattr(obj, f.name), inference, depth + 1)
                  for f in dataclasses.fields(obj) if f.init}
        new = dataclasses.replace(obj, **fields)
        if isinstance(obj, Mapping):  # diffusers' BaseOutput: a dataclass that is also an OrderedDict
            for key in obj:
                new[key] = fields[key] if key in fields else _ordinary(obj[key], inference, depth + 1)
        return new
    if isinstance(obj, dict):
        new = copy.copy(obj)
        for key, value in obj.items():
            new[key] = _ordinary(value, inference, depth + 1)
        return new
    if isinstance(obj, tuple):
        items = [_ordinary(v, inference, depth + 1) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        new = copy.copy(obj)
        new[:] = [_ordinary(v, inference, depth + 1) for v in obj]
        return new
    return obj


class QuantizedModel(nn.Module):
    """A quantized model that stands in for its original: see the module doc."""

    def __init__(self, graph_module: fx.GraphModule, call: CallSpec, quant_config: QuantConfig | None = None,
                 config=None, attributes: dict | None = None, submodules=(), tensors=()):
        super().__init__()
        self.graph_module = graph_module
        self.quant_config = quant_config
        d = self.__dict__
        d["_fxq_call"] = call
        d["_fxq_model_config"] = config
        d["_fxq_attributes"] = dict(attributes or {})
        d["_fxq_submodules"] = tuple(submodules)
        d["_fxq_tensors"] = tuple(tensors)
        self.train(False)  # made for inference, as its graph was traced (in eval mode)

    @classmethod
    def around(cls, model: nn.Module, graph_module: fx.GraphModule, call: CallSpec,
               quant_config: QuantConfig | None = None) -> QuantizedModel:
        """The quantized stand-in for `model`, whose lowered graph is `graph_module`."""
        try:
            config = getattr(model, "config", None)
        except Exception:  # noqa: BLE001  (a property that fails: the model has no usable config)
            config = None
        if isinstance(config, (nn.Module, torch.Tensor)):
            config = None
        attrs, submodules, tensors = _snapshot(model)
        return cls(graph_module, call, quant_config, config, attrs, submodules, tensors)

    # ------------------------------------------------------------------------------------------------ casts
    def _int8(self) -> bool:
        return self.quant_config is not None and self.quant_config.backend == "x86"

    def _apply(self, fn, *args, **kwargs):
        # every cast reaches here (.half(), .to(dtype), .type(), a parent module's cast): tried on a float32 and an
        # int8 tensor first, as the module's own would be
        if self._int8():
            for dtype in (torch.float32, torch.int8):
                out = fn(torch.zeros(1, dtype=dtype))
                if isinstance(out, torch.Tensor) and out.dtype != dtype:
                    raise ConfigError(f"an int8 (x86) model computes in float32 around its int8 kernels and cannot be "
                                      f"cast to {out.dtype} (its scales, biases and codes would change): keep it as it "
                                      "is and pass float32 inputs, or quantize with backend='fake' for other dtypes")
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        if mode and self._int8():
            raise ConfigError("an int8 (x86) model has no training mode: its kernels have no gradient and its idle "
                              "dropouts were lowered away; train the float model (or a backend='fake' one)")
        return super().train(mode)

    # ------------------------------------------------------------------------------------------------ calls
    def forward(self, *args, **kwargs):
        call = self.__dict__["_fxq_call"]
        args, kwargs, return_dict = call.canonical(args, kwargs)
        # int8 kernels have no gradient: run them in inference mode (no version counters or autograd metadata
        # for ~600 ops a call: ~1-2 ms at batch 1) and hand back ordinary tensors (clones of the small outputs)
        inference = self._int8() and not torch.is_inference_mode_enabled()
        try:
            if inference:
                with torch.inference_mode():
                    out = self._run_graph(args, kwargs)
            else:
                out = self._run_graph(args, kwargs)
            out = _ordinary(out, inference)
        except (FxqError, torch.cuda.OutOfMemoryError):
            raise
        except Exception as e:
            raise InputError(
                f"the quantized {call.model_class} failed on this call ({type(e).__name__}: {e}). It was quantized "
                f"for inputs like {call.describe_inputs()}; inputs the original model could not take with those "
                f"shapes and dtypes fail here too") from e
        return call.output(out, return_dict)

    def _run_graph(self, args, kwargs):
        gm = self.graph_module
        direct = direct_calls.current(self.__dict__, gm)
        return gm(*args, **kwargs) if direct is None else direct(*args, **kwargs)

    # ----------------------------------------------------------------------------------- what pipelines read
    @property
    def config(self):
        config = self.__dict__["_fxq_model_config"]
        if config is None:
            raise AttributeError(f"the original {self.__dict__['_fxq_call'].model_class} has no config")
        return config

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the model computes in: its first floating parameter's (as diffusers reports it)."""
        tensors = [*self.graph_module.parameters(), *self.graph_module.buffers()]
        return next((t.dtype for t in tensors if t.is_floating_point()), torch.get_default_dtype())

    @property
    def device(self) -> torch.device:
        return next((t.device for t in [*self.graph_module.parameters(), *self.graph_module.buffers()]),
                    torch.device("cpu"))

    @property
    def graph(self) -> fx.Graph:
        """The lowered graph (that of `graph_module`)."""
        return self.graph_module.graph

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of the wrapper itself
        except AttributeError:
            pass
        d = self.__dict__
        attrs = d.get("_fxq_attributes", {})
        if name in attrs:
            return copy.deepcopy(attrs[name])  # a copy: the mirror is read-only
        model_class = d["_fxq_call"].model_class if "_fxq_call" in d else "model"
        if name in d.get("_fxq_submodules", ()):
            try:
                return self.graph_module.get_submodule(name)
            except AttributeError:
                raise AttributeError(f"{model_class}'s submodule `{name}` has no counterpart in the quantized graph "
                                     f"(see .graph_module)") from None
        config = d.get("_fxq_model_config")
        if isinstance(config, Mapping) and not name.startswith("_") and name in config:
            return config[name]
        if name in d.get("_fxq_tensors", ()):
            raise AttributeError(f"{model_class}'s `{name}` is a parameter or buffer; the quantized model holds its "
                                 f"own in .graph_module")
        raise AttributeError(f"'{type(self).__name__}' object (quantized {model_class}) has no attribute '{name}'")

    def __setattr__(self, name: str, value) -> None:
        d = self.__dict__
        config = d.get("_fxq_model_config")
        mirrored = (name in d.get("_fxq_attributes", ()) or name in d.get("_fxq_submodules", ())
                    or name in ("config", "dtype", "device")
                    or (isinstance(config, Mapping) and name in config and not name.startswith("_")))
        if mirrored and name not in d:
            raise ReadOnlyError(f"`{name}` mirrors the original model's and is read-only on a quantized model; "
                                f"quantize again to change it")
        super().__setattr__(name, value)

    # ------------------------------------------------------------------------------------------ plain data
    def fxq_spec(self) -> dict:
        """Everything but the graph, as JSON-able data: the call signature, the original's config and plain
        attributes, the QuantConfig."""
        d = self.__dict__
        config = d["_fxq_model_config"]
        return {
            "format": SPEC_FORMAT,
            "version": SPEC_VERSION,
            "call": d["_fxq_call"].to_json(),
            "config": _encode(_config_dict(config)) if config is not None else None,
            "attributes": _encode(d["_fxq_attributes"]),
            "submodules": list(d["_fxq_submodules"]),
            "state_names": list(d["_fxq_tensors"]),
            "quant_config": _encode(self.quant_config.to_dict()) if self.quant_config is not None else None,
        }

    @classmethod
    def from_fxq_spec(cls, spec: dict) -> QuantizedModel:
        """fxq.load's protocol: the model without its graph, which the loader attaches as `graph_module`."""
        return cls.from_spec(None, spec)

    @classmethod
    def from_spec(cls, graph_module: fx.GraphModule | None, spec: dict) -> QuantizedModel:
        """The QuantizedModel that `fxq_spec()` describes, around `graph_module`. The config comes back as a
        FrozenConfig (a read-only mapping with attribute access), not the original's class."""
        if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
            raise ModelFileError("not an fxq.QuantizedModel description")
        if spec.get("version") != SPEC_VERSION:
            raise ModelFileError(f"quantized-model description version {spec.get('version')!r}; this fxq reads "
                                 f"version {SPEC_VERSION}: upgrade fxq to read newer files")
        try:
            call = CallSpec.from_json(spec["call"])
            config = FrozenConfig(_decode(spec["config"])) if spec["config"] is not None else None
            quant = QuantConfig(**_decode(spec["quant_config"])) if spec["quant_config"] is not None else None
            attributes = _decode(spec["attributes"])
            if not isinstance(attributes, dict):
                raise TypeError("attributes must be a mapping")
            return cls(graph_module, call, quant, config, attributes, spec["submodules"], spec["state_names"])
        except (FxqError, KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"damaged quantized-model description: {type(e).__name__}: {e}") from None
