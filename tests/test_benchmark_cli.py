"""Every benchmark script answers --help: argparse formats each help string with %, so one stray "%" in a help text
crashes the script before it parses anything (ablation.py's did)."""

import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
DRIVER = """
import runpy, sys
failed = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    try:
        runpy.run_path(path, run_name="__main__")
        failed.append(f"{path}: returned without exiting")
    except SystemExit as e:
        if e.code not in (0, None):
            failed.append(f"{path}: exit {e.code}")
    except Exception as e:
        failed.append(f"{path}: {type(e).__name__}: {e}")
print("FAILED:" + "|".join(failed))
"""


def _scripts():
    out = []
    for name in sorted(os.listdir(BENCH)):
        path = os.path.join(BENCH, name)
        if name.endswith(".py"):
            with open(path) as f:
                if "ArgumentParser(" in f.read():
                    out.append(path)
    return out


def test_every_benchmark_script_prints_its_help():
    scripts = _scripts()
    assert len(scripts) >= 15, scripts  # the folder's scripts were found
    proc = subprocess.run([sys.executable, "-c", DRIVER, *scripts], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(BENCH))
    failed = proc.stdout.rpartition("FAILED:")[2].strip()
    assert proc.returncode == 0 and failed == "", failed or proc.stderr[-2000:]
    assert proc.stdout.count("usage:") == len(scripts)
