"""easyquant: data-free 4- and 3-bit weight quantization with sparse fp16 outliers (EasyQuant)."""

from .checkpoint.format import Options
from .checkpoint.pipeline import quantize_model
from .core.grid import Grid
from .core.objective import Objective
from .core.outliers import sigma_mask
from .core.quantize import QuantConfig, quantize_weight
from .core.qweight import QuantizedWeight
from .core.solvers import GridSearch, MaxAbs, PaperAdam, RangeSolver, Search, make_solver
from .errors import EasyQuantError

__all__ = [
    "EasyQuantError",
    "Grid",
    "GridSearch",
    "MaxAbs",
    "Objective",
    "Options",
    "PaperAdam",
    "QuantConfig",
    "QuantizedWeight",
    "RangeSolver",
    "Search",
    "make_solver",
    "quantize_model",
    "quantize_weight",
    "sigma_mask",
]
__version__ = "0.1.0"

from .integrations.hf import register as _register

_register()
