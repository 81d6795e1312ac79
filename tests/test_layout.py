"""The package layout: fxq.passes / fxq.backends come from the same tree as fxq, from a checkout and from a wheel
alike, and nothing else beside fxq/ (tests/, the checkout itself) is part of the package."""
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import fxq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter: prints where fxq and its two sibling packages came from, and what must not resolve.
PROBE = """
import importlib.util, json, os
import fxq, fxq.passes.fold_bn, fxq.backends.fake
found = {
    "fxq": os.path.dirname(os.path.abspath(fxq.__file__)),
    "passes": [os.path.abspath(p) for p in fxq.passes.__path__],
    "backends": [os.path.abspath(p) for p in fxq.backends.__path__],
    "fold_bn": os.path.abspath(fxq.passes.fold_bn.__file__),
    "same_module": fxq.api.fold_bn is fxq.passes.fold_bn.fold_bn,
    "strays": [n for n in ("fxq.tests", "fxq.fxq", "fxq.benchmarks", "fxq.docs") if importlib.util.find_spec(n)],
}
"""


def _probe(pythonpath: str, cwd: str, extra: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    code = PROBE + extra + "\nprint(json.dumps(found))\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check_same_tree(found: dict, package_dir: str, passes_dir: str, backends_dir: str) -> None:
    assert found["fxq"] == package_dir
    assert found["passes"] == [passes_dir]
    assert found["backends"] == [backends_dir]
    assert found["fold_bn"] == os.path.join(passes_dir, "fold_bn.py")
    assert found["same_module"]
    assert found["strays"] == []


@pytest.mark.parametrize("name", ["fxq.tests", "fxq.fxq", "fxq.benchmarks", "fxq.docs"])
def test_nothing_beside_fxq_is_part_of_the_package(name):
    assert importlib.util.find_spec(name) is None
    with pytest.raises(ImportError):
        importlib.import_module(name)


def test_public_names_resolve():
    for name in fxq.__all__:
        assert getattr(fxq, name) is not None
    for module in ("calib", "diffusion", "models", "report", "serialize", "errors"):
        assert importlib.import_module(f"fxq.{module}") is getattr(fxq, module)
    assert callable(fxq.calib.trajectory) and callable(fxq.report.float_summary)
    assert callable(fxq.serialize.register_module) and callable(fxq.models.pretrained)
    assert fxq.diffusion.DDIM and fxq.models.DDPMUNet


def test_a_checkout_binds_its_own_passes_and_backends():
    # A fresh interpreter with the checkout on sys.path, run from elsewhere: an editable install of some other
    # checkout (a shared virtualenv) must not supply passes/backends to this fxq.
    found = _probe(ROOT, cwd=os.path.dirname(ROOT))
    _check_same_tree(found, os.path.join(ROOT, "fxq"), os.path.join(ROOT, "passes"), os.path.join(ROOT, "backends"))


@pytest.mark.slow
def test_an_installed_wheel_holds_the_whole_package(tmp_path):
    """Build a wheel from the tracked files (no network, no build isolation), unpack it as an install would, and
    import fxq from it in a fresh interpreter: every subpackage and the weights are inside, nothing else."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), src / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("fxq-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist()}
        z.extractall(site)
    assert tops == {"fxq", next(t for t in tops if t.endswith(".dist-info"))}
    fxq_dir = str(site / "fxq")
    found = _probe(str(site), cwd=str(tmp_path), extra="""
import torch
from torch import nn
m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))
x = torch.randn(2, 3, 8, 8)
q = fxq.quantize(m, example_inputs=(x,), calib_data=[(x,)], config=fxq.QuantConfig(timestep_arg=None))
assert fxq.report.quantized_ops(q)["conv"] == 2
assert fxq.models.pretrained("ddpm32") is not None
""")
    _check_same_tree(found, fxq_dir, os.path.join(fxq_dir, "passes"), os.path.join(fxq_dir, "backends"))
