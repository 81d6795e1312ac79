"""Activation scales tuned on the model's output: every activation quantizer's step size learned at once so that
the quantized model's output (the noise prediction) stays close to the float model's over the calibration set.

Each quantizer's range comes from its own statistics (min/max, percentile, Lp search): the best range for that
tensor alone. What matters is the output: a clipped outlier or a coarse step costs more in some layers than in
others. Here, after calibration (and weight rounding), the fake-quantized model runs with each activation scale as
a learned parameter (LSQ step sizes, Esser et al. 2020: round with a straight-through gradient, so the gradient
reaches the scale through rounding and clipping alike), weights at their quantized values, on the calibration
inputs. The loss is each calibration row's squared output error relative to that row's error with the calibrated
scales, averaged: every row counts alike, in dB. (A diffusion model's noise prediction errs ~30 dB more near t = 0
than elsewhere; the plain mean squared error, tried first, spent the scales on those last steps, where the eps
error hardly reaches the image, and made N = 10,000 FID worse: +3.9 -> +6.5 % at W8A8, seed 0.) Q-Diffusion and
BRECQ learn the activation step sizes block by block during reconstruction; this learns them for the whole model
jointly, on the time-step-aware calibration set (per timestep group where the quantizer has groups). Zero points
stay; only the scales move (log-parametrized: positive, and the step is relative). The learned scales are kept
only if the mean relative error over all calibration rows is below 1, i.e. lower than with the calibrated ones.

The result is only new QParams: every backend (the int8 one included) reads them as it reads calibrated ones.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.fx as fx
from torch import nn
from tqdm.auto import tqdm

from fxq.quant import calibrate
from fxq.quant import quantizer as Q
from fxq.errors import InputError
from fxq.quant.freeze import Frozen
from fxq.tracing.tracer import output_tensors
from fxq.passes.insert_observers import is_act_observer

LR = 1e-3  # Adam on log-scales: about 0.1 % of the step per iteration


class LearnedQuantize(nn.Module):
    """Fake quantization with a learned (log-)scale and straight-through rounding; parameters per timestep group
    as FakeQuantize picks them."""

    def __init__(self, qp: Q.QParams):
        super().__init__()
        self.qp = qp
        self.log_scale = nn.Parameter(qp.scale.detach().float().log().clone())
        self.register_buffer("zero_point", qp.zero_point.detach().float().clone())

    def forward(self, x: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        qp = dataclasses.replace(self.qp, scale=self.log_scale.exp(), zero_point=self.zero_point)
        if qp.scale.dim() == 1:
            qp = Q.select_group(qp, group, x)
        y = x.float() * torch.reciprocal(qp.scale)  # as Q.fake_quantize rounds
        y = y + (torch.round(y) - y).detach()
        y = torch.maximum(torch.minimum(y, qp.qmax - qp.zero_point), qp.qmin - qp.zero_point)
        return (y * qp.scale).to(x.dtype)

    def scale(self) -> torch.Tensor:
        return self.log_scale.detach().exp()


def float_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the observed graph with its activation observers bypassed: the float model."""
    ref = copy.deepcopy(gm)
    for node in [n for n in ref.graph.nodes if is_act_observer(ref, n)]:
        node.replace_all_uses_with(node.args[0])
        ref.graph.erase_node(node)
    ref.recompile()
    return ref


def _outputs(out) -> list[torch.Tensor]:
    """The floating tensors of a model output (tuples, lists, dicts, dataclasses), in order."""
    return [t for t in output_tensors(out) if t.is_floating_point()]


def _row_errors(out, target: list, rows: int) -> torch.Tensor:
    """Squared output error per row of the batch: each output's mean over its other dims where its dim 0 is the
    batch's, its mean over all of it (added to every row) where not; summed over the outputs."""
    total = torch.zeros(rows, device=target[0].device)
    for o, t in zip(_outputs(out), target):
        d = (o.float() - t) ** 2
        total = total + (d.reshape(rows, -1).mean(1) if d.dim() > 0 and d.shape[0] == rows else d.mean())
    return total


def _row_errors_of(qmodel: nn.Module, chunks: list, targets: list) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_row_errors(qmodel(*args, **kwargs), target, calibrate.item_rows(args, kwargs))
                for (args, kwargs), target in zip(chunks, targets)]


@dataclasses.dataclass
class TuningResult:
    iters: int
    quantizers: int
    error_before: float  # mean squared output error over the calibration rows, calibrated scales
    error_after: float   # the same with the learned scales
    relative_error_after: float  # mean over the rows of each row's error relative to its error before
    kept: bool
    mean_abs_log2_change: float  # how far the kept scales moved, in bits (0 when not kept)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def tune_act_scales(gm: fx.GraphModule, frozen: Frozen, calib_data, example, iters: int, *, batch_size: int = 32,
                    seed: int = 0, progress: bool = False, reference: fx.GraphModule | None = None) -> TuningResult:
    """Learn frozen.act's scales (in place, if they lower the output error) on `calib_data` (a list). reference:
    the float model the output is compared with (`float_graph(gm)` taken before anything changed gm's weights, as
    weight rounding does); None: float_graph(gm) now."""
    from fxq.backends import fake, fake_ops

    device = calibrate.device_of(gm)
    targets_model = (reference if reference is not None else float_graph(gm)).eval()
    work = fake.lower(copy.deepcopy(gm), Frozen(dict(frozen.act), dict(frozen.weight))).eval()
    learned = {}
    for target, qp in frozen.act.items():
        learned[target] = LearnedQuantize(qp).to(device)
        work.set_submodule(target, learned[target])
    for module in work.modules():  # integer sums have no gradient: the float op (same values on the grid)
        if isinstance(module, fake_ops._ExactBase):
            module.exact = False
    for p in work.parameters():
        p.requires_grad_(False)
    params = [m.log_scale for m in learned.values()]
    for p in params:
        p.requires_grad_(True)

    chunks, targets = [], []
    with torch.no_grad():
        for args, kwargs in calibrate.batches(calib_data, example, batch_size, device):
            chunks.append((args, kwargs))
            targets.append([o.float() for o in _outputs(targets_model(*args, **kwargs))])
            if not targets[-1]:
                raise InputError("act_scale_iters tunes the activation scales on the model's floating-point "
                                 "outputs; this model returns none: set act_scale_iters=0")
    del targets_model

    bases = _row_errors_of(work, chunks, targets)
    floor = 1e-6 * float(torch.cat(bases).mean()) + 1e-30  # a row the calibrated scales get exactly right
    bases = [b.clamp_min(floor) for b in bases]
    start = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=LR)
    order: list[int] = []
    with torch.enable_grad():
        for _ in tqdm(range(iters), desc="activation scales", disable=not progress):
            if not order:
                order = torch.randperm(len(chunks), generator=gen).tolist()
            i = order.pop()
            args, kwargs = chunks[i]
            loss = (_row_errors(work(*args, **kwargs), targets[i], calibrate.item_rows(args, kwargs)) / bases[i]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    errors = _row_errors_of(work, chunks, targets)
    relative = float(torch.cat([e / b for e, b in zip(errors, bases)]).mean())
    before, after = float(torch.cat(bases).mean()), float(torch.cat(errors).mean())
    kept = relative < 1.0
    moved = 0.0
    if kept:
        for target, module in learned.items():
            frozen.act[target] = dataclasses.replace(frozen.act[target], scale=module.scale().to(
                frozen.act[target].scale.device, frozen.act[target].scale.dtype))
        moved = float(torch.cat([(p.detach() - s).abs().flatten() for p, s in zip(params, start)]).mean()) / math.log(2)
    return TuningResult(iters, len(learned), before, after, relative, kept, moved)
