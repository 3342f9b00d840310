"""The Triton kernels (packed codes plus CSR outliers) and their host side: :mod:`.launch`
plans and runs them, :mod:`.configs` picks tile sizes, :mod:`.aot` compiles them for a GPU
that is not there."""

from .configs import (
    BALANCE_ABOVE,
    OUTLIER_MODES,
    KernelConfig,
    default_config,
    fit_block_k,
    multiprocessors,
    outlier_mode,
    tile_skew,
)
from .launch import INTERPRETED, Launch, available, dequantize, plan_dequantize, plan_qmatmul, qmatmul

__all__ = [
    "BALANCE_ABOVE",
    "INTERPRETED",
    "OUTLIER_MODES",
    "KernelConfig",
    "Launch",
    "available",
    "default_config",
    "dequantize",
    "fit_block_k",
    "multiprocessors",
    "outlier_mode",
    "plan_dequantize",
    "plan_qmatmul",
    "qmatmul",
    "tile_skew",
]
