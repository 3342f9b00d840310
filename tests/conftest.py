import pytest
import torch


def heavy_tailed(rows: int, cols: int, seed: int = 0, df: float = 4.0, scale: float = 0.02) -> torch.Tensor:
    """Student-t weights: a heavy tail like real LLM weights, so n-sigma finds outliers."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    chi2 = torch.randn(rows, cols, int(df), generator=g, dtype=torch.float64).square().sum(-1)
    return (normal / (chi2 / df).sqrt() * scale).float()


@pytest.fixture
def weight() -> torch.Tensor:
    return heavy_tailed(96, 200, seed=1)
