"""Running a calibration set through an observed graph: items checked against the example's form, joined into
batches along the batch dim, moved to the graph's device, fed with the observers recording (fxq.calib builds the
sets)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from tqdm.auto import tqdm

from fxq.errors import InputError
from fxq.tracing.inputs import as_args_kwargs
from fxq.quant.observers import ActObserver, check_finite, reused_buffers


@contextlib.contextmanager
def eval_mode(model):
    """The model in eval mode for the block; every submodule's own flag restored after."""
    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    flags = [m.training for m in modules]
    for m in modules:
        m.training = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.training = flag


def device_of(model) -> torch.device:
    """The device of the model's first parameter (the CPU if it has none)."""
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def to_device(item, device):
    """Every tensor of item (any nesting of tuples, lists and dicts, e.g. an (args, kwargs) pair) moved to device."""
    return tree_map(lambda v: v.to(device) if torch.is_tensor(v) else v, item)


def _describe(value):
    if torch.is_tensor(value):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return repr(value)


def check_item(item, example, index: int):
    """The item as (args, kwargs) if it has the example's form (any batch size), else InputError.

    Nested inputs (lists, tuples, dicts of tensors, e.g. diffusers' added_cond_kwargs) are compared leaf by leaf.
    """
    args, kwargs = as_args_kwargs(item)
    ex_args, ex_kwargs = example
    where = f"calibration item {index}"
    if len(args) != len(ex_args) or set(kwargs) != set(ex_kwargs):
        raise InputError(f"{where} has {len(args)} positional inputs and keywords {sorted(kwargs)}; the example"
                         f" inputs have {len(ex_args)} and {sorted(ex_kwargs)}")
    named = [(f"positional input {i}", a, e) for i, (a, e) in enumerate(zip(args, ex_args))]
    named += [(f"keyword input {k!r}", kwargs[k], ex_kwargs[k]) for k in kwargs]
    for label, value, ex in named:
        leaves, spec = tree_flatten(value)
        ex_leaves, ex_spec = tree_flatten(ex)
        if spec != ex_spec:
            raise InputError(f"{where}, {label}: its structure {spec} differs from the example's {ex_spec}")
        for leaf, ex_leaf in zip(leaves, ex_leaves):
            _check_leaf(f"{where}, {label}", leaf, ex_leaf)
    return args, kwargs


def _check_leaf(where: str, value, ex) -> None:
    if torch.is_tensor(ex) != torch.is_tensor(value):
        raise InputError(f"{where}: got {_describe(value)}, the example has {_describe(ex)}")
    if not torch.is_tensor(ex):
        if value != ex:
            raise InputError(f"{where}: {value!r} differs from the example's {ex!r}; non-tensor inputs are fixed"
                             " when the model is traced")
        return
    if value.dtype != ex.dtype:
        raise InputError(f"{where}: dtype {value.dtype}, the example has {ex.dtype}; convert it")
    if value.dim() != ex.dim() or tuple(value.shape[1:]) != tuple(ex.shape[1:]):
        raise InputError(f"{where}: shape {tuple(value.shape)} does not match the example's {tuple(ex.shape)}"
                         " (only the batch dimension may differ)")
    if torch.is_floating_point(value) and not torch.isfinite(value).all():
        raise InputError(f"{where}: contains NaN or inf; remove or fix that sample")


def _batch_rows(args, kwargs) -> int | None:
    """The batch size shared by every tensor of an item, or None if they do not share one (then it runs alone)."""
    tensors = [v for v in tree_flatten((args, kwargs))[0] if torch.is_tensor(v)]
    sizes = {v.shape[0] if v.dim() > 0 else None for v in tensors}
    return sizes.pop() if len(sizes) == 1 else None


def batches(calib_data: Iterable, example, batch_size: int, device=None) -> Iterator[tuple[tuple, dict]]:
    """Validated items concatenated along the batch dim into batches of at most batch_size rows, as (args,
    kwargs) pairs, every tensor moved to `device` when one is given.

    Items are joined only when all their tensors share one leading size (a 0-d timestep, say, cannot be
    concatenated); other items run one by one.
    """
    for batch in _joined(calib_data, example, batch_size):
        yield batch if device is None else to_device(batch, device)


def _joined(calib_data: Iterable, example, batch_size: int) -> Iterator[tuple[tuple, dict]]:
    pending: list[tuple[tuple, dict]] = []
    rows = count = 0
    for index, item in enumerate(calib_data):
        args, kwargs = check_item(item, example, index)
        count += 1
        n = _batch_rows(args, kwargs)
        if n is None:
            yield args, kwargs
            continue
        if pending and rows + n > batch_size:
            yield _concat(pending)
            pending, rows = [], 0
        pending.append((args, kwargs))
        rows += n
    if pending:
        yield _concat(pending)
    if count == 0:
        raise InputError("the calibration data is empty: give at least one input item")


def _concat(items: list[tuple[tuple, dict]]) -> tuple[tuple, dict]:
    flat = [tree_flatten(item) for item in items]
    spec = flat[0][1]
    columns = zip(*(leaves for leaves, _ in flat))
    joined = [torch.cat(col, 0) if torch.is_tensor(col[0]) else col[0] for col in columns]
    return tree_unflatten(joined, spec)


def item_rows(args, kwargs) -> int:
    """Rows of a batch from `batches`: its tensors' shared batch size, or 1 (an item that runs alone)."""
    n = _batch_rows(args, kwargs)
    return 1 if n is None else n


@torch.no_grad()
def run(gm, calib_data: Iterable, example, batch_size: int = 32, progress: bool = False) -> int:
    """Feed every calibration item through `gm` (its observers record); returns the number of batches.

    Observers flag non-finite values on the device; they are checked once per batch (one host sync)."""
    device = device_of(gm)
    observers = [m for m in gm.modules() if isinstance(m, ActObserver)]
    done = 0
    bar = tqdm(desc="calibrating", unit="sample", disable=not progress)
    with reused_buffers():
        for args, kwargs in batches(calib_data, example, batch_size, device):
            gm(*args, **kwargs)
            check_finite(observers)
            done += 1
            bar.update(item_rows(args, kwargs))
    bar.close()
    return done
