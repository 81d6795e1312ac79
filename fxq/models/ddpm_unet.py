"""The DDPM CIFAR-10 UNet of Ho et al. 2020 ("Denoising Diffusion Probabilistic Models"), written for torch.fx.

At the defaults it is the paper's 35.7M-parameter, ~6.1 GMAC (32x32) epsilon-predictor. The forward pass has no
data-dependent Python control flow and takes every reshape size from `x.shape`, so plain
`torch.fx.symbolic_trace` captures it for any batch size; attention is two `torch.bmm` around a `torch.softmax`,
the pattern fxq's attention passes look for. Sub-module names follow the layout of Ho's checkpoint
(temb.dense, down[i].block[j], mid.attn_1, up[i].upsample.conv, ...) so weight conversion maps names one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fxq.errors import ConfigError

GN_EPS = 1e-6  # tf.contrib.layers.group_norm's epsilon, which Ho's model uses


def _default_init(module: nn.Module, scale: float = 1.0) -> None:
    """Ho's `default_init`: variance scaling, fan_avg, uniform; scale 0 means zero weights. Biases start at 0."""
    if scale == 0.0:
        nn.init.zeros_(module.weight)
    else:
        # variance_scaling(scale, fan_avg, uniform) == xavier_uniform with gain sqrt(scale)
        nn.init.xavier_uniform_(module.weight, gain=math.sqrt(scale))
    nn.init.zeros_(module.bias)


def _conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, padding: int | None = None,
          init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2 if padding is None else padding)
    _default_init(conv, init_scale)
    return conv


def _linear(c_in: int, c_out: int) -> nn.Linear:
    lin = nn.Linear(c_in, c_out)
    _default_init(lin)
    return lin


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of t (dim `ch`, sin half then cos half) -> Linear -> SiLU -> Linear.

    t may be [B], [1] or 0-d; the result is [B, temb_ch] or [1, temb_ch] and broadcasts over the batch later,
    which is how a 0-d t reaches every sample without a Python branch on its shape.
    """

    def __init__(self, ch: int, temb_ch: int):
        super().__init__()
        self.half = ch // 2
        self.log_step = -math.log(10000.0) / max(self.half - 1, 1)
        self.pad = ch % 2  # odd ch: one zero column, like Ho's get_timestep_embedding
        self.dense = nn.ModuleList([_linear(ch, temb_ch), _linear(temb_ch, temb_ch)])

    def forward(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # Frequencies are built here in float32, not stored: a buffer would be rounded by model.half(), and the
        # angles t * freq reach ~1000 rad, so half-precision frequencies would scramble the embedding.
        freqs = torch.exp(torch.arange(self.half, dtype=torch.float32, device=t.device) * self.log_step)
        args = t.reshape(-1, 1).float() * freqs
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        if self.pad:
            emb = F.pad(emb, (0, 1))
        emb = self.dense[0](emb.type_as(like))  # the model's dtype; type_as keeps the traced graph simple
        return self.dense[1](F.silu(emb))


class ResnetBlock(nn.Module):
    """GN -> SiLU -> conv3x3 (+ temb projection per channel) -> GN -> SiLU -> dropout -> conv3x3, plus shortcut."""

    def __init__(self, c_in: int, c_out: int, temb_ch: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, c_in, eps=GN_EPS)
        self.conv1 = _conv(c_in, c_out)
        self.temb_proj = _linear(temb_ch, c_out)
        self.norm2 = nn.GroupNorm(num_groups, c_out, eps=GN_EPS)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(c_out, c_out, init_scale=0.0)
        self.nin_shortcut = _conv(c_in, c_out, kernel=1) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions: softmax(q^T k / sqrt(C)) applied to v, plus residual."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=GN_EPS)
        self.q = _conv(channels, channels, kernel=1)
        self.k = _conv(channels, channels, kernel=1)
        self.v = _conv(channels, channels, kernel=1)
        self.proj_out = _conv(channels, channels, kernel=1, init_scale=0.0)
        self.scale = channels ** -0.5  # a constant, not a traced value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W)
        k = self.k(h).reshape(B, C, H * W)
        v = self.v(h).reshape(B, C, H * W)
        w = torch.bmm(q.permute(0, 2, 1), k) * self.scale  # [B, HW(query), HW(key)]
        w = torch.softmax(w, dim=2)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(B, C, H, W)  # out[:, :, i] = sum_j v[:, :, j] w[i, j]
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """3x3 conv, stride 2, with TensorFlow 'SAME' padding (one row/column at the bottom/right), as in Ho's model."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution of the down or up path (a container, so names read down[i].block[j])."""

    def __init__(self):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


def _check_config(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, in_channels, out_channels,
                  dropout, num_groups) -> None:
    def positive_int(name, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"DDPMUNet {name}={value!r}: must be a positive integer")

    for name, value in (("ch", ch), ("num_res_blocks", num_res_blocks), ("resolution", resolution),
                        ("in_channels", in_channels), ("out_channels", out_channels), ("num_groups", num_groups)):
        positive_int(name, value)
    if len(ch_mult) == 0:
        raise ConfigError("DDPMUNet ch_mult=(): give one channel multiplier per resolution level, e.g. (1, 2, 2, 2)")
    for m in ch_mult:
        positive_int("ch_mult entry", m)
        if (ch * m) % num_groups:
            raise ConfigError(f"DDPMUNet: width ch*mult={ch * m} is not divisible by num_groups={num_groups}; "
                              "pick ch and ch_mult so every level's width is a multiple of num_groups")
    for r in attn_resolutions:
        positive_int("attn_resolutions entry", r)
    if ch % num_groups:
        raise ConfigError(f"DDPMUNet: ch={ch} is not divisible by num_groups={num_groups}")
    if resolution % 2 ** (len(ch_mult) - 1):
        raise ConfigError(f"DDPMUNet: resolution={resolution} must be divisible by 2**(len(ch_mult)-1)="
                          f"{2 ** (len(ch_mult) - 1)} so every downsample halves it exactly")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"DDPMUNet dropout={dropout!r}: must be in [0, 1)")


class DDPMUNet(nn.Module):
    """Epsilon-predicting UNet of Ho et al. 2020; `forward(x, t) -> eps` with x's shape.

    x: [B, in_channels, resolution, resolution]. t: timesteps as an int or float tensor of shape [B], or 0-d
    (one timestep for the whole batch). Input images of another size work if divisible by 2**(levels-1), but
    attention sits at the levels whose *design* resolution (counted from `resolution`) is in attn_resolutions.
    """

    def __init__(self, ch: int = 128, ch_mult=(1, 2, 2, 2), num_res_blocks: int = 2, attn_resolutions=(16,),
                 resolution: int = 32, in_channels: int = 3, dropout: float = 0.1, out_channels: int | None = None,
                 num_groups: int = 32):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        ch_mult = tuple(ch_mult)
        attn_resolutions = tuple(attn_resolutions)
        _check_config(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, in_channels, out_channels,
                      dropout, num_groups)
        self.ch, self.ch_mult, self.num_res_blocks = ch, ch_mult, num_res_blocks
        self.attn_resolutions, self.resolution = attn_resolutions, resolution
        self.in_channels, self.out_channels = in_channels, out_channels
        temb_ch = 4 * ch
        n_levels = len(ch_mult)

        self.temb = TimestepEmbedding(ch, temb_ch)
        self.conv_in = _conv(in_channels, ch)

        def res(c_in, c_out):
            return ResnetBlock(c_in, c_out, temb_ch, dropout, num_groups)

        # Down path; skip_chs records the width of every tensor pushed onto the skip stack.
        skip_chs = [ch]
        block_in, cur_res = ch, resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level()
            for _ in range(num_res_blocks):
                level.block.append(res(block_in, ch * mult))
                block_in = ch * mult
                if cur_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, num_groups))
                skip_chs.append(block_in)
            if i != n_levels - 1:
                level.downsample = Downsample(block_in)
                cur_res //= 2
                skip_chs.append(block_in)
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = res(block_in, block_in)
        self.mid.attn_1 = AttnBlock(block_in, num_groups)
        self.mid.block_2 = res(block_in, block_in)

        # Up path, built from the lowest resolution; stored so that up[i] is the level at ch_mult[i].
        up_levels = []
        for i in reversed(range(n_levels)):
            level = _Level()
            for _ in range(num_res_blocks + 1):
                level.block.append(res(block_in + skip_chs.pop(), ch * ch_mult[i]))
                block_in = ch * ch_mult[i]
                if cur_res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, num_groups))
            if i != 0:
                level.upsample = Upsample(block_in)
                cur_res *= 2
            up_levels.insert(0, level)
        self.up = nn.ModuleList(up_levels)

        self.norm_out = nn.GroupNorm(num_groups, block_in, eps=GN_EPS)
        self.conv_out = _conv(block_in, out_channels, init_scale=0.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.temb(t, x)

        hs = [self.conv_in(x)]
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))

        h = hs[-1]
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)

        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))


def reinit_zero_layers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give Ho's zero-initialised layers (each ResBlock's conv2, proj_out, conv_out) small random weights, and
    every bias and GroupNorm affine a nudge, in place. A freshly built DDPMUNet outputs exactly 0; tests and
    benchmarks on random models need one whose every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.abs().sum() or name.endswith(("bias", "norm1.weight", "norm2.weight", "norm.weight")):
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
    return model
