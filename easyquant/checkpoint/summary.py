"""What a run made: each quantized module's row (shape, bits, outliers), sizes, and the
one-line and markdown reports of them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Summary:
    out: Path
    layers: list[dict] = field(default_factory=list)
    source_bytes: int = 0
    output_bytes: int = 0
    left_out: list[str] = field(default_factory=list)  # source files a loader does not need
    model_weights: int = 0  # every floating-point weight of the source checkpoint

    @property
    def quantized_weights(self) -> int:
        return sum(r["rows"] * r["cols"] for r in self.layers)

    @property
    def quantized_share(self) -> float:
        return self.quantized_weights / max(self.model_weights, 1)

    @property
    def bits_per_weight(self) -> float:
        return sum(r["bits_per_weight"] * r["rows"] * r["cols"] for r in self.layers) / max(self.quantized_weights, 1)

    @property
    def outlier_fraction(self) -> float:
        return sum(r["outliers"] for r in self.layers) / max(self.quantized_weights, 1)

    def line(self) -> str:
        left_out = f"; not copied: {', '.join(self.left_out)}" if self.left_out else ""
        experts = sum(1 for r in self.layers if r.get("expert"))
        what = f"{len(self.layers) - experts} linear layers" + (f" and {experts} expert matrices" if experts else "")
        return (
            f"{what}, {self.quantized_weights / 1e6:.1f}M weights ({self.quantized_share:.0%} of the model's) at "
            f"{self.bits_per_weight:.3f} bits/weight ({self.outlier_fraction:.3%} outliers); "
            f"checkpoint {self.source_bytes / 2**20:.1f} MiB -> {self.output_bytes / 2**20:.1f} MiB{left_out}"
        )

    def settings_map(self) -> str:
        """How many layers took each (bits, group size): the allocation a bits budget chose."""
        counts: dict[tuple, int] = {}
        for r in self.layers:
            key = f"{r.get('bits')}-bit " + (
                "per channel" if r.get("group_size") == r["cols"] else f"g{r.get('group_size')}"
            )
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{n} at {key}" for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "out"}

    def markdown(self) -> str:
        rows = [
            f"| {r['module']} | {r['rows']}x{r['cols']} | {r.get('bits', '-')} | {r.get('group_size', '-')} "
            f"| {r['bits_per_weight']:.3f} | {r['outliers']} | {r['outliers'] / (r['rows'] * r['cols']):.3%} |"
            for r in self.layers
        ]
        return "\n".join(
            [
                "# easyquant summary",
                "",
                self.line(),
                "",
                "| module | shape | bits | group | bits/weight | outliers | outlier fraction |",
                "|---|---|---|---|---|---|---|",
                *rows,
                "",
            ]
        )
