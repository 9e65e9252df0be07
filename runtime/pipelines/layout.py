"""RADM (CIKM 2023): layout boxes for a given background image and text lines.

Prologue (once per request): the backbone's FPN features of the image and one feature per text
line. Loop: the box sampler calls the head once per step on the current noisy boxes. Epilogue:
top-k, class-wise NMS and the score threshold (inside the sampler), then class names. On a Triton
server that offers it (``radm_layout``), prologue, loop and epilogue run there in one request.
"""
from __future__ import annotations

import numpy as np

from ..backends.base import Backend
from ..compose import compose
from ..families import FAMILIES
from ..images import fit_to_canvas, flatten
from ..progress import current
from ..schedulers.radm import Detections, RadmBoxSampler, RadmSamplerConfig
from ..text import encode_lines, load_tokenizer
from ..server_stages import radm_layout as radm_layout_stage
from .diffusion import family_config, run_side_by_side, stage_rng, to_chw
from .request import LayoutElement, PosterRequest, PosterResult
from .stages import Stages

MODELS = FAMILIES["radm"].stage_models
FPN_LEVELS = ("p2", "p3", "p4", "p5")


class RADMLayout:
    """The RADM stage: image + texts -> layout elements. Used by the layout and poster pipelines.

    ``server_layout``: use the backend's server-side stage (``radm_layout`` on a Triton server)
    when it offers one: the whole stage in one request, with the same boxes for the same seed.
    The server runs :meth:`detect` itself, over its own in-process copy of the three models."""

    def __init__(self, backend: Backend, server_layout: bool = True):
        backend.bundle.require(MODELS)
        self.backend = backend
        self.config = family_config(backend, "radm")
        self.class_names = list(self.config["class_names"])
        self.sampler = RadmBoxSampler(RadmSamplerConfig.from_bundle_config(self.config))
        self.tokenizer = load_tokenizer(backend.bundle, "radm_tokenizer", int(self.config["max_text_tokens"]),
                                        pad_id=self.config.get("text_pad_token_id"))
        self.server_layout = backend.server_stage(radm_layout_stage.NAME) if server_layout else None

    def __call__(self, image: np.ndarray, texts: list[str], seed: int, steps: int | None = None) -> list[LayoutElement]:
        """Layout of ``image`` (RGB uint8 HxWx3, H and W multiples of 64) for ``texts``."""
        ids, attention = encode_lines(self.tokenizer, texts) if texts else (None, None)
        detect = self.server_layout if self.server_layout is not None else self.detect
        detections = detect(image, ids, attention, seed, steps)
        return [LayoutElement(self.class_names[int(label)], tuple(float(v) for v in box), float(score))
                for box, score, label in zip(detections.boxes, detections.scores, detections.labels)]

    def detect(self, image: np.ndarray, ids: np.ndarray | None, attention: np.ndarray | None, seed: int,
               steps: int | None = None) -> Detections:
        """The stage on this backend: ``image`` RGB uint8 HxWx3, the texts' token ids and attention
        mask [lines, tokens] (None without texts)."""
        height, width = image.shape[:2]
        # -- prologue: once per request --------------------------------------------------------
        features, (text_features, text_mask) = run_side_by_side(  # independent calls: overlapped
            lambda: self.backend.run("radm_backbone", {"image": to_chw(image, 0.0, 255.0)}),
            lambda: self.text_features(ids, attention))
        step_invariant = {**{level: features[level] for level in FPN_LEVELS},
                          "text_features": text_features, "text_mask": text_mask,
                          "image_size": np.array([[height, width]], dtype=np.float32)}
        head = self.backend.bind("radm_head", step_invariant)  # checked once, not at every step

        # -- the loop: the head is the only per-step call ------------------------------------------
        control, stage = current(), FAMILIES["radm"].stage
        total = steps or self.sampler.config.sampling_steps
        done = 0

        def denoise(boxes: np.ndarray, timestep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            nonlocal done
            outputs = head({"boxes": boxes, "timestep": timestep})
            done += 1
            control.step(stage, done, total)
            return outputs["class_logits"], outputs["pred_boxes"]

        detections, = self.sampler.sample(denoise, [[height, width]], stage_rng(seed, "layout"), steps=steps)
        return detections

    def text_features(self, ids: np.ndarray | None, attention: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One pooled feature per text line: ``text_features`` [1, lines, dim] and ``text_mask`` [1, lines].

        Padding: a head exported with ``text_compat_view`` reproduces the public code's
        ``view(N, 768, -1)``, which mixes every line's values (padding included) into each attention
        key, so its numbers depend on the padding; that code always pads to ``max_lines`` with zero
        features and mask 0, and so do we. Otherwise only the real lines are sent (at least one: a
        zero line with mask 0, which the attention ignores).
        """
        count = 0 if ids is None else len(ids)
        dim = self.backend.contract("radm_text_encoder").output("text_features").shape[1]
        lines = int(self.config["max_lines"]) if self.config.get("text_compat_view") else max(1, count)
        features = np.zeros((1, lines, dim), dtype=np.float32)
        mask = np.zeros((1, lines), dtype=np.float32)
        if count:
            encoded = self.backend.run("radm_text_encoder", {"input_ids": ids, "attention_mask": attention})
            features[0, :count] = encoded["text_features"]
            mask[0, :count] = 1.0
        return features, mask


class LayoutPipeline:
    """RADM on a given background: the product image itself, fitted into the poster size (white margins)."""

    def __init__(self, backend: Backend, progress: bool = True):
        self.progress = progress
        self.layout = RADMLayout(backend)

    def __call__(self, request: PosterRequest) -> PosterResult:
        request.validate()
        with Stages("layout", ("layout", "compose"), self.progress) as stages:
            with stages("layout"):
                # a cutout (alpha or --mask) is shown on white, as an image viewer shows it
                background, mask = fit_to_canvas(flatten(request.product, request.product_mask), request.product_mask,
                                                 request.size)
                elements = self.layout(background, request.texts, request.seed, request.layout_steps)
            with stages("compose"):
                composition = compose(background, elements, request.texts, request.logo, mask, request.refine)
        return PosterResult.composed(composition, "layout", request, stages.timings)
