"""Measurements of a quantized model against its float original: SQNR per timestep, op counts."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxq.passes.select_ops import summary


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, 10 log10(|ref|^2 / |ref - test|^2), in dB (inf if identical)."""
    ref = reference.detach().double()
    noise = (ref - test.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


def quantized_ops(gm: fx.GraphModule) -> dict[str, int]:
    """Count of quantized ops by kind ("conv", "linear", "attn_matmul") in a prepared or lowered graph, kinds
    with none left out."""
    return {kind: n for kind, n in summary(gm).items() if n}


def _eps(out):
    return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, (tuple, list)) else out)


@torch.no_grad()
def per_timestep_sqnr(fp_model, q_model, sampler, shape, seed: int = 0, device=None) -> dict[int, float]:
    """SQNR (dB) of q_model's noise prediction against fp_model's at every step the sampler visits, both
    evaluated on the float model's own trajectory x_t (so the errors do not compound)."""
    inputs: list[tuple[int, torch.Tensor]] = []
    sampler.sample(fp_model, shape, seed=seed, device=device,
                   callback=lambda i, t, x_t: inputs.append((t, x_t.clone())))
    result = {}
    for t, x_t in inputs:
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        result[t] = sqnr_db(_eps(fp_model(x_t, tt)), _eps(q_model(x_t, tt)))
    return result


def summarize_sqnr(per_t: dict[int, float], buckets: int = 5) -> list[tuple[int, int, float]]:
    """(t_low, t_high, mean dB) over `buckets` equal slices of the visited timesteps, high t (noise) first."""
    items = sorted(per_t.items(), reverse=True)
    size = max(1, len(items) // buckets)
    rows = []
    for i in range(0, len(items), size):
        chunk = items[i:i + size]
        rows.append((chunk[-1][0], chunk[0][0], sum(v for _, v in chunk) / len(chunk)))
    return rows
