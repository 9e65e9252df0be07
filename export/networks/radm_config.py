"""RADM's sizes and inference settings as dataclasses; the presets are instances, not forks.

Defaults are the paper's / the public code's numbers (``liuan0803/RADM``: ``configs/radm.yaml``,
``RADM/config.py``); a checkpoint of another size loads by changing fields.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from posterrt.runtime.contracts import DYNAMIC_DIMS

CLASS_NAMES = ("logo", "text", "underlay", "embellishment")


@dataclass(frozen=True)
class BackboneConfig:
    """Detectron2's ``build_resnet_fpn_backbone`` with FrozenBN and ``STRIDE_IN_1X1: False``."""

    blocks_per_stage: tuple[int, ...] = (3, 4, 6, 3)  # ResNet-50
    stem_channels: int = 64
    bottleneck_channels: int = 64  # res2; doubles every stage (NUM_GROUPS 1 x WIDTH_PER_GROUP 64)
    res2_out_channels: int = 256  # doubles every stage
    fpn_channels: int = 256
    # Detectron2 RADM config: RGB order, ImageNet statistics on the 0..255 scale.
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    frozen_bn_eps: float = 1e-5

    def __post_init__(self):
        if len(self.blocks_per_stage) != 4:
            raise ValueError(f"blocks_per_stage must list res2..res5, got {self.blocks_per_stage}")


@dataclass(frozen=True)
class TextEncoderConfig:
    """transformers ``RobertaConfig`` fields (RoBERTa-base by default, random init)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    # Ids of the tokenizer ``export.tokenizers.train_tiny_tokenizer`` writes (<pad>, <s>, </s>);
    # a pretrained RoBERTa folder brings its own (1, 0, 2).
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2


@dataclass(frozen=True)
class HeadConfig:
    """DiffusionDet's DynamicHead with RADM's VTRAM and GRAM (``cfg.MODEL.RADM.*``)."""

    hidden_dim: int = 256  # d_model; equals the FPN channels (RoI features are proposal features)
    num_stages: int = 6  # NUM_HEADS: cascaded RCNN heads
    num_attention_heads: int = 8  # NHEADS
    dim_feedforward: int = 2048
    dim_dynamic: int = 64
    num_dynamic: int = 2
    num_cls_layers: int = 1  # NUM_CLS
    num_reg_layers: int = 3  # NUM_REG
    pooler_resolution: int = 7
    sampling_ratio: int = 2
    with_vtram: bool = True
    with_gram: bool = True
    vtram_heads: int = 2
    gram_embed_dim: int = 64  # sin/cos embedding of the pairwise geometry
    gram_out_dim: int = 64  # GRAM feature in the fused 576-d vector
    gram_wave_length: float = 1000.0
    prior_prob: float = 0.01  # focal-loss prior of the class bias at random init
    bbox_weights: tuple[float, float, float, float] = (2.0, 2.0, 1.0, 1.0)
    scale_clamp: float = math.log(100000.0 / 16)
    # The official RCNNHead reads the text features with ``txt_features.view(N, 768, -1)`` although
    # they arrive as [N, lines, 768]: each "line" the attention sees is a strided slice across the
    # real lines' features. Checkpoints trained with that code learned f_key/f_value on those
    # numbers, and the only RADM checkpoints that exist come from that code, so True (reproduce the
    # view) is the default; False takes the clean transpose, for checkpoints trained with fixed code.
    # Either way each image only sees its own text: the public code's batch-interleaved ``repeat``
    # (proposal row b*P+p reads image (b*P+p) % N) is not reproduced, because at batch 1 (how that
    # code runs inference) it is the identity, and a served model must not let one request's text
    # leak into another's result when Triton batches them.
    # Under the view every "line" mixes values of all lines, padding included, so the numbers
    # depend on the padding: the public code always pads to max_lines (20) with zero features and
    # mask 0, and a runtime reproducing it must send text_features padded the same way.
    text_compat_view: bool = True
    # The official VTRAM pools its [N*P, 49, d] output with ``reshape(N*P, d, -1).mean(-1)`` (a
    # reshape, not a transpose: each of the d outputs averages 49 consecutive values of the
    # token-major layout). Same reasoning and default as ``text_compat_view``; False is the clean
    # mean over the 49 tokens.
    vtram_pool_compat: bool = True
    # The public detector builds its box scale with ``c, w, h = image.shape`` on a CHW image, so its
    # "images_whwh" is really (H, W, H, W): a normalized box becomes "pixels" with x scaled by the
    # image height and y by the width. Its checkpoints were trained on RoIs pooled there (and learned
    # to predict true pixel boxes), so True reproduces it: radm_head divides the input boxes by
    # (H, W, H, W) to get VTRAM's normalized box token, and the sampler, which reads this flag from
    # the bundle config, must scale normalized boxes by the same vector. False: (W, H, W, H).
    # Square images are unaffected.
    swapped_image_whwh: bool = True

    def __post_init__(self):
        if self.num_dynamic != 2:
            raise ValueError(f"num_dynamic must be 2 (DynamicConv has two dynamic layers), got {self.num_dynamic}")
        if self.gram_embed_dim % 8:
            raise ValueError(f"gram_embed_dim must be a multiple of 8 (4 coordinates x sin/cos), got {self.gram_embed_dim}")
        if self.hidden_dim % self.num_attention_heads or self.hidden_dim % self.vtram_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} must divide by num_attention_heads "
                             f"{self.num_attention_heads} and vtram_heads {self.vtram_heads}")

    @property
    def fused_dim(self) -> int:
        """[GRAM | time-modulated object feature | VTRAM] = 64 + 256 + 256 = 576 at paper size."""
        return (self.hidden_dim + (self.hidden_dim if self.with_vtram else 0)
                + (self.gram_out_dim if self.with_gram else 0))


@dataclass(frozen=True)
class SamplingConfig:
    """What the runtime's sampler needs (the DDIM loop and post-processing of the public code)."""

    num_proposals: int = 100
    box_scale: float = 2.0  # SNR_SCALE: boxes live in [-2, 2] in diffusion space
    num_timesteps: int = 1000
    schedule: str = "cosine"
    sampling_steps: int = 1  # SAMPLE_STEP
    ddim_eta: float = 1.0
    box_renewal: bool = True
    top_k: int = 100
    nms_iou: float = 0.15  # NMS_THRESH
    score_threshold: float = 0.25  # CLASS_THRESH
    min_size_test: int = 800
    max_size_test: int = 1333


@dataclass(frozen=True)
class RADMConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    class_names: tuple[str, ...] = CLASS_NAMES
    # Token and line limits come from the contracts' dynamic ranges, so the runtime never
    # produces a request the served models refuse.
    max_text_tokens: int = DYNAMIC_DIMS["text_tokens"].max
    max_lines: int = DYNAMIC_DIMS["lines"].max

    def __post_init__(self):
        if self.head.hidden_dim != self.backbone.fpn_channels:
            raise ValueError(f"head.hidden_dim ({self.head.hidden_dim}) must equal backbone.fpn_channels "
                             f"({self.backbone.fpn_channels}): RoI features become proposal features")
        if self.text.max_position_embeddings < self.max_text_tokens + self.text.pad_token_id + 1:
            raise ValueError(f"text.max_position_embeddings {self.text.max_position_embeddings} is too small "
                             f"for {self.max_text_tokens} tokens (RoBERTa positions start after the pad id)")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def paper(cls) -> "RADMConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "RADMConfig":
        """A few thousand parameters per stage: the three models export and pass parity in seconds."""
        return cls(
            backbone=BackboneConfig(blocks_per_stage=(1, 1, 1, 1), stem_channels=8, bottleneck_channels=4,
                                    res2_out_channels=16, fpn_channels=16),
            text=TextEncoderConfig(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=72),
            # prior 0.5 (class bias 0) instead of the focal-loss 0.01: random tiny weights then score
            # around the 0.25 threshold, so the layout path (NMS, placement, JSON) runs on real boxes.
            head=HeadConfig(hidden_dim=16, num_stages=2, num_attention_heads=2, dim_feedforward=32,
                            dim_dynamic=8, gram_embed_dim=16, gram_out_dim=8, prior_prob=0.5),
        )

    @classmethod
    def preset(cls, name: str) -> "RADMConfig":
        return {"tiny": cls.tiny, "paper": cls.paper}[name]()

    def with_text(self, text: TextEncoderConfig) -> "RADMConfig":
        return replace(self, text=text)

    def manifest_config(self) -> dict:
        """The JSON-able family config the bundle manifest records for the runtime."""
        return {
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            **asdict(self.sampling),
            "max_text_tokens": self.max_text_tokens,
            "max_lines": self.max_lines,
            "text_pad_token_id": self.text.pad_token_id,
            # informational: normalization happens inside radm_backbone
            "pixel_mean": list(self.backbone.pixel_mean),
            "pixel_std": list(self.backbone.pixel_std),
            "pixel_format": "RGB",
            "text_compat_view": self.head.text_compat_view,
            "vtram_pool_compat": self.head.vtram_pool_compat,
            "swapped_image_whwh": self.head.swapped_image_whwh,
            "num_stages": self.head.num_stages,
        }
