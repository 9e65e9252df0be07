"""Layout quality metrics (torch-free): PosterLayout's, RADM's and LayoutGAN++'s, from their
published definitions. See docs/metrics.md for each formula, its range and direction."""
from .base import MetricInfo, Tally
from .layout import LAYOUT_CLASSES, Layout, load_layout, make_layout, parse_layout
from .report import METRICS, MetricDelta, compare_layout_metrics, evaluate_layout, layout_metrics, summarize

__all__ = ["LAYOUT_CLASSES", "METRICS", "Layout", "MetricDelta", "MetricInfo", "Tally", "compare_layout_metrics",
           "evaluate_layout", "layout_metrics", "load_layout", "make_layout", "parse_layout", "summarize"]
