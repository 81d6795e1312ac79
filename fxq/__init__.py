"""fxq: a time-step-aware quantization compiler for diffusion UNets, built on torch.fx.

    qmodel = fxq.quantize(model, example_inputs=(x, t), calib_data=calib, config=fxq.QuantConfig())
"""

import os as _os

# In a source checkout passes/ and backends/ sit beside fxq/ (the repo layout); an installed wheel maps them
# to fxq/passes and fxq/backends. Let `fxq.passes` resolve in both cases.
_here = _os.path.dirname(__file__)
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "passes")) and _os.path.isfile(
    _os.path.join(_root, "passes", "__init__.py")
):
    __path__.append(_root)  # noqa: F821  (module attribute of a package)

from fxq import calib, diffusion, errors, models, report, serialize  # noqa: E402
from fxq.api import quantize  # noqa: E402
from fxq.config import QuantConfig  # noqa: E402
from fxq.errors import FxqError  # noqa: E402
from fxq.pipeline import quantize_pipeline  # noqa: E402
from fxq.qmodel import QuantizedModel  # noqa: E402
from fxq.serialize import load, save  # noqa: E402
from fxq.tracer import trace  # noqa: E402

__all__ = ["quantize", "quantize_pipeline", "trace", "QuantConfig", "QuantizedModel", "FxqError", "save", "load",
           "calib", "diffusion", "models", "errors", "report", "serialize"]
__version__ = "0.1.0"
