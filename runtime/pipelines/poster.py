"""The default pipeline: paint a background around the product, lay out the texts on it with RADM,
then draw them (networks.md, "The pipeline users run")."""
from __future__ import annotations

from ..backends.base import Backend
from ..compose import compose
from ..errors import InputError
from ..images import fit_to_canvas
from .background import BackgroundPipeline
from .layout import RADMLayout
from .request import PosterRequest, PosterResult
from .stages import Stages

STAGES = ("background", "layout", "compose")


class PosterPipeline:
    def __init__(self, backend: Backend, progress: bool = True):
        self.progress = progress
        self.background = BackgroundPipeline(backend, progress=progress)
        self.layout = RADMLayout(backend)

    def __call__(self, request: PosterRequest) -> PosterResult:
        request.validate()
        if request.product_mask is None:
            raise InputError("product_mask: the poster pipeline paints around the product and needs its cutout; "
                             "give a PNG with transparency or --mask")
        with Stages("poster", STAGES, self.progress) as stages:
            with stages("background"):
                canvas, mask = fit_to_canvas(request.product, request.product_mask, request.size)
                background = self.background.generate(canvas, mask, request)
            with stages("layout"):
                elements = self.layout(background, request.texts, request.seed, request.layout_steps)
            with stages("compose"):
                composition = compose(background, elements, request.texts, request.logo, mask, request.refine)
        return PosterResult.composed(composition, "poster", request, stages.timings)
