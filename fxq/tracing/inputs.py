"""One input item for a model: the three spellings users write, normalized to `(args, kwargs)`.

    x                          -> ((x,), {})
    (x, t)  or  [x, t]         -> ((x, t), {})
    ((x, t), {"encoder_hidden_states": e})  -> ((x, t), {"encoder_hidden_states": e})

Tracing and calibration both read inputs through `as_args_kwargs`, so a model is always called the same way.
"""

from __future__ import annotations

import torch

from fxq.errors import InputError

_FORMS = (
    "a tensor, a tuple/list of positional inputs such as (x, t), or a pair "
    "((x, t), {'encoder_hidden_states': e}) of positional inputs and keyword inputs"
)


def _is_pair(item) -> bool:
    return len(item) == 2 and isinstance(item[0], (tuple, list)) and isinstance(item[1], dict)


def as_args_kwargs(item) -> tuple[tuple, dict]:
    """Split one input item into the positional and keyword inputs of a model call."""
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, (tuple, list)):
        if _is_pair(item):
            args, kwargs = item
            bad = [k for k in kwargs if not isinstance(k, str)]
            if bad:
                raise InputError(f"keyword inputs must be named by strings; got key(s) {bad!r}. Pass {_FORMS}.")
            return tuple(args), dict(kwargs)
        if any(isinstance(elem, dict) for elem in item):
            # Most likely a (args, kwargs) pair written with a bare tensor instead of a tuple of args.
            raise InputError(
                f"an input item of {len(item)} elements contains a dict; for keyword inputs pass exactly "
                f"(args_tuple, kwargs_dict), e.g. ((x, t), {{'encoder_hidden_states': e}}). Pass {_FORMS}."
            )
        return tuple(item), {}
    raise InputError(f"an input item of type {type(item).__name__} is not understood; pass {_FORMS}.")
