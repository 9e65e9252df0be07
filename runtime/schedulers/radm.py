"""RADM's box sampler: DiffusionDet's DDIM over box proposals, then top-k, class-wise NMS, threshold.

Layouts live in a diffusion space of normalized (cx, cy, w, h) boxes scaled to
[-box_scale, box_scale]. Each step maps the current proposals to pixel x1y1x2y2, asks the head
(``radm_head``) for class logits and an x0 prediction in pixels, maps that back and takes a DDIM
step (Song et al.) with eta; with more than one step, proposals whose best class score is below
``score_threshold`` are renewed with fresh noise (DiffusionDet's box renewal).

The sampler knows nothing of backends: it calls ``denoise(boxes, timestep)``, a callable that
closes over everything fixed for the request (FPN features, text features, image size)::

    def denoise(boxes, timestep):
        out = backend.run("radm_head", {**features, "boxes": boxes, "timestep": timestep, ...})
        return out["class_logits"], out["pred_boxes"]

Differences from the public DiffusionDet/RADM ``ddim_sample``, all deliberate:

* per-image box renewal (the public code filters every image of a batch with image 0's scores),
  renewed proposals replaced in place (the head is permutation-equivariant over proposals);
* with several steps the ensemble pools the top-k of *every* model call, the last included (the
  public loop ``continue``s past its final call, computing and then discarding it), and the score
  threshold applies to the ensemble too (public code: only to single-step output);
* timesteps are float32, as the contract fixes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from ..errors import BundleError, ContractError, InputError
from .boxes import batched_nms, clip_boxes, cxcywh_to_xyxy, xyxy_to_cxcywh

#: ``denoise(boxes [B, N, 4] pixel xyxy float32, timestep [B] float32) -> (class_logits [B, N, C], pred_boxes [B, N, 4])``
BoxDenoiser = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class RadmSamplerConfig:
    """``config["radm"]`` of a bundle manifest, sampler part. Defaults are the paper's."""

    class_names: tuple[str, ...]
    num_proposals: int = 100
    box_scale: float = 2.0
    num_timesteps: int = 1000
    schedule: str = "cosine"
    sampling_steps: int = 1
    ddim_eta: float = 1.0
    box_renewal: bool = True
    top_k: int = 100
    nms_iou: float = 0.15
    score_threshold: float = 0.25
    #: RADM's public detector builds images_whwh from a CHW shape unpacked as (c, w, h), i.e.
    #: (H, W, H, W): a checkpoint trained with it saw proposals scaled that way. True reproduces it.
    swapped_image_whwh: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_bundle_config(cls, config: Mapping) -> "RadmSamplerConfig":
        """From ``bundle.config["radm"]``; keys the sampler does not use (model sizes) are ignored."""
        if not isinstance(config.get("class_names"), (list, tuple)) or not config["class_names"]:
            raise BundleError(f"bundle config radm.class_names: got {config.get('class_names')!r}, "
                              f"expected a non-empty list of class names")
        fields = {key: config[key] for key in cls.__dataclass_fields__ if key in config}
        fields["class_names"] = tuple(fields["class_names"])
        if "num_classes" in config and config["num_classes"] != len(fields["class_names"]):
            raise BundleError(f"bundle config radm.num_classes: got {config['num_classes']!r}, expected "
                              f"{len(fields['class_names'])} (the number of class_names)")
        result = cls(**fields)
        result.validate()
        return result

    def validate(self) -> None:
        def check(name, ok, expected):
            if not ok:
                raise BundleError(f"bundle config radm.{name}: got {getattr(self, name)!r}, expected {expected}")

        check("num_proposals", _is_int(self.num_proposals) and self.num_proposals >= 1, "an integer >= 1")
        check("box_scale", _is_number(self.box_scale) and self.box_scale > 0, "a number > 0")
        check("num_timesteps", _is_int(self.num_timesteps) and self.num_timesteps >= 1, "an integer >= 1")
        check("schedule", self.schedule == "cosine", "'cosine'")
        check("sampling_steps", _is_int(self.sampling_steps) and 1 <= self.sampling_steps <= self.num_timesteps,
              f"an integer in 1..num_timesteps={self.num_timesteps}")
        check("ddim_eta", _is_number(self.ddim_eta) and self.ddim_eta >= 0, "a number >= 0")
        check("box_renewal", isinstance(self.box_renewal, bool), "true or false")
        check("swapped_image_whwh", isinstance(self.swapped_image_whwh, bool), "true or false")
        check("top_k", _is_int(self.top_k) and self.top_k >= 1, "an integer >= 1")
        check("nms_iou", _is_number(self.nms_iou) and 0 <= self.nms_iou <= 1, "a number in [0, 1]")
        check("score_threshold", _is_number(self.score_threshold) and 0 <= self.score_threshold <= 1,
              "a number in [0, 1]")


@dataclass
class Detections:
    """One image's layout: ``boxes`` [n, 4] pixel x1y1x2y2 (clipped to the image, float32),
    ``scores`` [n] float32 best first, ``labels`` [n] int64 indices into ``class_names``."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def cosine_alphas_cumprod(num_timesteps: int, s: float = 0.008) -> np.ndarray:
    """DiffusionDet's ``cosine_beta_schedule`` (Nichol & Dhariwal), float64: alpha_bar from the
    cosine on T + 1 points, betas from its ratios clipped to [0, 0.999], then their product again."""
    x = np.linspace(0, num_timesteps, num_timesteps + 1, dtype=np.float64)
    alpha_bar = np.cos((x / num_timesteps + s) / (1 + s) * math.pi * 0.5) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0, 0.999)
    return np.cumprod(1.0 - betas)


def ddim_time_pairs(num_timesteps: int, steps: int) -> list[tuple[int, int]]:
    """(t, t_next) pairs of DiffusionDet: ``linspace(-1, T - 1, steps + 1)`` truncated to ints,
    descending; t_next = -1 marks the last call (1 step: [(T - 1, -1)])."""
    times = np.linspace(-1, num_timesteps - 1, steps + 1).astype(np.int64)[::-1].tolist()
    return list(zip(times[:-1], times[1:]))


def image_whwh(image_sizes: np.ndarray, swapped: bool = False) -> np.ndarray:
    """[B, 4] (W, H, W, H) scale factors from [B, 2] (height, width); (H, W, H, W) if ``swapped``."""
    height, width = image_sizes[:, 0], image_sizes[:, 1]
    first, second = (height, width) if swapped else (width, height)
    return np.stack([first, second, first, second], axis=-1).astype(np.float32)


def diffusion_to_pixel(x: np.ndarray, whwh: np.ndarray, scale: float) -> np.ndarray:
    """Diffusion-space cxcywh [B, N, 4] -> pixel x1y1x2y2: clamp to [-scale, scale], map to [0, 1]."""
    unit = (np.clip(x, -scale, scale) / scale + 1) / 2
    return (cxcywh_to_xyxy(unit) * whwh[:, None, :]).astype(np.float32)


def pixel_to_diffusion(boxes: np.ndarray, whwh: np.ndarray, scale: float) -> np.ndarray:
    """Pixel x1y1x2y2 [B, N, 4] -> diffusion-space cxcywh, clamped to [-scale, scale]."""
    unit = xyxy_to_cxcywh(boxes / whwh[:, None, :])
    return np.clip((unit * 2 - 1) * scale, -scale, scale).astype(np.float32)


def top_candidates(class_logits: np.ndarray, pred_boxes: np.ndarray, top_k: int) -> tuple[np.ndarray, ...]:
    """One image's best ``top_k`` (proposal, class) pairs by sigmoid score: boxes, scores, labels."""
    num_classes = class_logits.shape[-1]
    scores = _sigmoid(class_logits.astype(np.float32)).reshape(-1)
    k = min(top_k, scores.size)
    best = np.argpartition(-scores, k - 1)[:k]
    return pred_boxes[best // num_classes], scores[best], (best % num_classes).astype(np.int64)


def select_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, image_size,
                      nms_iou: float, score_threshold: float) -> Detections:
    """Class-wise NMS, then scores > threshold, then boxes clipped to the image; empty boxes dropped
    (Detectron2's ``detector_postprocess``)."""
    keep = batched_nms(boxes, scores, labels, nms_iou)
    keep = keep[scores[keep] > score_threshold]
    height, width = float(image_size[0]), float(image_size[1])
    clipped = clip_boxes(boxes[keep].astype(np.float32), height, width)
    nonempty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return Detections(clipped[nonempty], scores[keep][nonempty].astype(np.float32), labels[keep][nonempty])


def postprocess(class_logits: np.ndarray, pred_boxes: np.ndarray, image_size, top_k: int, nms_iou: float,
                score_threshold: float) -> Detections:
    """One image's head output [N, C], [N, 4] -> detections (top-k, class-wise NMS, threshold, clip)."""
    return select_detections(*top_candidates(class_logits, pred_boxes, top_k), image_size, nms_iou, score_threshold)


class RadmBoxSampler:
    """DDIM over RADM's box proposals. One instance per bundle; ``sample`` is reentrant."""

    def __init__(self, config: RadmSamplerConfig):
        config.validate()
        self.config = config
        self.alphas_cumprod = cosine_alphas_cumprod(config.num_timesteps)

    def sample(self, denoise: BoxDenoiser, image_sizes, generator: np.random.Generator,
               steps: int | None = None) -> list[Detections]:
        """Layouts for a batch of images of ``image_sizes`` [B, 2] (height, width) in pixels.

        ``steps`` overrides ``config.sampling_steps``. Randomness comes from ``generator`` only.
        """
        cfg = self.config
        steps = cfg.sampling_steps if steps is None else steps
        if not _is_int(steps) or not 1 <= steps <= cfg.num_timesteps:
            raise InputError(f"steps: got {steps!r}, expected an integer in 1..{cfg.num_timesteps}")
        image_sizes = np.asarray(image_sizes, dtype=np.float32)
        if image_sizes.ndim != 2 or image_sizes.shape[1] != 2 or not (image_sizes > 0).all():
            raise InputError(f"image_sizes: got shape {image_sizes.shape}, expected [batch, 2] positive (height, width)")
        batch, proposals = len(image_sizes), cfg.num_proposals
        whwh = image_whwh(image_sizes, cfg.swapped_image_whwh)

        x = generator.standard_normal((batch, proposals, 4), dtype=np.float32)
        candidates: list[list[tuple]] = [[] for _ in range(batch)]
        for t, t_next in ddim_time_pairs(cfg.num_timesteps, steps):
            class_logits, pred_boxes = denoise(diffusion_to_pixel(x, whwh, cfg.box_scale),
                                               np.full(batch, t, dtype=np.float32))
            self._check_outputs(class_logits, pred_boxes, batch)
            for image in range(batch):
                candidates[image].append(top_candidates(class_logits[image], pred_boxes[image], cfg.top_k))
            if t_next < 0:
                break
            x = self._ddim_step(x, pixel_to_diffusion(pred_boxes, whwh, cfg.box_scale), t, t_next, generator)
            if cfg.box_renewal:  # proposals the head scored as background restart from pure noise
                background = _sigmoid(class_logits).max(axis=-1) <= cfg.score_threshold
                x[background] = generator.standard_normal((int(background.sum()), 4), dtype=np.float32)

        return [select_detections(*(np.concatenate(parts) for parts in zip(*candidates[image])),
                                  image_sizes[image], cfg.nms_iou, cfg.score_threshold)
                for image in range(batch)]

    def _ddim_step(self, x: np.ndarray, x0: np.ndarray, t: int, t_next: int,
                   generator: np.random.Generator) -> np.ndarray:
        """x_{t_next} from x_t and the x0 prediction (DDIM eq. 12 with eta, as DiffusionDet)."""
        alpha, alpha_next = float(self.alphas_cumprod[t]), float(self.alphas_cumprod[t_next])
        eps = ((1 / alpha) ** 0.5 * x - x0) / (1 / alpha - 1) ** 0.5
        sigma = self.config.ddim_eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)) ** 0.5
        c = (1 - alpha_next - sigma ** 2) ** 0.5
        noise = generator.standard_normal(x.shape, dtype=np.float32)
        return (x0 * alpha_next ** 0.5 + c * eps + sigma * noise).astype(np.float32)

    def _check_outputs(self, class_logits, pred_boxes, batch) -> None:
        expected_logits = (batch, self.config.num_proposals, self.config.num_classes)
        expected_boxes = (batch, self.config.num_proposals, 4)
        if np.shape(class_logits) != expected_logits or np.shape(pred_boxes) != expected_boxes:
            raise ContractError(f"radm denoiser: returned class_logits {np.shape(class_logits)} and pred_boxes "
                                f"{np.shape(pred_boxes)}, expected {expected_logits} and {expected_boxes}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)
