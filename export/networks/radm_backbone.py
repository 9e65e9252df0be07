"""RADM's prologue backbone: ResNet + FPN in plain torch, laid out like Detectron2's.

Module names mirror Detectron2's ``build_resnet_fpn_backbone`` (``backbone.bottom_up.stem.conv1``,
``backbone.bottom_up.res2.0.conv1.norm``, ``backbone.fpn_lateral2``, ...), so the ``backbone.*``
tensors of a checkpoint saved by the public RADM code load by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .radm_config import BackboneConfig

FPN_LEVELS = (2, 3, 4, 5)  # P2..P5, strides 4..32 (the RoI pooler's IN_FEATURES; P6 is unused)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine terms, all buffers (Detectron2's ``FrozenBN``)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels) - eps)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class ConvNorm(nn.Conv2d):
    """Detectron2's ``Conv2d`` wrapper: a bias-free conv whose norm is a child named ``norm``."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, eps=1e-5):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.norm = FrozenBatchNorm2d(out_channels, eps)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.norm(super().forward(x))


class BasicStem(nn.Module):
    def __init__(self, out_channels: int, eps: float):
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, eps=eps)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (carries the stride: ``STRIDE_IN_1X1: False``) -> 1x1, projection shortcut when
    the width changes."""

    def __init__(self, in_channels, out_channels, bottleneck_channels, stride, eps):
        super().__init__()
        self.shortcut = (ConvNorm(in_channels, out_channels, 1, stride=stride, eps=eps)
                         if in_channels != out_channels else None)
        self.conv1 = ConvNorm(in_channels, bottleneck_channels, 1, eps=eps)
        self.conv2 = ConvNorm(bottleneck_channels, bottleneck_channels, 3, stride=stride, eps=eps)
        self.conv3 = ConvNorm(bottleneck_channels, out_channels, 1, eps=eps)

    def forward(self, x):
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + shortcut)


class ResNet(nn.Module):
    """Stem + res2..res5; returns the four stage outputs."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        eps = config.frozen_bn_eps
        self.stem = BasicStem(config.stem_channels, eps)
        in_channels = config.stem_channels
        self.stage_names = []
        self.out_channels = []
        for index, blocks in enumerate(config.blocks_per_stage):
            out_channels = config.res2_out_channels * 2 ** index
            bottleneck = config.bottleneck_channels * 2 ** index
            stride = 1 if index == 0 else 2  # the stem already downsampled by 4
            stage = nn.Sequential(*(BottleneckBlock(in_channels if b == 0 else out_channels, out_channels,
                                                    bottleneck, stride if b == 0 else 1, eps)
                                    for b in range(blocks)))
            name = f"res{index + 2}"
            self.add_module(name, stage)
            self.stage_names.append(name)
            self.out_channels.append(out_channels)
            in_channels = out_channels

    def forward(self, x):
        x = self.stem(x)
        outputs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outputs.append(x)
        return outputs


class FPN(nn.Module):
    """Detectron2's FPN (sum fusion, nearest 2x upsampling, no norm) over res2..res5 -> P2..P5."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.bottom_up = ResNet(config)
        for level, in_channels in zip(FPN_LEVELS, self.bottom_up.out_channels):
            lateral = nn.Conv2d(in_channels, config.fpn_channels, 1)
            output = nn.Conv2d(config.fpn_channels, config.fpn_channels, 3, padding=1)
            for conv in (lateral, output):  # Detectron2's c2_xavier_fill
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
            self.add_module(f"fpn_lateral{level}", lateral)
            self.add_module(f"fpn_output{level}", output)

    def forward(self, x):
        stages = self.bottom_up(x)
        top_down = getattr(self, f"fpn_lateral{FPN_LEVELS[-1]}")(stages[-1])
        results = [getattr(self, f"fpn_output{FPN_LEVELS[-1]}")(top_down)]
        for level, features in zip(reversed(FPN_LEVELS[:-1]), reversed(stages[:-1])):
            upsampled = F.interpolate(top_down, scale_factor=2.0, mode="nearest")
            top_down = getattr(self, f"fpn_lateral{level}")(features) + upsampled
            results.insert(0, getattr(self, f"fpn_output{level}")(top_down))
        return results


class RADMBackbone(nn.Module):
    """The served ``radm_backbone``: RGB 0..255 -> normalized -> P2..P5."""

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.backbone = FPN(config)
        # Not persistent: the public code normalizes with a lambda, so checkpoints hold no such tensors.
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, image):
        return tuple(self.backbone((image - self.pixel_mean) / self.pixel_std))
