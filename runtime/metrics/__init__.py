"""Layout quality metrics (torch-free): PosterLayout's, RADM's and LayoutGAN++'s, from their
published definitions (the ``posterrt`` protocol) or as their benchmark scripts compute them (the
``posterlayout`` and ``radm`` protocols). See docs/metrics.md for each formula, its range and direction."""
from .base import MetricInfo, Tally
from .batch import Batch, batch_layouts, coco_layouts, read_batch
from .layout import LAYOUT_CLASSES, Layout, load_layout, make_layout, parse_layout
from .protocols import PROTOCOLS, Protocol
from .report import METRICS, MetricDelta, compare_layout_metrics, evaluate_layout, layout_metrics, summarize

__all__ = ["LAYOUT_CLASSES", "METRICS", "PROTOCOLS", "Batch", "Layout", "MetricDelta", "MetricInfo", "Protocol", "Tally",
           "batch_layouts", "coco_layouts", "compare_layout_metrics", "evaluate_layout", "layout_metrics",
           "load_layout", "make_layout", "parse_layout", "read_batch", "summarize"]
