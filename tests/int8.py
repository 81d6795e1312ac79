"""Whether this CPU runs fxq's x86 int8 kernels: the one skip for every test that needs them."""

import pytest

from fxq.backends import x86_glue

WHY_NOT = x86_glue.cpu_int8_support()
needs_int8 = pytest.mark.skipif(WHY_NOT is not None, reason=f"no int8 x86 kernels here: {WHY_NOT}")


def skip_without_int8(backend: str = "x86") -> None:
    """In a test run for several backends: skip its x86 run where the kernels cannot run."""
    if backend == "x86" and WHY_NOT is not None:
        pytest.skip(f"no int8 x86 kernels here: {WHY_NOT}")
