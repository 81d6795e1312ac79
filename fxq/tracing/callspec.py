"""How a quantized model is called: the original `forward`'s signature, bound exactly as the original binds it,
reduced to the one form the traced graph was made for.

`fxq.quantize` puts the example inputs and every calibration item through `CallSpec.canonical`, and
`QuantizedModel` puts every call through it, so the graph always sees the same form:
- the graph's inputs are the parameters the example gave with a value other than their default; any other
  parameter must hold its default (the graph holds only that code path), else InputError;
- the timestep (found by `QuantConfig.timestep_arg`) becomes a 1-D tensor with one value per sample, whether the
  caller passed a Python number, a 0-d tensor, a `[1]` tensor or a `[B]` tensor (diffusers' schedulers pass 0-d
  tensors), in the dtype the example used;
- `return_dict` (the diffusers / transformers convention) is traced as True; `return_dict=False` turns the
  output into its `to_tuple()` form, which fxq.quantize checked against the float model's own tuple output.
Everything here is plain data (`to_json` / `from_json`), so a saved model can rebuild it without the model's class.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
from torch.utils._pytree import tree_flatten

from fxq.errors import ConfigError, FxqError, FxqWarning, InputError
from fxq.tracing.inputs import as_args_kwargs

TIMESTEP_NAMES = ("t", "timestep", "timesteps", "time")
RETURN_DICT = "return_dict"
_P = inspect.Parameter
_KINDS = {k.name: k for k in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD, _P.VAR_POSITIONAL, _P.KEYWORD_ONLY,
                              _P.VAR_KEYWORD)}
_JSON_SCALARS = (type(None), bool, int, float, str)


def timestep_input(names: list[str], timestep_arg, timestep_groups: int = 1,
                   warn_stacklevel: int | None = None) -> str | None:
    """Which of a model's inputs (in order) carries the diffusion timestep (see QuantConfig.timestep_arg).

    "auto" finds an input by name; failing that it guesses the second input — with an FxqWarning when
    `warn_stacklevel` is given (counted from the caller) — and refuses the guess (ConfigError) when
    `timestep_groups` > 1, where a wrong input would pick ranges silently wrong.
    """
    if timestep_arg is None:
        return None
    if isinstance(timestep_arg, int):
        if not 0 <= timestep_arg < len(names):
            raise ConfigError(f"timestep_arg={timestep_arg}: the model has {len(names)} inputs {names}")
        return names[timestep_arg]
    if timestep_arg != "auto":
        if timestep_arg not in names:
            raise ConfigError(f"timestep_arg={timestep_arg!r} is not an input of the model; inputs: {names}")
        return timestep_arg
    for name in names:
        if name in TIMESTEP_NAMES:
            return name
    if len(names) < 2:
        return None
    guess = names[1]
    if timestep_groups > 1:
        raise ConfigError(
            f"timestep_groups={timestep_groups} needs the timestep input, and no input is named "
            f"{' / '.join(TIMESTEP_NAMES)} (inputs: {names}): name it, e.g. QuantConfig(timestep_arg=\"{guess}\")")
    if warn_stacklevel is not None:
        warnings.warn(
            f"timestep_arg='auto' found no input named {' / '.join(TIMESTEP_NAMES)} and takes the second input "
            f"`{guess}` for the timestep; say so with QuantConfig(timestep_arg=\"{guess}\"), or timestep_arg=None "
            "if the model has no timestep input", FxqWarning, stacklevel=warn_stacklevel + 1)
    return guess


def describe(value) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "floating" if dtype.is_floating_point else "integer"


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise InputError(f"{name!r} is not a torch dtype")
    return value


def _is_default(value, param: inspect.Parameter) -> bool:
    default = param.default
    if default is _P.empty:
        return False
    if value is default:
        return True
    if torch.is_tensor(value) or torch.is_tensor(default) or type(value) is not type(default):
        return False
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001  (an exotic __eq__: then it is not the default)
        return False


class _Unrepresentable:
    """A default that could not be written as JSON: calls must leave that parameter out."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return self.text


def _param_json(p: inspect.Parameter) -> dict:
    out = {"name": p.name, "kind": p.kind.name}
    if p.default is not _P.empty:
        if isinstance(p.default, _JSON_SCALARS):
            out["default"] = p.default
        else:
            out["default_repr"] = repr(p.default)
    return out


def _param_from_json(d: dict) -> inspect.Parameter:
    kind = _KINDS.get(d.get("kind"))
    if kind is None or not isinstance(d.get("name"), str):
        raise InputError(f"not a parameter description: {d!r}")
    if "default" in d:
        return _P(d["name"], kind, default=d["default"])
    if "default_repr" in d:
        return _P(d["name"], kind, default=_Unrepresentable(str(d["default_repr"])))
    return _P(d["name"], kind)


class CallSpec:
    """The call signature of a traced model and the one form its graph takes inputs in (see the module doc)."""

    def __init__(self, signature: inspect.Signature, inputs, model_class: str = "model", timestep: str | None = None,
                 timestep_dtype: torch.dtype | None = None, batch_input: str | None = None, tensors=None,
                 tuple_len: int | None = None):
        self.signature = signature
        self.inputs = tuple(inputs)  # graph inputs, in signature order
        self.model_class = model_class
        self.timestep = timestep  # the timestep input (None: the model has none)
        self.timestep_dtype = timestep_dtype  # its dtype after normalization; None: passed as it comes
        self.batch_input = batch_input  # the input whose leading size is the batch size B
        self.tensors = dict(tensors or {})  # input -> its leaves in the example: None or {"shape", "dtype"}
        self.tuple_len = tuple_len  # len of the float model's return_dict=False output

    @property
    def normalized(self) -> str | None:
        """The timestep input if calls get it normalized to one value per sample."""
        return self.timestep if self.timestep_dtype is not None else None

    @property
    def takes_return_dict(self) -> bool:
        p = self.signature.parameters.get(RETURN_DICT)
        return p is not None and p.kind not in (_P.VAR_POSITIONAL, _P.VAR_KEYWORD)

    # --------------------------------------------------------------------------------------------- building
    @classmethod
    def from_example(cls, model: torch.nn.Module, example_inputs, timestep_arg="auto") -> tuple[CallSpec, tuple]:
        """The spec of `model.forward` for calls shaped like `example_inputs`, and the example in canonical form
        (an (args, kwargs) pair)."""
        args, kwargs = as_args_kwargs(example_inputs)
        try:
            signature = inspect.signature(model.forward)
        except (TypeError, ValueError) as e:
            raise InputError(f"cannot read the call signature of {type(model).__name__}.forward: {e}") from None
        signature = signature.replace(  # annotations say nothing a call needs; messages read better without
            parameters=[p.replace(annotation=_P.empty) for p in signature.parameters.values()],
            return_annotation=inspect.Signature.empty)
        spec = cls(signature, (), type(model).__name__)
        given = spec._bind(args, kwargs, "the example inputs", defaults=False).arguments
        full, owner = spec._flatten(spec._bind(args, kwargs, "the example inputs").arguments)
        params = signature.parameters
        inputs = [n for n in spec._flatten(given)[0]
                  if owner[n] != n or not _is_default(full[n], params[n])]
        if spec.takes_return_dict:
            inputs = [n for n in inputs if n != RETURN_DICT]
            if params[RETURN_DICT].default is not True:
                inputs.append(RETURN_DICT)  # traced as True, so it must be a graph input
        inputs = set(spec._close_gaps(inputs, owner))
        spec.inputs = tuple(n for n in full if n in inputs)
        spec.timestep = timestep_input(list(spec.inputs), timestep_arg)
        t = full.get(spec.timestep)
        if timestep_arg == "auto" and spec.timestep not in TIMESTEP_NAMES:
            pass  # a guess by position: not reshaped (it may be any per-call input)
        elif torch.is_tensor(t) and t.dim() <= 1 and _dtype_kind(t.dtype) in ("integer", "floating"):
            spec.timestep_dtype = t.dtype
        elif isinstance(t, (int, float)) and not isinstance(t, bool):
            spec.timestep_dtype = torch.int64 if isinstance(t, int) else torch.get_default_dtype()
        # else: not a per-sample timestep (e.g. a [B, 1] tensor): passed through unchanged (timestep_dtype None)
        spec.batch_input = next((n for n in spec.inputs if n != spec.normalized and torch.is_tensor(full[n])
                                 and full[n].dim() >= 1), None)
        example_args, example_kwargs, _ = spec.canonical(args, kwargs, "the example inputs")
        canon, _ = spec._flatten(spec._bind(example_args, example_kwargs, "the example inputs").arguments)
        spec.tensors = {
            n: [{"shape": list(v.shape), "dtype": str(v.dtype)} if torch.is_tensor(v) else None
                for v in tree_flatten(canon[n])[0]]
            for n in spec.inputs if n != spec.normalized
        }
        return spec, (example_args, example_kwargs)

    def _close_gaps(self, inputs: list[str], owner: dict) -> list[str]:
        # A positional parameter left out before a positional-only or *args input could not be skipped in a
        # positional call: keep it as an input (holding its default).
        params = list(self.signature.parameters.values())
        positional = [i for i, p in enumerate(params)
                      if p.kind in (_P.POSITIONAL_ONLY, _P.VAR_POSITIONAL) and any(owner[n] == p.name for n in inputs)]
        if not positional:
            return inputs
        extra = [p.name for p in params[:max(positional)]
                 if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD) and p.name not in inputs]
        return inputs + extra

    # ---------------------------------------------------------------------------------------------- binding
    def _bind(self, args, kwargs, where: str, defaults: bool = True) -> inspect.BoundArguments:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise InputError(
                f"{where}: the inputs do not fit {self.model_class}.forward{self.signature}: {e}") from None
        if defaults:
            bound.apply_defaults()
        return bound

    def _flatten(self, arguments) -> tuple[dict, dict]:
        """Inputs by name (each *args element as `name_i`, each **kwargs entry by its key), and the parameter
        that owns each."""
        flat, owner = {}, {}
        for name, p in self.signature.parameters.items():
            if name not in arguments:
                continue
            value = arguments[name]
            if p.kind is _P.VAR_POSITIONAL:
                items = {f"{name}_{i}": v for i, v in enumerate(value)}
            elif p.kind is _P.VAR_KEYWORD:
                items = dict(value)
            else:
                items = {name: value}
            flat.update(items)
            owner.update(dict.fromkeys(items, name))
        return flat, owner

    def _unflatten(self, flat: dict, owner: dict) -> tuple[tuple, dict]:
        """(args, kwargs) passing `flat`: by keyword where the signature allows it, so each input keeps its name
        whatever form a caller used (positional-only parameters and *args, and what precedes *args, by position)."""
        params = self.signature.parameters.values()
        star = any(p.kind is _P.VAR_POSITIONAL and any(owner[n] == p.name for n in flat) for p in params)
        args, kwargs = [], {}
        for p in params:
            mine = [n for n in flat if owner[n] == p.name]
            if not mine:
                continue
            if p.kind is _P.VAR_POSITIONAL:
                args.extend(flat[n] for n in mine)
            elif p.kind is _P.VAR_KEYWORD:
                kwargs.update((n, flat[n]) for n in mine)
            elif p.kind is _P.POSITIONAL_ONLY or (star and p.kind is _P.POSITIONAL_OR_KEYWORD):
                args.append(flat[p.name])
            else:
                kwargs[p.name] = flat[p.name]
        return tuple(args), kwargs

    def canonical(self, args, kwargs, where: str = "this call") -> tuple[tuple, dict, bool | None]:
        """(args, kwargs) for the graph, and the return_dict the caller asked for (None if the model has none).
        InputError says what to change when the call cannot be served."""
        bound = self._bind(args, kwargs, where)
        flat, owner = self._flatten(bound.arguments)
        return_dict = None
        if self.takes_return_dict:
            value = flat[RETURN_DICT]
            if torch.is_tensor(value):
                raise InputError(f"{where}: return_dict must be True or False, got {describe(value)}")
            return_dict = bool(value)
        for name, value in flat.items():
            if name in self.inputs or (name == RETURN_DICT and return_dict is not None):
                continue
            param = self.signature.parameters[owner[name]]
            if owner[name] != name:
                raise InputError(f"{where} passes `{name}`, which the example inputs did not: the quantized graph "
                                 f"takes only {list(self.inputs)}")
            if not _is_default(value, param):
                raise InputError(
                    f"{where}: `{name}` is {describe(value)}, but the model was quantized with it left at "
                    f"{param.default!r}, and the quantized graph holds only that code path. Give `{name}` in "
                    f"fxq.quantize's example inputs and calibration data to quantize the path that uses it.")
        missing = [n for n in self.inputs if n not in flat]
        if missing:
            raise InputError(f"{where} lacks {missing}, which the model was quantized with")
        keep = {n: flat[n] for n in self.inputs}
        if self.normalized is not None:
            keep[self.timestep] = self._normalize_timestep(keep[self.timestep], keep.get(self.batch_input), where)
        if RETURN_DICT in keep:
            keep[RETURN_DICT] = True
        self._check_tensors(keep, where)
        args, kwargs = self._unflatten(keep, owner)
        return args, kwargs, return_dict

    def canonical_item(self, item, where: str) -> tuple[tuple, dict]:
        """One input item (any form `fxq.tracing.inputs.as_args_kwargs` takes) as a canonical (args, kwargs) pair."""
        args, kwargs, _ = self.canonical(*as_args_kwargs(item), where)
        return args, kwargs

    # ----------------------------------------------------------------------------------------------- checks
    def _normalize_timestep(self, value, reference, where: str) -> torch.Tensor:
        name, dtype = self.timestep, self.timestep_dtype
        expected = f"the timestep `{name}` as a Python number or a tensor of shape [], [1] or [B]"
        if self.batch_input is not None:
            if not torch.is_tensor(reference) or reference.dim() < 1:
                raise InputError(f"{where}: `{self.batch_input}` must be a tensor with a batch dimension like the "
                                 f"example's, got {describe(reference)}")
            batch = reference.shape[0]
        else:
            batch = None
        integer = _dtype_kind(dtype) == "integer"
        if torch.is_tensor(value):
            if _dtype_kind(value.dtype) not in ("integer", "floating"):
                raise InputError(f"{where}: expected {expected}, got {describe(value)}")
            if value.dim() > 1:
                raise InputError(f"{where}: expected {expected} (one timestep per sample), got {describe(value)}")
            t = value.reshape(-1)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InputError(f"{where}: the timestep `{name}` holds NaN or inf")
            if integer and t.is_floating_point() and not torch.equal(t, t.round()):
                raise InputError(f"{where}: the model was quantized with integer timesteps ({dtype}) and this "
                                 f"call's `{name}` has fractional values; quantize with a floating-point example "
                                 f"timestep to serve those")
            t = t.to(dtype)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise InputError(f"{where}: the timestep `{name}` is {value}")
            if integer and not float(value).is_integer():
                raise InputError(f"{where}: the model was quantized with integer timesteps ({dtype}); {value} is "
                                 f"fractional. Quantize with a floating-point example timestep to serve it")
            device = reference.device if torch.is_tensor(reference) else None
            try:
                t = torch.tensor([value], dtype=dtype, device=device)
            except (RuntimeError, OverflowError, ValueError, TypeError) as e:
                raise InputError(f"{where}: the timestep `{name}`={value} does not fit {dtype}: {e}") from None
        else:
            raise InputError(f"{where}: expected {expected}, got {describe(value)}")
        n = t.numel() if batch is None else batch
        if t.numel() == n:
            return t
        if t.numel() == 1:
            return t.repeat(n)
        raise InputError(f"{where}: the timestep `{name}` has {t.numel()} values but `{self.batch_input}` has a batch "
                         f"of {batch}; pass one timestep for all samples or one per sample")

    def _check_tensors(self, keep: dict, where: str) -> None:
        """Tensor inputs where the example had tensors, of the same rank and kind of dtype. (Other values are
        re-checked by the graph's own guards.)"""
        for name, expected in self.tensors.items():
            leaves = tree_flatten(keep[name])[0]
            if len(leaves) != len(expected):
                continue  # another structure: the graph's guards name it
            for leaf, ex in zip(leaves, expected):
                if ex is None:
                    continue
                like = f"a tensor like the example's (shape {tuple(ex['shape'])}, dtype {ex['dtype']})"
                if not torch.is_tensor(leaf):
                    raise InputError(f"{where}: `{name}` must be {like}, got {describe(leaf)}")
                if leaf.dim() != len(ex["shape"]):
                    raise InputError(f"{where}: `{name}` must be {like}, got {describe(leaf)}")
                if _dtype_kind(leaf.dtype) != _dtype_kind(_dtype(ex["dtype"])):
                    raise InputError(f"{where}: `{name}` must be {like}, got {describe(leaf)}; convert it")

    def output(self, out, return_dict: bool | None):
        """The graph's output (traced with return_dict=True) in the form the caller asked for."""
        if return_dict is None or return_dict:
            return out
        if hasattr(out, "to_tuple"):
            result = tuple(out.to_tuple())
        elif isinstance(out, tuple):
            result = out
        else:
            result = None
        if result is None or (self.tuple_len is not None and len(result) != self.tuple_len):
            raise FxqError(f"{self.model_class}'s quantized output {type(out).__name__} has no tuple form matching "
                           f"its return_dict=False output; call it with return_dict=True")
        return result

    def describe_inputs(self) -> str:
        parts = []
        for name in self.inputs:
            if name == self.normalized:
                parts.append(f"{name}: a number or a tensor of shape [], [1] or [B] ({self.timestep_dtype})")
            elif name == RETURN_DICT:
                continue
            else:
                shown = [f"tensor {tuple(ex['shape'])} {ex['dtype']}" for ex in self.tensors.get(name, []) if ex]
                parts.append(f"{name}: {', '.join(shown) if shown else 'as in the example'}")
        return "; ".join(parts)

    # ------------------------------------------------------------------------------------------ plain data
    def to_json(self) -> dict:
        return {
            "model_class": self.model_class,
            "parameters": [_param_json(p) for p in self.signature.parameters.values()],
            "inputs": list(self.inputs),
            "timestep": self.timestep,
            "timestep_dtype": str(self.timestep_dtype) if self.timestep_dtype is not None else None,
            "batch_input": self.batch_input,
            "tensors": self.tensors,
            "tuple_len": self.tuple_len,
        }

    @classmethod
    def from_json(cls, d: dict) -> CallSpec:
        try:
            signature = inspect.Signature([_param_from_json(p) for p in d["parameters"]])
            dtype = d["timestep_dtype"]
            spec = cls(signature, d["inputs"], d["model_class"], d["timestep"],
                       _dtype(dtype) if dtype is not None else None, d["batch_input"], d["tensors"], d["tuple_len"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a call description: {type(e).__name__}: {e}") from None
        if not all(isinstance(n, str) for n in spec.inputs) or not isinstance(spec.tensors, dict):
            raise InputError("not a call description: inputs must be names, tensors a mapping")
        return spec
