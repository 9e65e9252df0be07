"""Multi-level RoIAlign (Detectron2's ``ROIPooler`` with ``ROIAlignV2``) that exports to ONNX ``RoiAlign``.

The torch side is written here in plain tensor ops (no torchvision): bilinear sampling on a
``resolution * sampling_ratio`` grid per box, averaged per bin, with the ``aligned=True`` half-pixel
shift. Exported, it becomes one ONNX ``RoiAlign`` node per FPN level (opset 16+:
``coordinate_transformation_mode="half_pixel"`` is ``aligned=True``), which ONNX Runtime and
TensorRT implement natively, instead of the gather graph the torch code would trace to.

Level assignment works for a whole batch without Python control flow: every box is pooled from all
four levels and a mask keeps its own level's result. Four RoIAligns cost little next to the head,
and the graph stays static (no data-dependent shapes).
"""
from __future__ import annotations

import torch
from torch import nn


def roi_align(features: torch.Tensor, rois: torch.Tensor, batch_index: torch.Tensor, output_size: int,
              spatial_scale: float, sampling_ratio: int) -> torch.Tensor:
    """Aligned RoIAlign (Detectron2 ``ROIAlign(aligned=True)``), average mode, fixed sampling ratio.

    features [B, C, H, W]; rois [R, 4] x1y1x2y2 in input pixels; batch_index [R] int64.
    Returns [R, C, output_size, output_size].
    """
    batch, channels, height, width = features.shape
    samples = output_size * sampling_ratio  # sample points per side of a box
    start = rois[:, :2] * spatial_scale - 0.5  # (x, y); the half-pixel shift of aligned=True
    size = rois[:, 2:] * spatial_scale - 0.5 - start  # no 1-pixel minimum when aligned
    bin_size = size / output_size
    # sample k of a side sits at bin k // ratio, offset (k % ratio + 0.5) / ratio inside it
    offsets = (torch.arange(samples, dtype=features.dtype, device=features.device) + 0.5) / sampling_ratio
    xs = start[:, 0:1] + bin_size[:, 0:1] * offsets  # [R, samples]
    ys = start[:, 1:2] + bin_size[:, 1:2] * offsets
    x_low, x_high, x_frac, x_valid = _bilinear_axis(xs, width)
    y_low, y_high, y_frac, y_valid = _bilinear_axis(ys, height)

    # One gather per corner from the features flattened to [C, B*H*W]: memory C x R x samples^2.
    flat = features.permute(1, 0, 2, 3).reshape(channels, -1)
    image_offset = (batch_index * (height * width)).reshape(-1, 1, 1)
    valid = (y_valid[:, :, None] & x_valid[:, None, :]).to(features.dtype)
    pooled = None
    for y_index, y_weight in ((y_low, 1 - y_frac), (y_high, y_frac)):
        for x_index, x_weight in ((x_low, 1 - x_frac), (x_high, x_frac)):
            index = image_offset + y_index[:, :, None] * width + x_index[:, None, :]  # [R, s, s]
            weight = y_weight[:, :, None] * x_weight[:, None, :] * valid
            values = flat[:, index.reshape(-1)].reshape(channels, -1, samples, samples)
            term = values * weight
            # (not `0 + term`: a Python-scalar start breaks the ONNX tracer's peephole pass)
            pooled = term if pooled is None else pooled + term
    pooled = pooled.reshape(channels, -1, output_size, sampling_ratio, output_size, sampling_ratio)
    return pooled.mean(dim=(3, 5)).permute(1, 0, 2, 3)


def _bilinear_axis(coords: torch.Tensor, length: int):
    """Neighbour indices, fraction and validity along one axis, as Detectron2's CPU/CUDA kernels do:
    a sample more than one pixel outside the map is 0; otherwise it is clamped into the map."""
    valid = (coords >= -1.0) & (coords <= length)
    coords = coords.clamp(min=0)
    low = coords.floor()
    at_edge = low >= length - 1
    low = torch.where(at_edge, torch.full_like(low, length - 1), low)
    coords = torch.where(at_edge, low, coords)
    high = torch.where(at_edge, low, low + 1)
    return low.long(), high.long(), coords - low, valid


class RoIAlignFunction(torch.autograd.Function):
    """:func:`roi_align` in torch; one ONNX ``RoiAlign`` node when exported."""

    @staticmethod
    def forward(ctx, features, rois, batch_index, output_size: int, spatial_scale: float, sampling_ratio: int):
        return roi_align(features, rois, batch_index, output_size, spatial_scale, sampling_ratio)

    @staticmethod
    def symbolic(g, features, rois, batch_index, output_size, spatial_scale, sampling_ratio):
        return g.op("RoiAlign", features, rois, batch_index, coordinate_transformation_mode_s="half_pixel",
                    mode_s="avg", output_height_i=output_size, output_width_i=output_size,
                    sampling_ratio_i=sampling_ratio, spatial_scale_f=spatial_scale)


def assign_levels(boxes: torch.Tensor, min_level: int, max_level: int, canonical_size: float = 224.0,
                  canonical_level: int = 4) -> torch.Tensor:
    """FPN level of each box (Detectron2's ``assign_boxes_to_levels``, eq. 1 of the FPN paper)."""
    sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sqrt()
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_size + 1e-8))
    return levels.clamp(min=min_level, max=max_level)


class MultiScaleRoIAlign(nn.Module):
    """Pools each box from its FPN level. Has no parameters (like Detectron2's ``ROIPooler``)."""

    def __init__(self, levels: tuple[int, ...], output_size: int, sampling_ratio: int):
        super().__init__()
        self.levels = tuple(levels)
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio

    def forward(self, features: list[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """features: one map per level; boxes [B, P, 4] pixel x1y1x2y2 -> [B*P, C, s, s], image-major."""
        rois = boxes.reshape(-1, 4)
        batch_index = torch.arange(boxes.shape[0], device=boxes.device)[:, None].expand(boxes.shape[:2]).reshape(-1)
        levels = assign_levels(rois, self.levels[0], self.levels[-1])
        pooled = None
        for level, level_features in zip(self.levels, features):
            result = RoIAlignFunction.apply(level_features, rois, batch_index, self.output_size,
                                            1.0 / 2 ** level, self.sampling_ratio)
            keep = (levels == level).reshape(-1, 1, 1, 1)
            pooled = result if pooled is None else torch.where(keep, result, pooled)
        return pooled

