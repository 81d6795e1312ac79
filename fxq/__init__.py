"""fxq: a time-step-aware quantization compiler for diffusion UNets, built on torch.fx.

    qmodel = fxq.quantize(model, example_inputs=(x, t), calib_data=calib, config=fxq.QuantConfig())
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _bind_sibling_packages() -> None:
    """passes/ and backends/ sit beside fxq/ in the repository (the design card); a wheel installs them as
    fxq/passes and fxq/backends (pyproject's package-dir). Imported from a checkout (an editable install, or the
    checkout on sys.path as in tests and benchmarks), bind exactly these two names to this checkout's folders:
    nothing else beside fxq/ (tests/, the checkout itself) becomes part of the package, and an editable install
    of another checkout can never supply passes or backends to this fxq."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    for name in ("passes", "backends"):
        folder = _os.path.join(_os.path.dirname(here), name)
        init = _os.path.join(folder, "__init__.py")
        if _os.path.isdir(_os.path.join(here, name)) or not _os.path.isfile(init):
            continue  # an installed wheel: a plain subpackage
        spec = _importlib_util.spec_from_file_location(f"{__name__}.{name}", init,
                                                       submodule_search_locations=[folder])
        module = _importlib_util.module_from_spec(spec)
        _sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del _sys.modules[spec.name]
            raise
        globals()[name] = module


_bind_sibling_packages()

from fxq import calib, diffusion, errors, models, report, serialize  # noqa: E402
from fxq.api import quantize  # noqa: E402
from fxq.config import QuantConfig  # noqa: E402
from fxq.errors import FxqError  # noqa: E402
from fxq.pipeline import quantize_pipeline  # noqa: E402
from fxq.qmodel import QuantizedModel  # noqa: E402
from fxq.serialize import load, save  # noqa: E402
from fxq.tracing.tracer import trace  # noqa: E402

__all__ = ["quantize", "quantize_pipeline", "trace", "QuantConfig", "QuantizedModel", "FxqError", "save", "load",
           "calib", "diffusion", "models", "errors", "report", "serialize"]
__version__ = "0.1.0"
