"""fxq's own CPU kernels (backends/kernels/*.cpp): compiled on first use with the machine's g++, cached, loaded by
ctypes. They have a plain C ABI and include no torch header, so a build takes about a second and depends on no
torch version; their OpenMP threads are the runtime torch already loaded (libgomp, found by its soname).

Where no kernel can be had (no g++, a failed build, not x86-64 Linux, or FXQ_NATIVE=0 in the environment), every
caller runs its torch-op form instead, in both backends alike, so the int8 model and its fake-quant twin still
agree; `status()` says which holds. The cache is $FXQ_CACHE_DIR, else $XDG_CACHE_HOME/fxq, else ~/.cache/fxq,
one file per kernel source, compiler, flags and CPU (the build targets this CPU: -march=native)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

_SOURCES = Path(__file__).parent / "kernels"
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
          # no FMA contraction behind the source's back: the kernels say where they fuse, so that their float
          # output and their codes come from the same rounding
          "-ffp-contract=off")
_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | str] = {}  # kernel name -> library, or why there is none


def _cache_dir() -> Path:
    root = os.environ.get("FXQ_CACHE_DIR") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fxq")
    return Path(root) / "native"


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        info = ""
    lines = [line for line in info.splitlines() if line.startswith(("flags", "model name"))]
    return "\n".join(sorted(set(lines)))


@functools.lru_cache(maxsize=None)
def _compiler() -> tuple[tuple[str, ...], str] | str:
    """(command, version line) of the C++ compiler ($CXX, else g++), or why there is none."""
    command = shlex.split(os.environ.get("CXX") or "") or ["g++"]
    found = shutil.which(command[0])
    if found is None:
        return f"no C++ compiler ({command[0]}) on PATH"
    try:
        version = subprocess.run([found, *command[1:], "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{found} --version failed: {e}"
    first = (version.splitlines() or [""])[0]
    # OpenMP must be GNU's libgomp, the runtime torch's wheel ships: clang would bring a second one (libomp)
    if "clang" in version.lower() or not ("g++" in first or "gcc" in version.lower()):
        return f"{found} is not GNU g++ ({first!r}); set CXX to a g++"
    return (found, *command[1:]), first


def _private(path: Path, directory: bool) -> bool:
    """path is this user's own, not a link, and no one else may write it: a library found there is one this user
    built (a shared temp dir could hold anyone's)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    kind = stat.S_ISDIR if directory else stat.S_ISREG
    return kind(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build(name: str) -> ctypes.CDLL | str:
    if os.environ.get("FXQ_NATIVE", "1") == "0":
        return "FXQ_NATIVE=0 in the environment"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"fxq's kernels are built for x86-64 Linux, not {platform.system()} {platform.machine()}"
    source = _SOURCES / f"{name}.cpp"
    found = _compiler()
    if isinstance(found, str):
        return found
    command, version = found
    key = hashlib.sha256(b"\0".join([source.read_bytes(), " ".join(command).encode(), version.encode(),
                                     " ".join(_FLAGS).encode(), _cpu_signature().encode()])).hexdigest()[:20]
    shared_tmp = Path(tempfile.gettempdir()) / f"fxq-native-{os.getuid()}"
    for directory in (_cache_dir(), shared_tmp, None):
        once = directory is None
        if once:  # neither is usable: a private directory of this process, removed once it has served
            directory = Path(tempfile.mkdtemp(prefix="fxq-native-"))
        try:
            found = _load_or_build(directory / f"{name}-{key}.so", command, source)
        finally:
            if once:
                shutil.rmtree(directory, ignore_errors=True)  # (a loaded library needs no file)
        if found is not None:
            return found
    return f"no private, writable directory for fxq's kernels (tried {_cache_dir()}, {shared_tmp} and a new one)"


def _load_or_build(target: Path, command, source: Path) -> ctypes.CDLL | str | None:
    """The library at target (built there first if missing), why it failed, or None: this directory will not do."""
    directory = target.parent
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return None
    if not _private(directory, True):
        return None
    if not os.path.lexists(target):
        try:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
            os.close(fd)
        except OSError:
            return None  # not writable: the next place
        try:
            done = subprocess.run([*command, *_FLAGS, str(source), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                return f"{command[0]} could not build {source.name}: {done.stderr.strip()[-400:]}"
            os.chmod(tmp, 0o700)
            os.replace(tmp, target)  # atomic: a process racing this one loads a whole file or builds its own
        except (OSError, subprocess.SubprocessError) as e:
            return f"building {source.name} failed: {e}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if not _private(target, False):
        return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        return f"loading {target} failed: {e}"


def library(name: str) -> ctypes.CDLL | None:
    """The built kernel library `name` (backends/kernels/<name>.cpp), or None where it cannot be had."""
    found = _loaded.get(name)
    if found is None:
        with _lock:
            found = _loaded.get(name)
            if found is None:
                import torch  # noqa: F401  (its libgomp first, so the kernels' OpenMP resolves to it)
                found = _loaded[name] = _build(name)
    return None if isinstance(found, str) else found


def status(name: str) -> str:
    """'native (<compiler>)' or why the torch-op form runs instead."""
    lib = library(name)
    if lib is None:
        return f"torch ops ({_loaded[name]})"
    found = _compiler()
    return f"native ({found[1] if isinstance(found, tuple) else 'built'})"
