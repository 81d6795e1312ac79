"""as_args_kwargs: the three spellings of one model input normalize to (args, kwargs); anything else is refused."""

import pytest
import torch

from fxq.errors import InputError
from fxq.tracing.inputs import as_args_kwargs

x = torch.zeros(2, 3)
t = torch.tensor([1, 2])
e = torch.ones(2, 4, 8)


@pytest.mark.parametrize(
    "item, args, kwargs",
    [
        (x, (x,), {}),
        ((x, t), (x, t), {}),
        ([x, t], (x, t), {}),
        ((x, 500), (x, 500), {}),
        ((x,), (x,), {}),
        (((x, t), {"encoder_hidden_states": e}), (x, t), {"encoder_hidden_states": e}),
        ([[x, t], {"encoder_hidden_states": e}], (x, t), {"encoder_hidden_states": e}),
        (((x,), {}), (x,), {}),
    ],
)
def test_accepted_forms_normalize(item, args, kwargs):
    got_args, got_kwargs = as_args_kwargs(item)
    assert type(got_args) is tuple and type(got_kwargs) is dict
    assert len(got_args) == len(args) and all(a is b for a, b in zip(got_args, args))
    assert got_kwargs.keys() == kwargs.keys() and all(got_kwargs[k] is kwargs[k] for k in kwargs)


def test_pair_is_copied_not_aliased():
    kwargs = {"encoder_hidden_states": e}
    _, got = as_args_kwargs(((x,), kwargs))
    got["other"] = x
    assert "other" not in kwargs


@pytest.mark.parametrize(
    "item",
    [
        None,
        3,
        "x",
        {"sample": x},
        (x, {"encoder_hidden_states": e}),  # a bare tensor where the args tuple belongs
        ((x, t), {"encoder_hidden_states": e}, {}),
        ((x, t), {1: e}),  # keyword names must be strings
    ],
)
def test_rejected_forms_raise_input_error(item):
    with pytest.raises(InputError):
        as_args_kwargs(item)
