"""easyquant: data-free 4- and 3-bit weight quantization with sparse fp16 outliers (EasyQuant)."""

from .errors import EasyQuantError
from .grid import Grid
from .objective import Objective
from .outliers import sigma_mask
from .quantize import QuantConfig, quantize_weight
from .qweight import QuantizedWeight
from .solvers import GridSearch, MaxAbs, PaperAdam, RangeSolver, Search, make_solver

__all__ = [
    "EasyQuantError",
    "Grid",
    "GridSearch",
    "MaxAbs",
    "Objective",
    "PaperAdam",
    "QuantConfig",
    "QuantizedWeight",
    "RangeSolver",
    "Search",
    "make_solver",
    "quantize_weight",
    "sigma_mask",
]
__version__ = "0.1.0"

from .hf import register as _register

_register()
