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
    #: False where the metric's input (image, saliency) was missing, as opposed to present with
    #: nothing to count: a script that prints 0 for the latter never ran without its input.
    measured: bool = True

    @classmethod
    def mean_of_one(cls, value: float) -> "Tally":
        """A metric the paper averages per layout: this layout's value, weighing one."""
        return cls(float(value), 1)

    @property
    def value(self) -> float | None:
        """The mean, or None where nothing was counted (metric undefined)."""
        return self.total / self.count if self.count else None

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(self.total + other.total, self.count + other.count, self.measured or other.measured)


UNDEFINED = Tally()
NOT_MEASURED = Tally(measured=False)


@dataclass(frozen=True)
class MetricInfo:
    name: str  # key in reports, "<family>.<metric>"
    better: str  # LOWER or HIGHER
    value_range: str  # e.g. "[0, 1]" or "[0, inf)"
    needs: str  # "boxes", "image" (the canvas's pixels) or "saliency"
    mean_over: str  # what the set mean averages: "layouts", "elements", "pairs", "underlays", "text boxes"
    summary: str
    #: The set mean where nothing was counted: None (undefined) for posterrt; a benchmark script
    #: that prints 0 there has 0.
    empty_value: float | None = None

    def set_mean(self, total: Tally) -> float | None:
        if total.count:
            return total.value
        return self.empty_value if total.measured else None

    def __post_init__(self):
        assert self.better in (LOWER, HIGHER), self.better
        assert self.needs in ("boxes", "image", "saliency"), self.needs
