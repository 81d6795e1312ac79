"""A quantized model serves several threads at once (a web server's worker pool, a sampler per thread): calls
that race into its first use, where it builds its kernels' state lazily (oneDNN weight packs, scale floats, the
fake twin's kernel-order probes), each get what a call alone would give."""

import copy
import sys
import threading

import pytest
import torch

import fxq
from fxq.models import DDPMUNet
from tests.int8 import skip_without_int8

_THREADS = 4


def _unet():
    torch.manual_seed(0)
    return DDPMUNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
                    resolution=16).eval()


def _inputs(i: int):
    gen = torch.Generator().manual_seed(100 + i)
    batch = 1 + i % 3  # several batch sizes: an int8 conv packs its weight per input shape
    return torch.randn(batch, 3, 16, 16, generator=gen), torch.randint(0, 1000, (batch,), generator=gen)


def _race(model, inputs):
    """model(*inputs[i]) in thread i, all released at once; the results in order."""
    barrier, results, errors = threading.Barrier(len(inputs)), [None] * len(inputs), []

    def call(i):
        try:
            barrier.wait()
            with torch.no_grad():
                results[i] = model(*inputs[i])
        except BaseException as e:  # noqa: BLE001  (reported by the test thread)
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as Python allows: the races show at once
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(switch)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("backend", ["x86", "fake"])
def test_calls_racing_into_the_first_use_each_get_a_lone_calls_outputs(backend):
    skip_without_int8(backend)
    model = _unet()
    calib = [(torch.randn(2, 3, 16, 16), torch.randint(0, 1000, (2,))) for _ in range(2)]
    qmodel = fxq.quantize(model, calib[0], calib, fxq.QuantConfig(backend=backend, seed=0))
    inputs = [_inputs(i) for i in range(_THREADS)]
    alone = copy.deepcopy(qmodel)  # a copy holds no lazily built state: its first call builds it, alone
    with torch.no_grad():
        expected = [alone(*xt) for xt in inputs]
    for _ in range(3):
        fresh = copy.deepcopy(qmodel)
        for got, want in zip(_race(fresh, inputs), expected):
            assert torch.equal(got, want)
