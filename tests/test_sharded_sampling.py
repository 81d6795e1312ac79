"""Sampling sharded over processes with torch.distributed (gloo, 2 CPU processes) returns exactly the images of
one process with the same seed: per-sample initial noise, per-batch step noise, batches dealt round-robin."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fxq.diffusion import DDIM, DDPM
from fxq.eval.images import sample_images
from fxq.models import DDPMUNet
from fxq.models.ddpm_unet import reinit_zero_layers

SAMPLERS = {"ddim": lambda: DDIM(steps=3), "ddpm": lambda: DDPM(T=4)}


def tiny_unet():
    torch.manual_seed(0)
    unet = DDPMUNet(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), resolution=8, num_groups=4)
    return reinit_zero_layers(unet, seed=0).eval()


def _sample(name):
    return sample_images(tiny_unet(), SAMPLERS[name](), n=7, batch_size=2, seed=3, shape=(3, 8, 8))


def _worker(rank, world, store_file, out_dir):
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    try:
        save_file({name: _sample(name) for name in SAMPLERS}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch: ~12 s
def test_two_processes_sample_what_one_process_samples(tmp_path):
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    one = {name: _sample(name) for name in SAMPLERS}
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        for name in SAMPLERS:  # DDIM (noise only at x_T) and DDPM (noise at every step, per batch)
            assert torch.equal(got[name], one[name]), (rank, name)
    assert all(v.float().std() > 0 for v in one.values())  # the images are not trivially equal
