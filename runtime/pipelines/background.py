"""Background generation around a fixed product (arXiv 2312.13309): Stable Diffusion inpainting
whose category identifier token attends only to the background, plus an optional style image.

Reads like diffusers' StableDiffusionInpaintPipeline: encode the prompt, encode the style image,
encode the masked product image, prepare latents, denoise, decode. Everything but the UNet runs
once per request, before the loop.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..backends.base import Backend
from ..errors import InputError
from ..families import FAMILIES
from ..images import MASK_THRESHOLD, fit_to_canvas, resize_rgb
from ..schedulers import batch_for_guidance, get_scheduler
from ..server_stages.unet import stage_name
from .diffusion import (PromptEncoder, cache_interval, decode, denoise, family_config, initial_latents, run_side_by_side,
                        stage_rng, to_chw)
from .request import PosterRequest, PosterResult
from .stages import Stages

MODELS = FAMILIES["stable_diffusion"].stage_models
#: Steps when the request names none, for bundles whose config should not decide: the tiny
#: preset holds random weights for tests and demos, where only speed matters.
PRESET_STEPS = {"tiny": 4}


def default_steps(preset: str, config: dict) -> int:
    return int(PRESET_STEPS.get(preset) or config.get("num_inference_steps", 30))


class BackgroundPipeline:
    def __init__(self, backend: Backend, progress: bool = True):
        backend.bundle.require(MODELS)
        self.backend = backend
        self.progress = progress
        self.config = family_config(backend, "stable_diffusion")
        self.prompt_encoder = PromptEncoder(backend)
        self.server_loop = backend.server_stage(stage_name("bg_unet"))  # None: the loop runs here, one call per step

    def generate(self, canvas: np.ndarray, product_mask: np.ndarray, request: PosterRequest) -> np.ndarray:
        """Paint the background of ``canvas`` (RGB uint8) where ``product_mask`` (float HxW, 1 = product) is 0."""
        guidance, rng = request.guidance, stage_rng(request.seed, "background")
        steps = request.steps or default_steps(self.backend.bundle.preset, self.config)
        # -- prologue: once per request --------------------------------------------------------
        (masked_image_latents, paint_mask), prompt, (style_embeds, ip_scale) = run_side_by_side(
            lambda: self.encode_product(canvas, product_mask), lambda: self.prompt_encoder(request.category),
            lambda: self.encode_style(request.style))
        step_invariant = batch_for_guidance(
            guidance,
            paired={**prompt, "image_prompt_embeds": (np.zeros_like(style_embeds), style_embeds)},
            shared={"masked_image_latents": masked_image_latents, "mask": paint_mask,
                    "ip_scale": np.array([ip_scale], dtype=np.float32)})
        # -- prepare latents --------------------------------------------------------------------
        scheduler = get_scheduler(request.scheduler, self.config["scheduler"])
        latents = initial_latents(masked_image_latents.shape, scheduler, rng)
        # -- denoise: the UNet is the only per-step call -----------------------------------------
        latents = denoise(self.backend, "bg_unet", scheduler, latents, steps, guidance, step_invariant, rng,
                          server_loop=self.server_loop, interval=cache_interval(self.config, request.cache_interval))
        # -- epilogue: decode, then put the exact product pixels back (the VAE blurs fine detail)
        generated = decode(self.backend, latents)
        alpha = product_mask[..., None]
        return np.round(alpha * canvas + (1.0 - alpha) * generated).astype(np.uint8)

    def encode_style(self, style: np.ndarray | None) -> tuple[np.ndarray, float]:
        """Style image -> image-prompt tokens and their attention scale. No style: zero tokens at scale 0,
        which leaves the image-prompt attention branch without effect."""
        contract = self.backend.contract("image_encoder")
        if style is None:
            shape = (1, *contract.output("image_prompt_embeds").shape[1:])
            return np.zeros(shape, dtype=np.float32), 0.0
        side = contract.input("image").shape[2]
        pixels = to_chw(resize_rgb(style, (side, side)), 0.0, 1.0)
        embeds = self.backend.run("image_encoder", {"image": pixels})["image_prompt_embeds"]
        return embeds, float(self.config.get("default_ip_scale", 1.0))

    def encode_product(self, canvas: np.ndarray, product_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(latents of the canvas with the background blanked, latent-size mask with 1 = paint)."""
        product = (product_mask > MASK_THRESHOLD)[..., None]
        masked = to_chw(canvas, -1.0, 1.0) * product.transpose(2, 0, 1)[None]  # background -> 0 (mid grey)
        latents = self.backend.run("vae_encoder", {"image": masked.astype(np.float32)})["latent"]
        height, width = latents.shape[2:]
        # A latent cell is painted only if most of its 8x8 pixels are background: the product's
        # edge stays the VAE's to reconstruct, and the exact product pixels are pasted back anyway.
        small = Image.fromarray(((1.0 - product_mask) * 255).astype(np.uint8)).resize((width, height), Image.Resampling.BOX)
        paint = (np.asarray(small, dtype=np.float32) / 255.0 > 0.5).astype(np.float32)
        return latents, paint[None, None]

    def __call__(self, request: PosterRequest) -> PosterResult:
        request.validate()
        if request.product_mask is None:
            raise InputError("product_mask: the background pipeline paints around the product and needs its cutout; "
                             "give a PNG with transparency or --mask")
        with Stages("background", ("background",), self.progress) as stages:
            with stages("background"):
                canvas, mask = fit_to_canvas(request.product, request.product_mask, request.size)
                image = self.generate(canvas, mask, request)
        return PosterResult(image, [], "background", request, timings=stages.timings)
