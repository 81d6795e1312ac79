"""`fxq.save(qmodel, path)` / `fxq.load(path)`: a quantized model in one safetensors file, rebuilt without the
original model's class and without unpickling.

The file is plain safetensors (any safetensors reader lists its tensors); its metadata holds
  fxq_format  "fxq-model/1"
  fxq_model   a JSON description: fxq version, QuantConfig, and every module of the tree in pre-order: a
              GraphModule as its graph (serialize_graph.py), a stock layer or fxq module as class name plus
              constructor spec (serialize_modules.py), a container as its class; plus how each tensor is stored
  fxq_sha256  a digest of the description and of every tensor (name, dtype, shape, bytes), so a flipped byte is an
              error rather than a silently different model.
One file rather than a JSON sidecar: it cannot be separated from its tensors, and the digest covers both.

Tensors: state_dict tensors under their own names; integer tensors (int8 weights) as they are; torch quantized
tensors as their integer representation plus scales; a fake-quantized float weight (a node with
`meta["fxq"]["weight_bits"]`) as its integer codes plus per-channel scales when that reproduces it bit for bit
(fxq.quant.quantizer.exact_codes), so fake-quant files are as small as int8 ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings

import torch
import torch.fx as fx
from torch import nn

from fxq.quant import quantizer as Q
from fxq.errors import FxqError, FxqWarning, InputError, ModelFileError, SaveError
from fxq.eval.images import usable_device
from fxq.io.serialize_graph import (
    Unencodable, decode_graph, decode_value, encode_graph, encode_value, register_function,
)
from fxq.io.serialize_modules import (
    build_protocol, build_stock, check_stock, kind_of, register_module, resolve_class, stock_spec,
)

__all__ = ["save", "load", "register_module", "register_function", "FORMAT", "VERSION"]

FORMAT, VERSION = "fxq-model", 1
_NAME = re.compile(r"^(?!__)[A-Za-z0-9_]+$")  # one module/attribute name (no dunders: `__class__`, `__dict__`)


def _digest(text: str, tensors: dict) -> str:
    h = hashlib.sha256(text.encode())
    for key in sorted(tensors):
        t = tensors[key].detach()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------------- saving

class _Writer:
    """Collects the description and the tensors of one model."""

    def __init__(self):
        self.modules: list[dict] = []
        self.table: dict[str, dict] = {}  # tensor name -> how it is stored
        self.stored: dict[str, torch.Tensor] = {}  # safetensors key -> tensor
        self.first_name: dict[tuple, str] = {}  # tensor identity -> first name it was stored under
        self.code_bits: dict[str, int] = {}  # fake-quantized weights: tensor name -> bit-width
        self.attributes: dict[str, dict] = {}
        self.config = None

    def walk(self, module: nn.Module, path: str, seen: dict) -> None:
        if id(module) in seen:  # one module under two names stays one module
            self.modules.append({"path": path, "alias": seen[id(module)]})
            return
        seen[id(module)] = path
        kind, cls_name = kind_of(module, path)
        entry = {"path": path, "kind": kind, "training": bool(module.training)}
        if cls_name is not None:
            entry["class"] = cls_name
        if kind == "graph":
            entry.update(self._graph(module, path))
        elif kind == "stock":
            spec = stock_spec(module)
            check_stock(module, spec, path)
            entry["spec"] = self._spec(spec, path)
        elif kind == "protocol":
            spec = module.fxq_spec()
            if not isinstance(spec, dict):
                raise SaveError(f"module `{path}`: {type(module).__qualname__}.fxq_spec() returned a "
                                f"{type(spec).__name__}, not a dict")
            entry["spec"] = self._spec(spec, path)
        if kind in ("graph", "container"):
            entry["direct"] = {
                "params": [n for n, p in module._parameters.items() if p is not None],
                "buffers": [n for n, b in module._buffers.items() if b is not None],
                "nonpersistent": sorted(module._non_persistent_buffers_set),
            }
        self.modules.append(entry)
        if kind == "stock":  # a stock layer builds its own submodules (MultiheadAttention.out_proj)
            return
        for name, child in module._modules.items():
            child_path = f"{path}.{name}" if path else name
            if child is None:
                self.modules.append({"path": child_path, "kind": "none"})
            else:
                self.walk(child, child_path, seen)

    def _spec(self, spec: dict, path: str):
        try:
            return encode_value(spec)
        except Unencodable as e:
            raise SaveError(f"module `{path}`: its constructor spec holds {e}, which JSON cannot hold") from None

    def _graph(self, gm: fx.GraphModule, path: str) -> dict:
        prefix = f"{path}." if path else ""
        where = f"graph `{path}`" if path else "the graph"
        for node in gm.graph.nodes:
            meta = node.meta.get("fxq")
            if node.op == "call_module" and isinstance(meta, dict) and meta.get("weight_bits"):
                self.code_bits[f"{prefix}{node.target}.weight"] = meta["weight_bits"]
            if node.op == "get_attr":
                self._get_attr(gm, node.target, prefix, where)
        meta = {}
        for key, value in gm.meta.items():
            try:
                meta[key] = encode_value(value)
            except Unencodable as e:
                warnings.warn(f"{where}: meta[{key!r}] holds {e}, which an fxq file cannot hold; it is not saved",
                              FxqWarning, stacklevel=4)
        from fxq.config import QuantConfig
        if self.config is None and isinstance(gm.meta.get("fxq_config"), QuantConfig):
            self.config = gm.meta["fxq_config"].to_dict()
        return {"class_name": type(gm).__name__, "graph": encode_graph(gm.graph, where), "meta": meta}

    def _get_attr(self, gm, target: str, prefix: str, where: str) -> None:
        owner_path, _, attr = target.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path)
            value = getattr(owner, attr)
        except AttributeError:
            raise SaveError(f"{where} reads attribute {target!r}, which the module does not have") from None
        if isinstance(value, nn.Module) or attr in owner._parameters or attr in owner._buffers \
                or attr in getattr(owner, "_fxq_state_tensors", ()):  # (an int8 weight held packed: state_dict's)
            return
        full = prefix + target
        if isinstance(value, torch.Tensor):
            self.tensor(full, value, codes=False)
            self.attributes[full] = {"tensor": True}
            return
        try:
            self.attributes[full] = {"value": encode_value(value)}
        except Unencodable as e:
            raise SaveError(f"{where} reads attribute {target!r}, {e}, which an fxq file cannot hold") from None

    def tensor(self, name: str, t: torch.Tensor, codes: bool = True) -> None:
        """Store one tensor under `name` (once per tensor: another name for it becomes a reference)."""
        t = t.detach()
        if t.is_sparse or t.layout != torch.strided and not t.is_quantized:
            raise SaveError(f"tensor {name} has layout {t.layout}; fxq files hold dense tensors (keep derived "
                            "tensors such as packed weights out of the state dict: non-persistent)")
        if t.is_meta:
            raise SaveError(f"tensor {name} is on the meta device: it holds no values to save")
        identity = (t.device, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(),
                    t.untyped_storage().data_ptr() if not t.is_quantized else id(t))
        if identity in self.first_name:
            self.table[name] = {"same": self.first_name[identity]}
            return
        self.first_name[identity] = name
        if t.is_quantized:
            self.table[name] = self._quantized(name, t)
            return
        bits = self.code_bits.get(name) if codes else None
        if bits is not None and t.dim() >= 2:
            cpu = t.cpu()
            for axis in (0, 1):  # conv/linear weights are per output channel: axis 0, transposed convs axis 1
                found = Q.exact_codes(cpu, bits, axis)
                if found is not None:
                    c, qp = found
                    self.table[name] = {"codes": self._put(f"{name}:codes", c), "scale": self._put(
                        f"{name}:scale", qp.scale), "axis": axis, "bits": bits}
                    return
        self.table[name] = {"data": self._put(name, t)}

    def _quantized(self, name: str, t: torch.Tensor) -> dict:
        scheme = t.qscheme()
        record = {"qint": self._put(f"{name}:int", t.int_repr()), "dtype": _dtype_name(t.dtype)}
        if scheme == torch.per_tensor_affine:
            record.update(scale=float(t.q_scale()), zero_point=int(t.q_zero_point()))
        elif scheme in (torch.per_channel_affine, torch.per_channel_affine_float_qparams):
            record.update(scales=self._put(f"{name}:scales", t.q_per_channel_scales()),
                          zero_points=self._put(f"{name}:zero_points", t.q_per_channel_zero_points()),
                          axis=int(t.q_per_channel_axis()), float_qparams=scheme != torch.per_channel_affine)
        else:
            raise SaveError(f"tensor {name} is quantized with {scheme}, which fxq files do not hold")
        return record

    def _put(self, key: str, t: torch.Tensor) -> str:
        self.stored[key] = t.detach().cpu().contiguous()
        return key


def save(model: nn.Module, path) -> None:
    """Write `model` (what fxq.quantize returns, or a module tree of GraphModules, stock layers and fxq modules)
    to `path` as one safetensors file that fxq.load rebuilds. The model is not modified. Raises SaveError naming
    any part that a file cannot hold (a module of your own class, a function outside fxq's allow-list)."""
    from fxq import __version__

    if not isinstance(model, nn.Module):
        raise SaveError(f"fxq.save takes a torch.nn.Module, got {type(model).__name__}")
    w = _Writer()
    w.walk(model, "", {})
    state, extra = {}, {}
    for name, value in model.state_dict(keep_vars=True).items():
        if isinstance(value, torch.Tensor):
            w.tensor(name, value)
            state[name] = True
        else:  # get_extra_state()
            try:
                extra[name] = encode_value(value)
            except Unencodable as e:
                raise SaveError(f"{name}: extra state {e} cannot be held by an fxq file") from None
    for entry in w.modules:  # non-persistent buffers of GraphModules/containers: nobody else rebuilds them
        for b in entry.get("direct", {}).get("nonpersistent", ()):
            name = f"{entry['path']}.{b}" if entry["path"] else b
            w.tensor(name, model.get_buffer(name))
    desc = {
        "format": f"{FORMAT}/{VERSION}", "fxq_version": __version__, "config": w.config, "modules": w.modules,
        "state": list(state), "extra_state": extra, "attributes": w.attributes, "tensors": w.table,
        "frozen": [n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad],
    }
    text = json.dumps(desc, separators=(",", ":"), allow_nan=False)
    metadata = {"fxq_format": desc["format"], "fxq_model": text, "fxq_sha256": _digest(text, w.stored)}
    path = os.path.realpath(_path_arg(path, "save"))  # a symlink is written through, to its target
    if os.path.isdir(path):
        raise SaveError(f"fxq.save writes one file; {path!r} is a directory: pass a file path such as "
                        f"{os.path.join(path, 'model.fxq.safetensors')!r}")
    if os.path.exists(path) and not os.path.isfile(path):  # a device, a FIFO: the rename would replace it
        raise SaveError(f"fxq.save writes a regular file; {path!r} is a special file (a device or a pipe)")
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:  # written whole, then renamed: a crash never leaves a half file under `path`
        os.makedirs(directory, exist_ok=True)
        _write_safetensors(tmp, w.stored, metadata)
        os.replace(tmp, path)
    except OSError as e:
        raise SaveError(f"fxq.save cannot write {path!r}: {e.strerror or e}; pass a path in a directory you can "
                        "write to") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _write_safetensors(path: str, tensors: dict, metadata: dict) -> None:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data), written here rather than
    by safetensors.save_file, whose metadata order changes from call to call: the same model gives the same bytes."""
    header, offset = {"__metadata__": metadata}, 0
    for key in sorted(tensors):
        t = tensors[key]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise SaveError(f"tensor {key} has dtype {t.dtype}, which safetensors does not hold")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for key in sorted(tensors):
            f.write(tensors[key].reshape(-1).view(torch.uint8).numpy().data)


def _path_arg(path, verb: str) -> str:
    """A file path argument as a string, or the FxqError of the call (save: SaveError, load: InputError)."""
    error = SaveError if verb == "save" else InputError
    try:
        path = os.fspath(path)
    except TypeError:
        raise error(f"fxq.{verb} takes a file path (str or os.PathLike), got {type(path).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not path or "\0" in path:
        raise error(f"fxq.{verb} takes a file path; {path!r} is not one")
    return path


# ------------------------------------------------------------------------------------------------------ loading

def _read(path: str) -> tuple[dict, bytes]:
    """(safetensors metadata, file bytes), or ModelFileError saying why the file is not an fxq model."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) < 8:
        raise ModelFileError(f"{path} is {len(data)} bytes long: not a safetensors file (truncated or empty)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ModelFileError(f"{path} is truncated or not a safetensors file: its header announces {n} bytes, "
                             f"the file holds {len(data) - 8} after the length field")
    try:
        header = json.loads(data[8:8 + n])
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict):
            raise TypeError("metadata is not an object")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError, RecursionError) as e:
        raise ModelFileError(f"{path} has a damaged header or is not a safetensors file ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
    fmt = meta.get("fxq_format")
    hint = "fxq.load reads files written by fxq.save"
    if fmt is None:
        raise ModelFileError(f"{path} is not an fxq model file: a safetensors file without fxq metadata; {hint}")
    if isinstance(fmt, str) and fmt.startswith("ddpm-unet/"):
        raise ModelFileError(f"{path} holds DDPMUNet float weights ({fmt}), not a quantized model: load it with "
                             "fxq.models.pretrained(weights_path=...)")
    match = re.fullmatch(rf"{FORMAT}/(\d+)", fmt) if isinstance(fmt, str) else None
    if match is None:
        raise ModelFileError(f"{path} has format {fmt!r}, not {FORMAT!r}; {hint}")
    if int(match.group(1)) > VERSION:
        raise ModelFileError(f"{path} was written by a newer fxq (format {fmt}; this fxq reads up to "
                             f"{FORMAT}/{VERSION}): upgrade fxq to load it")
    return meta, data


def load(path, device="cpu") -> nn.Module:
    """The model that fxq.save wrote to `path`, on `device`, with the same outputs bit for bit.

    Nothing in the file is executed or unpickled: modules are built from fxq's registry, graph calls resolve only
    from its allow-list (see fxq.io.serialize_graph). Raises ModelFileError for a file that is not an fxq model, was
    written by a newer fxq, or was damaged."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_bytes

    path = _path_arg(path, "load")
    device = usable_device(device)
    meta, data = _read(path)
    try:
        tensors = load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError, TypeError) as e:
        raise ModelFileError(f"{path} is damaged or truncated: its tensors do not read ({e})") from None
    text = meta.get("fxq_model")
    if not isinstance(text, str) or meta.get("fxq_sha256") != _digest(text, tensors):
        raise ModelFileError(f"{path} is damaged: its checksum does not match its contents (bytes changed after "
                             "fxq.save wrote it, or an incomplete copy); save the model again")
    try:
        desc = json.loads(text)
        if not isinstance(desc, dict) or desc.get("format") != meta["fxq_format"]:
            raise ValueError("the description does not match the file's format")
        model = _Reader(desc, tensors, path).build()
        if getattr(model, "_int8", lambda: False)() and model.training:  # a file from before int8 had no train mode
            model.train(False)
    except ModelFileError:
        raise
    except (FxqError, KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, SyntaxError,
            RecursionError) as e:  # (SyntaxError: code fx generates from a malformed graph)
        raise ModelFileError(f"{path}: the model description is malformed ({type(e).__name__}: {e})") from None
    return model.to(device)


class _Reader:
    def __init__(self, desc: dict, stored: dict, path: str):
        self.desc, self.stored, self.path = desc, stored, path
        self.tensors = {name: self._tensor(name, rec) for name, rec in desc["tensors"].items()
                        if "same" not in rec}
        for name, rec in desc["tensors"].items():
            if "same" in rec:
                if rec["same"] not in self.tensors:
                    raise ModelFileError(f"{path}: tensor {name} refers to {rec['same']!r}, which is not stored")
                self.tensors[name] = self.tensors[rec["same"]]
        self.entries = {}
        self.children: dict[str, list[str]] = {}
        for e in desc["modules"]:
            p = e["path"]
            if not isinstance(p, str) or p in self.entries or (p and not all(_NAME.match(a) for a in p.split("."))):
                raise ModelFileError(f"{path}: module path {p!r} is invalid or repeated")
            if p:
                parent = p.rpartition(".")[0]
                if parent not in self.entries:
                    raise ModelFileError(f"{path}: module `{p}` comes before its parent")
                self.children[parent].append(p)
            self.entries[p] = e
            self.children[p] = []
        if "" not in self.entries:
            raise ModelFileError(f"{path}: the description holds no modules")
        self.built: dict[str, nn.Module | None] = {}
        self.building: set[str] = set()

    def _get(self, key) -> torch.Tensor:
        if key not in self.stored:
            raise ModelFileError(f"{self.path} lacks tensor {key!r}")
        return self.stored[key]

    def _tensor(self, name: str, rec: dict) -> torch.Tensor:
        if "data" in rec:
            return self._get(rec["data"])
        if "codes" in rec:
            codes, scale = self._get(rec["codes"]), self._get(rec["scale"])
            qp = Q.QParams(scale, torch.zeros_like(scale), int(rec["bits"]), True, int(rec["axis"]))
            if codes.dtype not in (torch.int8, torch.int16) or not scale.is_floating_point() or \
                    not 0 <= qp.axis < codes.dim() or scale.shape != (codes.shape[qp.axis],):
                raise ModelFileError(f"{self.path}: the integer codes of {name} do not fit their scales")
            return Q.dequantize(codes.to(scale.dtype), qp)
        if "qint" in rec:
            q = self._get(rec["qint"])
            if "scale" in rec:
                t = torch._make_per_tensor_quantized_tensor(q, float(rec["scale"]), int(rec["zero_point"]))
            else:
                t = torch._make_per_channel_quantized_tensor(
                    q, self._get(rec["scales"]), self._get(rec["zero_points"]), int(rec["axis"]))
            if _dtype_name(t.dtype) != rec["dtype"]:
                raise ModelFileError(f"{self.path}: quantized tensor {name} reads back as {t.dtype}")
            return t
        raise ModelFileError(f"{self.path}: tensor {name} has no stored form ({rec!r:.80})")

    def build(self) -> nn.Module:
        root = self._module("")
        if root is None:
            raise ModelFileError(f"{self.path}: the model is empty")
        state = {}
        for name in self.desc["state"]:
            if name not in self.tensors:
                raise ModelFileError(f"{self.path} lacks the tensor of {name}")
            state[name] = self.tensors[name]
        state.update({k: decode_value(v) for k, v in self.desc["extra_state"].items()})
        try:
            root.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ModelFileError(f"{self.path}: the saved tensors do not fit the saved modules: {e}") from None
        for name, rec in self.desc["attributes"].items():  # plain attributes that graphs read with get_attr
            owner_path, _, attr = name.rpartition(".")
            owner = root.get_submodule(owner_path)
            if not _NAME.match(attr) or hasattr(owner, attr):
                raise ModelFileError(f"{self.path}: attribute {name!r} is not a free attribute name")
            value = self.tensors.get(name) if rec.get("tensor") else decode_value(rec["value"])
            if value is None and rec.get("tensor"):
                raise ModelFileError(f"{self.path} lacks the tensor of attribute {name}")
            setattr(owner, attr, value)
        frozen = set(self.desc["frozen"])
        for name, p in root.named_parameters(remove_duplicate=False):
            p.requires_grad_(name not in frozen)
        for p, e in self.entries.items():
            if "training" in e and self.built.get(p) is not None:
                if e["kind"] == "stock":  # its own submodules (MultiheadAttention.out_proj) follow it
                    self.built[p].train(bool(e["training"]))
                else:
                    self.built[p].training = bool(e["training"])
        for name, t in [*root.named_parameters(), *root.named_buffers()]:
            if t.is_meta:
                raise ModelFileError(f"{self.path}: {name} has no saved value")
        for m in root.modules():
            if isinstance(m, fx.GraphModule):
                m.graph.lint()
        return root

    def _module(self, path: str) -> nn.Module | None:
        if path in self.built:
            return self.built[path]
        if path in self.building:
            raise ModelFileError(f"{self.path}: module `{path}` contains itself")
        self.building.add(path)
        e = self.entries.get(path)
        if e is None:
            raise ModelFileError(f"{self.path}: module `{path}` is referred to but not described")
        if "alias" in e:
            module = self._module(e["alias"])
        elif e["kind"] == "none":
            module = None
        else:
            kids = [(p.rpartition(".")[2], self._module(p)) for p in self.children[path]]
            module = self._construct(e, path)
            if e["kind"] == "stock" and kids:
                raise ModelFileError(f"{self.path}: stock layer `{path}` has saved submodules")
            for name, kid in kids:
                if kid is None:
                    module._modules[name] = None
                else:
                    setattr(module, name, kid)
            if e["kind"] in ("graph", "container"):
                self._direct(module, e["direct"], path)
            if e["kind"] == "graph":
                module.graph = decode_graph(e["graph"], f"graph `{path}`" if path else "the graph")
                module.meta = {k: decode_value(v) for k, v in e["meta"].items()}
        self.building.discard(path)
        self.built[path] = module
        return module

    def _construct(self, e: dict, path: str) -> nn.Module:
        kind = e["kind"]
        if kind == "graph":
            class_name = e["class_name"]
            if not (isinstance(class_name, str) and class_name.isidentifier()):
                raise ModelFileError(f"{self.path}: graph `{path}` has class name {class_name!r}")
            from fxq.tracing._proxy import ReplayTracer  # GraphModule keeps its graph's tracer class only when built with it
            return fx.GraphModule(nn.Module(), fx.Graph(tracer_cls=ReplayTracer), class_name=class_name)
        if kind not in ("container", "stock", "protocol"):
            raise ModelFileError(f"{self.path}: module `{path}` is of unknown kind {kind!r}")
        cls = resolve_class(kind, e.get("class"), path)
        if kind == "container":
            return cls()
        spec = decode_value(e["spec"])
        return build_stock(cls, spec, path) if kind == "stock" else build_protocol(cls, spec, path)

    def _direct(self, module: nn.Module, direct: dict, path: str) -> None:
        """Tensors held by a GraphModule or container itself (no constructor makes their slots)."""
        prefix = f"{path}." if path else ""
        nonpersistent = set(direct["nonpersistent"])
        frozen = set(self.desc["frozen"])
        for kind in ("params", "buffers"):
            for name in direct[kind]:
                if not (isinstance(name, str) and _NAME.match(name)) or prefix + name not in self.tensors:
                    raise ModelFileError(f"{self.path}: {prefix}{name} is not a valid, saved tensor")
                t = self.tensors[prefix + name]
                if kind == "params":
                    module.register_parameter(name, nn.Parameter(t, requires_grad=prefix + name not in frozen))
                else:
                    module.register_buffer(name, t, persistent=name not in nonpersistent)
