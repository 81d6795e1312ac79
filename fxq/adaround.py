"""AdaRound (Nagel et al. 2020): learn, per weight, whether to round down or up, layer by layer.

Rounding to nearest is optimal per weight but not for the layer's output: AdaRound minimizes
    || f(x; W) - f(x; s * clamp(floor(W / s) + h(V))) ||^2  +  lam * sum(1 - |2 h(V) - 1|^beta)
over the layer's calibration inputs x, with the rectified sigmoid h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma,
0, 1) and beta annealed from 20 to 2 so h settles on 0 or 1. The scales s are the frozen ones (weight observer);
only the rounding changes. As in the paper, inputs and targets are the float model's (the layer's input is
recorded through the calibrated graph with its observers as identities).

The result is a weight on the quantization grid (s * integer code), written into the graph's own copy of the
layer: fake-quantizing it returns it unchanged and the int8 backend reads the same codes, so no backend needs to
know about AdaRound. Per layer, the learned rounding is kept only if its output error on the calibration
inputs is not larger than rounding to nearest (so it never makes a layer worse there).

The calibration set is the time-step-aware one fxq.quantize was given: the rounding is learned across timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from fxq import quantizer as Q
from fxq.calib import batches, device_of
from fxq.freeze import Frozen
from fxq.passes.insert_observers import is_act_observer

ZETA, GAMMA = 1.1, -0.1


@dataclass
class LayerResult:
    """Output MSE of a layer on its calibration inputs with nearest and with learned rounding."""

    target: str
    nearest: float
    learned: float
    kept: bool  # whether the learned rounding replaced nearest rounding


class _Stop(Exception):
    pass


class _InputRecorder(fx.Interpreter):
    """Runs the calibrated graph with its activation observers as identities (they record nothing) and keeps the
    inputs of every call to module `target`; stops after that module's last call."""

    def __init__(self, gm: fx.GraphModule, target: str):
        super().__init__(gm)
        self.target = target
        self.last = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target][-1]
        self.inputs: list[torch.Tensor] = []

    def run_node(self, n):
        if is_act_observer(self.module, n):
            return self.env[n.args[0]]
        if n.op == "call_module" and n.target == self.target:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.inputs.append(args[0].detach())
            if n is self.last:
                raise _Stop
        return super().run_node(n)


@torch.no_grad()
def _layer_inputs(gm, target, calib_data, example, batch_size) -> torch.Tensor:
    device = device_of(gm)
    recorded = []
    for args, kwargs in batches(calib_data, example, batch_size):
        args, kwargs = torch.utils._pytree.tree_map(
            lambda v: v.to(device) if torch.is_tensor(v) else v, (args, kwargs))
        rec = _InputRecorder(gm, target)
        try:
            rec.run(*_positional(gm, args, kwargs))
        except _Stop:
            pass
        recorded += rec.inputs
    return torch.cat(recorded, 0)


def _positional(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The model call's inputs in placeholder order (fx.Interpreter binds placeholders positionally); a
    placeholder given neither way keeps its default."""
    values = list(args)
    for p in [n for n in gm.graph.nodes if n.op == "placeholder"][len(args):]:
        if p.target not in kwargs:
            break
        values.append(kwargs[p.target])
    return values


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _init_v(residual: torch.Tensor) -> torch.Tensor:
    """V with h(V) equal to the fractional part: learning starts from rounding's own information."""
    r = residual.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1)


def round_layer(module: nn.Module, qp: Q.QParams, x: torch.Tensor, iters: int, batch: int, lr: float,
                reg: float, generator: torch.Generator, target: str = "") -> tuple[torch.Tensor, LayerResult]:
    """The AdaRound weight of `module` (on the grid of `qp`) for inputs `x`, and how it compares with nearest."""
    weight = module.weight.detach().float()
    down, residual = Q.floor_residual(weight, qp)
    down, residual = down.detach(), residual.detach()
    with torch.no_grad():
        target_out = torch.func.functional_call(module, {"weight": weight}, (x,))

    def output_mse(w):
        with torch.no_grad():
            out = torch.func.functional_call(module, {"weight": w.to(module.weight.dtype)}, (x,))
            return float((out - target_out).pow(2).mean())

    nearest = Q.fake_quantize(weight, qp)
    v = nn.Parameter(_init_v(residual))
    opt = torch.optim.Adam([v], lr=lr)
    warmup = int(0.2 * iters)
    for i in range(iters):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=generator).to(x.device)
        xb = x[idx]
        with torch.no_grad():
            ref = torch.func.functional_call(module, {"weight": weight}, (xb,))
        h = _rectified_sigmoid(v)
        out = torch.func.functional_call(module, {"weight": Q.fake_quantize_rounded(down, h, qp)}, (xb,))
        loss = (out - ref).pow(2).flatten(1).sum(1).mean()
        if i >= warmup:  # the paper's annealed regularizer, off during warm-up
            beta = 2 + (20 - 2) * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, iters - warmup)))
            loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    learned = Q.fake_quantize_rounded(down, (_rectified_sigmoid(v.detach()) >= 0.5).float(), qp)
    err_nearest, err_learned = output_mse(nearest), output_mse(learned)
    kept = err_learned <= err_nearest
    return (learned if kept else nearest), LayerResult(target, err_nearest, err_learned, kept)


def adaround(gm: fx.GraphModule, frozen: Frozen, calib_data, example, *, iters: int = 1000, batch: int = 32,
             lr: float = 1e-2, reg: float = 0.01, batch_size: int = 32, seed: int = 0,
             progress: bool = False) -> list[LayerResult]:
    """Replace the weight of every quantized module of the calibrated graph `gm` by its AdaRound weight (on the
    frozen grid). `gm` must be fxq's own copy (fxq.quantize makes one). Returns one LayerResult per layer."""
    generator = torch.Generator().manual_seed(seed)
    results = []
    targets = [t for t in frozen.weight if isinstance(getattr(gm.get_submodule(t), "weight", None), nn.Parameter)]
    for target in tqdm(targets, desc="adaround", unit="layer", disable=not progress):
        module = gm.get_submodule(target)
        x = _layer_inputs(gm, target, calib_data, example, batch_size)
        w, result = round_layer(module, frozen.weight[target], x, iters, batch, lr, reg, generator, target)
        module.weight = nn.Parameter(w.to(module.weight.dtype), requires_grad=False)  # a new tensor, never written
        results.append(result)
    return results
