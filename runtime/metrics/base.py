"""What every metric returns (a :class:`Tally`) and how it is described (a :class:`MetricInfo`).

The papers average differently: PosterLayout's validity pools all elements of the test set, RADM's
overlap pools all element pairs, most others average per layout. A per-layout metric therefore
returns a sum and the number of things summed; adding tallies over layouts and dividing once gives
each paper's own mean, and ``count == 0`` marks a layout where the metric is undefined (for example
readability on a layout without text), which then does not drag the mean toward 0.
"""
from __future__ import annotations

from dataclasses import dataclass

LOWER, HIGHER = "lower", "higher"


@dataclass(frozen=True)
class Tally:
    total: float = 0.0
    count: int = 0

    @classmethod
    def mean_of_one(cls, value: float) -> "Tally":
        """A metric the paper averages per layout: this layout's value, weighing one."""
        return cls(float(value), 1)

    @property
    def value(self) -> float | None:
        """The mean, or None where nothing was counted (metric undefined)."""
        return self.total / self.count if self.count else None

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(self.total + other.total, self.count + other.count)


UNDEFINED = Tally()


@dataclass(frozen=True)
class MetricInfo:
    name: str  # key in reports, "<family>.<metric>"
    better: str  # LOWER or HIGHER
    value_range: str  # e.g. "[0, 1]" or "[0, inf)"
    needs: str  # "boxes", "image" (the canvas's pixels) or "saliency"
    mean_over: str  # what the set mean averages: "layouts", "elements", "pairs", "underlays", "text boxes"
    summary: str

    def __post_init__(self):
        assert self.better in (LOWER, HIGHER), self.better
        assert self.needs in ("boxes", "image", "saliency"), self.needs
