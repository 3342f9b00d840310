"""Other data-free quantizers, run on the same weights for comparison.

Each returns the dequantized weight and its bits per weight with every overhead counted.
"""

from __future__ import annotations

import torch


def hqq_quantize(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, float]:
    """HQQ (PyPI ``hqq``) with its library defaults: asymmetric, groups along the input
    dimension (``axis=1``), zero point optimised by its half-quadratic solver, scale and
    zero stored in fp16 (as ``HQQLinear`` keeps them)."""
    from hqq.core.quantize import Quantizer

    w_q, meta = Quantizer.quantize(
        w.float(),
        nbits=bits,
        group_size=group_size,
        optimize=True,
        round_zero=bits == 4,
        axis=1,
        bitpack=False,
        device=str(w.device),
    )
    scale, zero = meta["scale"].half().float(), meta["zero"].half().float()
    deq = ((w_q.float() - zero) * scale).reshape(w.shape)
    overhead = 2 * 16 * scale.numel() / w.numel()
    return deq.to(w.dtype), bits + overhead
