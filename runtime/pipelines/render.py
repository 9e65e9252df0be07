"""Planning and Rendering (arXiv 2312.08822): PlanNet plans the layout (product included) from the
product image and the texts; RenderNet paints the poster image from that plan; the texts are then
drawn into their boxes.

RenderNet reads like diffusers' StableDiffusionControlNetPipeline, with the ControlNet condition
(spatial fusion + condition embedding) computed once before the loop instead of every step.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ..backends.base import Backend
from ..compose import compose
from ..errors import InputError
from ..families import FAMILIES
from ..images import mask_box
from ..schedulers import batch_for_guidance, get_scheduler
from ..server_stages.unet import stage_name
from .background import default_steps
from .diffusion import PromptEncoder, cache_interval, decode, denoise, family_config, initial_latents, stage_rng, to_chw
from .plan import PlanNetPlanner
from .request import LayoutElement, PosterRequest, PosterResult
from .stages import Stages

MODELS = FAMILIES["rendernet"].stage_models
STAGES = ("plan", "render", "compose")


class RenderPipeline:
    def __init__(self, backend: Backend, progress: bool = True):
        backend.bundle.require(MODELS)
        self.backend = backend
        self.progress = progress
        self.config = family_config(backend, "rendernet")
        self.sd_config = family_config(backend, "stable_diffusion")  # prompt, tokenizer, default steps
        self.planner = PlanNetPlanner(backend)
        self.prompt_encoder = PromptEncoder(backend)
        self.server_loop = backend.server_stage(stage_name("render_unet"))  # None: the loop runs here, one call per step

    def __call__(self, request: PosterRequest) -> PosterResult:
        request.validate()
        if request.product_mask is None:
            raise InputError("product_mask: the render pipeline places the product cutout into its planned box; "
                             "give a PNG with transparency or --mask")
        with Stages("render", STAGES, self.progress) as stages:
            with stages("plan"):  # PlanNet lays out the product and the other elements
                elements = self.planner(request)
            with stages("render"):  # the product cutout into its planned box, the poster image around it
                canvas, product_mask, product_box = place_product(request.product, request.product_mask, elements,
                                                                  request.size)
                image = self.render(canvas, product_mask, product_box, elements, request)
            with stages("compose"):  # texts into their boxes
                composition = compose(image, elements, request.texts, request.logo, product_mask, request.refine)
        return PosterResult.composed(composition, "render", request, stages.timings)

    def render(self, canvas, product_mask, product_box, elements, request) -> np.ndarray:
        guidance, rng = request.guidance, stage_rng(request.seed, "render")
        steps = request.steps or default_steps(self.backend.bundle.preset, self.sd_config)
        # -- prologue: once per request --------------------------------------------------------
        prompt = self.prompt_encoder(request.category)
        control = self.backend.run("render_condition", {
            "layout_masks": self.layout_masks(elements, product_box, request.size),
            "product_image": to_chw(canvas, 0.0, 1.0) * product_mask[None, None],  # product on black
        })["control_embedding"]
        scale = np.array([self.config.get("default_control_scale", 1.0)], dtype=np.float32)
        step_invariant = batch_for_guidance(
            guidance, paired={"encoder_hidden_states": prompt["encoder_hidden_states"]},
            shared={"control_embedding": control, "control_scale": scale})
        # -- prepare latents --------------------------------------------------------------------
        scheduler = get_scheduler(request.scheduler, self.config["scheduler"])
        latent_shape = (1, self.backend.contract("render_unet").input("sample").shape[1], *control.shape[2:])
        latents = initial_latents(latent_shape, scheduler, rng)
        # -- denoise: ControlNet trunk + UNet, one graph, per step -----------------------------
        latents = denoise(self.backend, "render_unet", scheduler, latents, steps, guidance, step_invariant, rng,
                          server_loop=self.server_loop, interval=cache_interval(self.config, request.cache_interval))
        # -- epilogue: decode, keep the exact product pixels -----------------------------------
        generated = decode(self.backend, latents)
        alpha = product_mask[..., None]
        return np.round(alpha * canvas + (1.0 - alpha) * generated).astype(np.uint8)

    def layout_masks(self, elements: list[LayoutElement], product_box, size) -> np.ndarray:
        """[1, channels, H, W]: per element class (the family's channel order) 1 inside its boxes;
        the ``product`` channel is the box the product was placed in."""
        width, height = size
        channels = self.config["layout_channels"]
        masks = np.zeros((1, len(channels), height, width), dtype=np.float32)
        for index, name in enumerate(channels):
            boxes = [product_box] if name == "product" else [e.box for e in elements if e.cls == name]
            for box in boxes:
                x1, y1, x2, y2 = (int(round(v)) for v in box)
                masks[0, index, max(0, y1):max(0, y2), max(0, x1):max(0, x2)] = 1.0
        return masks


def place_product(product: np.ndarray, mask: np.ndarray, elements: list[LayoutElement],
                  size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Scale the product cutout into the largest planned ``product`` box (aspect kept, centred).

    Without a planned product box the product fills the canvas the way the background pipeline
    places it. Returns the canvas (product on black), the product mask and the box it occupies.
    """
    width, height = size
    cut = mask_box(mask)
    if cut is None:
        raise InputError("product_mask: the mask marks no product pixel")
    x1, y1, x2, y2 = cut
    rgb, alpha = product[y1:y2, x1:x2], mask[y1:y2, x1:x2]
    boxes = sorted((e for e in elements if e.cls == "product"), key=lambda e: -e.area)
    target = boxes[0].box if boxes and boxes[0].area >= 16 else (0, 0, width, height)
    tw, th = target[2] - target[0], target[3] - target[1]
    scale = min(tw / rgb.shape[1], th / rgb.shape[0])
    new_w, new_h = max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))
    left = int(round(target[0] + (tw - new_w) / 2))
    top = int(round(target[1] + (th - new_h) / 2))
    left, top = min(max(0, left), width - new_w), min(max(0, top), height - new_h)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.LANCZOS), (left, top))
    mask_canvas = Image.new("L", (width, height), 0)
    mask_image = Image.fromarray(np.clip(alpha * 255.0 + 0.5, 0, 255).astype(np.uint8))
    mask_canvas.paste(mask_image.resize((new_w, new_h), Image.Resampling.BILINEAR), (left, top))
    return np.asarray(canvas), np.asarray(mask_canvas, dtype=np.float32) / 255.0, (left, top, left + new_w, top + new_h)
