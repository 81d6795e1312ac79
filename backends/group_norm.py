"""GroupNorm (+ SiLU) on fxq's own CPU kernel (kernels/glue.cpp), in both backends alike.

A UNet spends as long in GroupNorm, SiLU and quantizing their output as in its int8 convs when torch runs them
op by op (about half the int8 forward, measured on both CPUs). The kernel does all three in two passes over the
activation: per-channel sums, then normalize, SiLU and (x86) write uint8 codes.

Its arithmetic is its own (sums in double, Cephes's exp: README), a few ulps from torch's GroupNorm and SiLU. So
`native_group_norms` gives *both* lowerings the kernel's float form: every nn.GroupNorm / F.group_norm call
becomes a `GroupNormAct` call (SiLU folded in where the norm's only reader is a SiLU), which on a float32 CPU
tensor runs the kernel and elsewhere (CUDA, other dtypes, gradients, no kernel built) torch's ops; the x86
backend then fuses the quantize that reads it (x86_norm.py), whose codes are the kernel's float output quantized
as `fxq.quant.quantizer.quantize` does, bit for bit. The int8 model and its fake-quant twin keep giving the same
codes.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxq.backends import glue_kernels
from fxq.errors import FxqError
from fxq.io.spec_fields import SpecFields

# the stock forwards, as fxq found them: a module whose class (or instance) forward is another, or that has hooks,
# computes something else or must run as it is, so it stays
_STOCK_FORWARD = {nn.GroupNorm: nn.GroupNorm.forward, nn.SiLU: nn.SiLU.forward}


def _native():
    found = glue_kernels.functions()
    return None if found is None else found[0]


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _layout(x: torch.Tensor) -> bool | None:
    """True: channels innermost (channels-last), False: contiguous, None: neither (the torch form runs)."""
    if x.is_contiguous():
        return False
    fmt = _CHANNELS_LAST.get(x.dim())
    if fmt is not None:
        return True if x.is_contiguous(memory_format=fmt) else None
    return True if x.movedim(1, -1).is_contiguous() else None


def _params_fit(channels: int, weight, bias) -> bool:
    return all(t is None or (t.dtype == torch.float32 and t.is_cpu and t.shape == (channels,) and t.is_contiguous())
               for t in (weight, bias))


def _native_args(x: torch.Tensor, num_groups: int, weight, bias, eps=1e-5, silu=False):
    """(kernel, channels_last) when the kernel takes this call, else None."""
    if x.dtype != torch.float32 or not x.is_cpu or x.dim() < 2 or type(num_groups) is not int or num_groups < 1 \
            or not isinstance(eps, (int, float)) or not isinstance(silu, bool):
        return None
    channels = x.shape[1]
    # (torch's form raises its own error for a bad call, a group of one value included)
    if channels % num_groups or x.numel() // num_groups <= 1 or not _params_fit(channels, weight, bias):
        return None
    channels_last = _layout(x)
    kernel = _native() if channels_last is not None else None
    return None if kernel is None else (kernel, channels_last)


def _run(kernel, channels_last, x, num_groups, weight, bias, eps, silu, inv_scale=None, zp=None, per_sample=True):
    """The kernel's floats, or with inv_scale and zp (float32: one per sample, or one for all) its codes."""
    codes = inv_scale is not None
    out = torch.empty_like(x, dtype=torch.uint8 if codes else torch.float32)
    n, c = x.shape[0], x.shape[1]
    rc = kernel(x.data_ptr(), n, x.numel() // (n * c), c, num_groups, channels_last,
                None if weight is None else weight.data_ptr(), None if bias is None else bias.data_ptr(), eps, silu,
                inv_scale.data_ptr() if codes else None, zp.data_ptr() if codes else None, per_sample,
                out.data_ptr() if codes else None, None if codes else out.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise FxqError(f"fxq's GroupNorm kernel ran out of memory on a {tuple(x.shape)} input")
    return out


def _torch_form(x, num_groups, weight, bias, eps, silu):
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y, inplace=not y.requires_grad) if silu else y


class _KernelWithTorchGradient(torch.autograd.Function):
    """The kernel's values, torch's form's gradient (the same function to a few ulps): a fake-quant model gives
    the int8 model's values under autograd too (fxq.quant.act_scales learns through it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, found, num_groups, eps, silu):
        ctx.save_for_backward(x, weight, bias)
        ctx.args = (num_groups, eps, silu)
        return _run(*found, x, num_groups, weight, bias, eps, silu)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad[:3])]
        wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:3]) if need]
        with torch.enable_grad():
            y = _torch_form(*inputs[:1], ctx.args[0], *inputs[1:], *ctx.args[1:])
            found = iter(torch.autograd.grad(y, wanted, grad))
        return (*(next(found) if need else None for need in ctx.needs_input_grad[:3]), None, None, None, None)


def group_norm_act(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5,
                   silu: bool = False) -> torch.Tensor:
    """F.group_norm(x, num_groups, weight, bias, eps), then F.silu if `silu`: on the kernel where it can run."""
    found = _native_args(x, num_groups, weight, bias, eps, silu)
    if found is None:
        return _torch_form(x, num_groups, weight, bias, eps, silu)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _KernelWithTorchGradient.apply(x, weight, bias, found, num_groups, eps, silu)
    return _run(*found, x, num_groups, weight, bias, eps, silu)


def group_norm_codes(x: torch.Tensor, num_groups: int, weight, bias, eps: float, silu: bool,
                     inv_scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor | None:
    """uint8 codes of `quantize(group_norm_act(...))` with float32 reciprocal scales and zero points, [N] (per
    sample) or [1] (for all), laid out like x; None where the kernel does not take this call (then group_norm_act
    runs torch's ops too, and the caller quantizes their result)."""
    found = _native_args(x, num_groups, weight, bias, eps, silu)
    if found is None:
        return None
    if inv_scale.shape != zero_point.shape or inv_scale.numel() not in (1, x.shape[0]) \
            or inv_scale.dtype != torch.float32 or zero_point.dtype != torch.float32:
        raise FxqError(f"group_norm_codes takes float32 scales and zero points, one or one per sample of the "
                       f"{x.shape[0]}; got {tuple(inv_scale.shape)} {inv_scale.dtype} and {tuple(zero_point.shape)} "
                       f"{zero_point.dtype}")
    return _run(*found, x, num_groups, weight, bias, eps, silu, inv_scale.contiguous(), zero_point.contiguous(),
                inv_scale.numel() == x.shape[0] and x.shape[0] > 1)


class GroupNormAct(SpecFields, nn.GroupNorm):
    """nn.GroupNorm whose call may fold a SiLU after it (`forward(x, silu)`), computed by `group_norm_act`."""

    _spec_fields = ("num_groups", "num_channels", "eps", "affine")

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm) -> "GroupNormAct":
        new = cls(norm.num_groups, norm.num_channels, norm.eps, norm.affine, device="meta")
        new.weight, new.bias = norm.weight, norm.bias  # the same parameters (the graph's copy of the model's)
        return new

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, silu)


def _silu_reader(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The SiLU that is node's only reader, taking node as its only tensor input, or None."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op == "call_function" and user.target is F.silu and user.args[:1] == (node,) \
            and set(user.kwargs) <= {"inplace"} and all(isinstance(a, bool) for a in user.args[1:]):
        return user
    if user.op == "call_module" and _stock(gm.get_submodule(user.target), nn.SiLU) and user.args == (node,) \
            and not user.kwargs:
        return user
    return None


def _stock(module: nn.Module, cls) -> bool:
    """module is a plain `cls` whose call runs cls's own forward and nothing else (no hooks, no override)."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return (type(module) is cls and cls.forward is _STOCK_FORWARD[cls] and "forward" not in module.__dict__
            and not any(getattr(module, h, None) for h in hooks))


def norm_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether node computes group_norm_act: a GroupNormAct call or the function."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), GroupNormAct)
    return node.op == "call_function" and node.target is group_norm_act


def native_group_norms(gm: fx.GraphModule) -> None:
    """Every nn.GroupNorm module call and F.group_norm call ==> group_norm_act, with the SiLU that is its only
    reader folded in. Run by both lowerings on the same calibrated graph, so both fold the same SiLUs."""
    from torch.nn.modules import module as torch_module
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return  # hooks on every module's call: each module stays as the model had it
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and _stock(gm.get_submodule(node.target), nn.GroupNorm):
            if len(node.args) != 1 or node.kwargs:
                continue
            gm.set_submodule(node.target, GroupNormAct.from_group_norm(gm.get_submodule(node.target)))
        elif node.op == "call_function" and node.target is F.group_norm:
            names = ("input", "num_groups", "weight", "bias", "eps")
            bound = dict(zip(names, node.args), **node.kwargs)
            if set(bound) - set(names) or "num_groups" not in bound:
                continue
            node.target, node.args, node.kwargs = group_norm_act, (bound.pop("input"),), bound
        elif not (node.op == "call_module" and isinstance(gm.get_submodule(node.target), GroupNormAct)):
            continue
        silu = _silu_reader(gm, node)
        if silu is None:
            continue
        if node.op == "call_module":
            node.args = (node.args[0], True)
        else:
            node.kwargs = {**node.kwargs, "silu": True}
        silu.replace_all_uses_with(node)
        graph.erase_node(silu)
