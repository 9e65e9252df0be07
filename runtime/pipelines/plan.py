"""PlanNet (arXiv 2312.08822): plan a whole poster's layout, product included, for a blank canvas.

Prologue (once per request): the encoder turns the product image and the text lines into the
denoiser's cross-attention memory. Loop: the discrete-diffusion sampler calls the denoiser once per
level; when the backend offers it (a Triton server with ``plannet_sampler``), the whole loop runs
in the server instead, one request for all levels, with the same tokens for the same seed.
Epilogue: tokens -> boxes in pixels with class names.
"""
from __future__ import annotations

import numpy as np

from ..backends.base import Backend
from ..errors import InputError
from ..families import FAMILIES
from ..images import fit_to_canvas, flatten, resize_rgb
from ..progress import current
from ..schedulers.plannet import PlanNetSampler, PlanNetSamplerConfig
from ..text import encode_lines, load_tokenizer
from ..server_stages import plannet as plannet_stage
from .diffusion import family_config, stage_rng, to_chw
from .request import LayoutElement, PosterRequest

MODELS = FAMILIES["plannet"].stage_models


class PlanNetPlanner:
    """``server_loop``: use the backend's server-side loop when it offers one (False: always loop here)."""

    def __init__(self, backend: Backend, server_loop: bool = True):
        backend.bundle.require(MODELS)
        self.backend = backend
        self.server_loop = backend.server_stage(plannet_stage.NAME) if server_loop else None
        self.config = family_config(backend, "plannet")
        self.class_names = list(self.config["class_names"])
        self.sampler = PlanNetSampler(PlanNetSamplerConfig.from_bundle_config(self.config))
        self.tokenizer = load_tokenizer(backend.bundle, "plannet_tokenizer", int(self.config["max_text_tokens"]))

    def __call__(self, request: PosterRequest) -> list[LayoutElement]:
        width, height = request.size
        levels = self.sampler.config.num_timesteps
        if request.layout_steps is not None and request.layout_steps > levels:
            raise InputError(f"--layout-steps: got {request.layout_steps}, PlanNet has {levels} diffusion levels; "
                             f"expected 1..{levels}")
        # -- prologue: once per request --------------------------------------------------------
        memory = self.backend.run("plannet_encoder", {"image": self.product_pixels(request), **self.encode_texts(request.texts)})
        # The product is always part of the plan: element 0 is fixed to the product class, and the
        # sampler fills in its box and every other element.
        fixed = self.sampler.blank_tokens(1)
        if "product" in self.class_names:
            fixed[0, 0, 0] = self.class_names.index("product")

        # -- the loop: the denoiser is the only per-step call --------------------------------------
        generator = stage_rng(request.seed, "plan")
        if self.server_loop is not None:  # every level in one request; the server draws from `generator`
            tokens = self.server_loop(memory["memory"], memory["memory_mask"], fixed, request.layout_steps or levels,
                                      [generator])
        else:
            denoiser = self.backend.bind("plannet_denoiser", memory)  # the memory is checked once, not per step
            control, stage = current(), FAMILIES["plannet"].stage

            def denoise(tokens: np.ndarray, timestep: np.ndarray) -> np.ndarray:
                return denoiser({"tokens": tokens, "timestep": timestep})["logits"]

            tokens = self.sampler.sample(denoise, 1, generator, steps=request.layout_steps, fixed_tokens=fixed,
                                         on_step=lambda step, steps: control.step(stage, step, steps))
        # -- epilogue: tokens -> boxes -----------------------------------------------------------
        layout, = self.sampler.decode(tokens, [[height, width]])
        # PlanNet gives no confidence: every planned element is kept, with score 1
        return [LayoutElement(self.class_names[int(label)], tuple(float(v) for v in box), 1.0)
                for box, label in zip(layout.boxes, layout.labels)]

    def product_pixels(self, request: PosterRequest) -> np.ndarray:
        """The product cutout on white, fitted into the encoder's square, RGB 0..1 [1, 3, S, S]."""
        side = self.backend.contract("plannet_encoder").input("image").shape[2]
        rgb = flatten(request.product, request.product_mask)
        square, _ = fit_to_canvas(rgb, None, (max(rgb.shape[:2]),) * 2)
        return to_chw(resize_rgb(square, (side, side)), 0.0, 1.0)

    def encode_texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        """``text_ids`` int64 and ``text_mask`` float32, both [1, lines, tokens]. Without texts one
        all-padding line, which the encoder masks out of the memory."""
        lines = texts or [""]
        ids, mask = encode_lines(self.tokenizer, lines)
        if not texts:
            mask[:] = 0
        return {"text_ids": ids[None], "text_mask": mask[None].astype(np.float32)}
