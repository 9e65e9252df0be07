"""PlanNet (Planning and Rendering, arXiv 2312.08822): layout planning as absorbing-state discrete diffusion.

No code or weights are public; this is our reference (networks.md section 2), every size a config field.

Layout tokens. A layout is ``max_elements`` (25) elements of 5 attributes ``(class, x, y, w, h)``; x, y is
the box centre, w, h its size, all relative to the canvas (0..1) and quantized to ``num_bins`` (K = 128)
bins: ``bin = min(floor(v * K), K - 1)``, back as ``(bin + 0.5) / K``. The class attribute holds an index
into ``class_names + ["<pad>"]`` (``pad_class`` = "no element here"). Every attribute may also hold
``mask_token`` = K, the absorbing state. Token values therefore lie in ``0..K`` (``vocab_size`` = K + 1).

Diffusion (``schedule`` "linear", T = ``num_timesteps`` = 100). Forward: at step t each of the 25 x 5
tokens is independently replaced by the mask token with probability t / T (t = T: all masked).
The denoiser is called with ``timestep`` = t on x_t and returns logits of x_0 for every token. Reverse
step t -> t-1: each still-masked token is revealed with probability 1 / t (so at t = 1 all are) by
sampling softmax(logits) of its attribute; revealed tokens never change again. Class logits are
meaningful only for the first ``len(class_names) + 1`` entries; the graph sets the others to
``INVALID_LOGIT`` so neither sampling nor argmax can pick them.

Served graphs:

* ``plannet_encoder`` (prologue): a small ViT over the product image (RGB 0..1, ImageNet-normalized in
  the graph) gives patch tokens; a small transformer over each text line's tokens, masked mean-pooled,
  gives one token per line. ``memory`` = [patches ; lines] projected to ``dim``; ``memory_mask`` is 1 for
  patches, and for a line 1 when any of its tokens is real.
* ``plannet_denoiser`` (step): each of the 125 layout tokens is embedded by its attribute's table (class
  table: classes + pad + mask; one coordinate table of K + 1 rows per x, y, w, h) plus a learned
  element-position embedding (which of the 25 elements) and a learned attribute-position embedding
  (which of the 5 attributes). Then ``denoiser_layers`` blocks of [self-attention over the 125 tokens,
  cross-attention to the memory (padding keys masked), FFN], each sublayer behind a LayerNorm whose
  scale and shift come from the timestep embedding (adaptive LayerNorm); one output head per attribute
  gives K logits.

One checkpoint (``--checkpoint plannet=FILE``, safetensors or a state dict) holds both halves: keys
``encoder.*`` and ``denoiser.*`` of :class:`PlanNet`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from posterrt.runtime.contracts import DYNAMIC_DIMS, get_contract
from posterrt.runtime.errors import CheckpointError, InputError

from ..checkpoints import load_into, read_state_dict
from ..spec import ContractModule, Exportable
from ..tokenizers import save_tokenizer, tokenizer_from_pretrained, train_tiny_tokenizer

ATTRIBUTES = ("class", "x", "y", "w", "h")
CLASS_NAMES = ("product", "logo", "text", "underlay", "embellishment")
#: Logit given to entries that are not a value of their attribute. Finite and fp16-representable,
#: so an fp16 engine's softmax gives exactly 0 instead of NaN from -inf arithmetic.
INVALID_LOGIT = -1e4
#: Additive attention bias for padding keys: exp(-1e4) is 0, and a fully padded line stays finite.
MASKED_KEY_BIAS = -1e4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEED = 20231213


@dataclass(frozen=True)
class PlanNetConfig:
    class_names: tuple[str, ...] = CLASS_NAMES
    num_bins: int = 128
    max_elements: int = 25
    num_timesteps: int = 100
    dim: int = 512
    heads: int = 8
    ffn_dim: int = 2048
    denoiser_layers: int = 4
    image_size: int = 224
    patch_size: int = 16
    image_layers: int = 4
    text_vocab_size: int = 8192
    text_layers: int = 2
    #: the text position table covers the contract's largest text_tokens
    max_text_tokens: int = DYNAMIC_DIMS["text_tokens"].max

    @property
    def num_class_values(self) -> int:
        """classes + the pad ("no element") class."""
        return len(self.class_names) + 1

    @property
    def pad_class(self) -> int:
        return len(self.class_names)

    @property
    def mask_token(self) -> int:
        return self.num_bins

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def runtime_config(self) -> dict:
        """The manifest's ``config.plannet``: what the sampler and the text/image preparation need."""
        return {
            "class_names": list(self.class_names),
            "pad_class": self.pad_class,
            "attributes": list(ATTRIBUTES),
            "box_format": "cxcywh",  # centre x, centre y, width, height relative to the canvas, 0..1
            "num_bins": self.num_bins,
            "quantization": "bin = min(floor(v * num_bins), num_bins - 1); v = (bin + 0.5) / num_bins",
            "mask_token": self.mask_token,
            "vocab_size": self.num_bins + 1,
            "num_timesteps": self.num_timesteps,
            "schedule": "linear",
            "schedule_doc": (
                "absorbing-state diffusion: at step t every token is independently the mask_token with "
                "probability t / num_timesteps (t = num_timesteps: all masked). The denoiser is called with "
                "timestep = t on x_t and gives logits of x_0. Reverse step t -> t-1: each masked token is revealed "
                "with probability 1 / t (all at t = 1) by sampling softmax(logits) of its attribute; revealed "
                "tokens stay. Class logits: only the first len(class_names) + 1 are valid (the rest are "
                f"{INVALID_LOGIT:g}). Elements whose class is pad_class are empty."),
            "max_elements": self.max_elements,
            "image_size": self.image_size,
            "max_text_tokens": self.max_text_tokens,
            "text_vocab_size": self.text_vocab_size,
        }


PRESETS = {
    "tiny": PlanNetConfig(dim=32, heads=4, ffn_dim=64, denoiser_layers=2, image_size=64, patch_size=16,
                          image_layers=1, text_vocab_size=320, text_layers=1),
    "paper": PlanNetConfig(),
}


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------
def key_bias(mask: torch.Tensor) -> torch.Tensor:
    """[B, S] 1/0 key mask -> additive bias [B, 1, 1, S] for scaled_dot_product_attention."""
    return ((1.0 - mask) * MASKED_KEY_BIAS)[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention of queries ``x`` over ``context``; padding keys carry a finite negative bias."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, "the width splits evenly over the heads"
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, heads, tokens, head_dim]

    def forward(self, x, context, bias=None):
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out(out.transpose(1, 2).flatten(2))


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class EncoderBlock(nn.Module):
    """Pre-norm transformer layer (self-attention, FFN) for the image and text encoders."""

    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = feed_forward(dim, ffn_dim)

    def forward(self, x, bias=None):
        h = self.norm1(x)
        x = x + self.attn(h, h, bias)
        return x + self.ffn(self.norm2(x))


class ImageEncoder(nn.Module):
    """Small ViT: ImageNet normalization in the graph, patch convolution, learned positions, transformer."""

    def __init__(self, config: PlanNetConfig):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.patch_embed = nn.Conv2d(3, config.dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.position = nn.Parameter(torch.randn(1, config.num_patches, config.dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(config.dim, config.heads, config.ffn_dim)
                                    for _ in range(config.image_layers))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, image):
        x = self.patch_embed((image - self.mean) / self.std).flatten(2).transpose(1, 2) + self.position
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class LineEncoder(nn.Module):
    """One vector per text line: token + position embeddings, transformer over the line, masked mean-pool."""

    def __init__(self, config: PlanNetConfig):
        super().__init__()
        self.token_embed = nn.Embedding(config.text_vocab_size, config.dim)
        self.position_embed = nn.Embedding(config.max_text_tokens, config.dim)
        self.blocks = nn.ModuleList(EncoderBlock(config.dim, config.heads, config.ffn_dim)
                                    for _ in range(config.text_layers))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, text_ids, text_mask):
        batch, lines, tokens = text_ids.shape
        ids = text_ids.flatten(0, 1)  # lines are independent: encode them as one batch
        mask = text_mask.flatten(0, 1)
        positions = torch.arange(tokens, device=ids.device)
        x = self.token_embed(ids) + self.position_embed(positions)[None]
        for block in self.blocks:
            x = block(x, key_bias(mask))
        x = self.norm(x)
        weights = mask.unsqueeze(-1)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # a padding line pools to 0
        return pooled.view(batch, lines, -1)


class PlanNetEncoder(nn.Module):
    """plannet_encoder: product image and text lines -> the denoiser's cross-attention memory."""

    def __init__(self, config: PlanNetConfig):
        super().__init__()
        self.image = ImageEncoder(config)
        self.text = LineEncoder(config)
        self.image_proj = nn.Linear(config.dim, config.dim)
        self.text_proj = nn.Linear(config.dim, config.dim)

    def forward(self, image, text_ids, text_mask):
        patches = self.image_proj(self.image(image))
        lines = self.text_proj(self.text(text_ids, text_mask))
        line_mask = text_mask.amax(dim=-1)  # a line is real if any of its tokens is
        memory = torch.cat([patches, lines], dim=1)
        memory_mask = torch.cat([torch.ones_like(patches[..., 0]), line_mask], dim=1)
        return memory, memory_mask


class AdaptiveBlock(nn.Module):
    """Denoiser layer: self-attention, cross-attention, FFN, each behind a timestep-modulated LayerNorm."""

    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim, elementwise_affine=False) for _ in range(3))
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads)
        self.ffn = feed_forward(dim, ffn_dim)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # (shift, scale) per sublayer

    def forward(self, x, time_emb, memory, memory_bias):
        mods = self.modulation(time_emb)[:, None].chunk(6, dim=-1)
        h = modulate(self.norms[0](x), mods[0], mods[1])
        x = x + self.self_attn(h, h)
        h = modulate(self.norms[1](x), mods[2], mods[3])
        x = x + self.cross_attn(h, memory, memory_bias)
        return x + self.ffn(modulate(self.norms[2](x), mods[4], mods[5]))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class ElementEmbedding(nn.Module):
    """(class, x, y, w, h) tokens [B, E, 5] -> [B, E * 5, dim]: value + element position + attribute position."""

    def __init__(self, config: PlanNetConfig):
        super().__init__()
        self.num_class_values = config.num_class_values
        # row num_class_values is the mask; the class attribute's mask token (K) is mapped onto it
        self.class_embed = nn.Embedding(config.num_class_values + 1, config.dim)
        self.coord_embed = nn.ModuleList(nn.Embedding(config.num_bins + 1, config.dim) for _ in ATTRIBUTES[1:])
        self.element_position = nn.Embedding(config.max_elements, config.dim)
        self.attribute_position = nn.Embedding(len(ATTRIBUTES), config.dim)

    def forward(self, tokens):
        classes = tokens[..., 0]
        # K is the mask; values between the class vocabulary and K are no class either: reading them as
        # the mask keeps every gather in range (TensorRT gathers out of range are undefined).
        classes = torch.where(classes < self.num_class_values, classes, torch.full_like(classes, self.num_class_values))
        parts = [self.class_embed(classes)] + [table(tokens[..., i + 1]) for i, table in enumerate(self.coord_embed)]
        x = torch.stack(parts, dim=2)  # [B, E, 5, dim]
        x = x + self.element_position.weight[:, None, :] + self.attribute_position.weight[None, :, :]
        return x.flatten(1, 2)


class PlanNetDenoiser(nn.Module):
    """plannet_denoiser: logits of x0 for every layout token, given x_t, t and the memory."""

    def __init__(self, config: PlanNetConfig):
        super().__init__()
        self.max_elements = config.max_elements
        self.embed = ElementEmbedding(config)
        self.time_proj = Timesteps(config.dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(config.dim, config.dim)
        self.blocks = nn.ModuleList(AdaptiveBlock(config.dim, config.heads, config.ffn_dim)
                                    for _ in range(config.denoiser_layers))
        self.norm_out = nn.LayerNorm(config.dim, elementwise_affine=False)
        self.modulation_out = nn.Sequential(nn.SiLU(), nn.Linear(config.dim, 2 * config.dim))
        self.heads = nn.ModuleList(nn.Linear(config.dim, config.num_bins) for _ in ATTRIBUTES)
        invalid = torch.zeros(len(ATTRIBUTES), config.num_bins, dtype=torch.bool)
        invalid[0, config.num_class_values:] = True
        self.register_buffer("invalid", invalid, persistent=False)

    def forward(self, tokens, timestep, memory, memory_mask):
        time_emb = self.time_embed(self.time_proj(timestep).to(memory.dtype))
        bias = key_bias(memory_mask)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, time_emb, memory, bias)
        shift, scale = self.modulation_out(time_emb)[:, None].chunk(2, dim=-1)
        x = modulate(self.norm_out(x), shift, scale).unflatten(1, (self.max_elements, len(ATTRIBUTES)))
        logits = torch.stack([head(x[:, :, i]) for i, head in enumerate(self.heads)], dim=2)
        return logits.masked_fill(self.invalid, INVALID_LOGIT)


class PlanNet(nn.Module):
    """Both halves; a checkpoint is this module's state dict."""

    def __init__(self, config: PlanNetConfig):
        super().__init__()
        self.config = config
        self.encoder = PlanNetEncoder(config)
        self.denoiser = PlanNetDenoiser(config)


# ---------------------------------------------------------------------------------------------
# Family interface (export/bundle_writer.py)
# ---------------------------------------------------------------------------------------------
def get_config(preset: str) -> PlanNetConfig:
    if preset not in PRESETS:
        raise InputError(f"--preset: plannet has no preset {preset!r}; expected one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    memory_max = DYNAMIC_DIMS["memory_tokens"].max
    assert config.num_patches + DYNAMIC_DIMS["lines"].max <= memory_max, "memory fits the contract's memory_tokens"
    return config


def build_plannet(preset: str, sources) -> PlanNet:
    """The whole PlanNet: deterministic random weights (fixed seed), or ``--checkpoint plannet=FILE``."""
    torch.manual_seed(SEED)
    model = PlanNet(get_config(preset))
    path = sources.checkpoints.get("plannet")
    if path:
        load_into(model, read_state_dict(path), f"plannet={path}")
    return model.eval()


def _denoiser_inputs(config: PlanNetConfig):
    """Layout tokens as a sampler makes them: valid values, some masked, timesteps 1..T."""

    def make(sizes, rng: np.random.Generator, contract) -> dict:
        batch = sizes["batch"]
        shape = (batch, config.max_elements)
        classes = rng.integers(0, config.num_class_values, size=shape)
        coords = rng.integers(0, config.num_bins, size=shape + (4,))
        tokens = np.concatenate([classes[..., None], coords], axis=-1)
        timestep = rng.integers(1, config.num_timesteps + 1, size=batch)
        masked = rng.random(tokens.shape) < (timestep / config.num_timesteps)[:, None, None]
        tokens[masked] = config.mask_token
        return {"tokens": tokens.astype(np.int64), "timestep": timestep.astype(np.float32)}

    return make


def _encoder_inputs(sizes, rng: np.random.Generator, contract) -> dict:
    """Text masks as tokenizers make them: a real prefix per line, some lines entirely padding."""
    batch, lines, tokens = sizes["batch"], sizes["lines"], sizes["text_tokens"]
    lengths = rng.integers(0, tokens + 1, size=(batch, lines))
    lengths[:, 0] = np.maximum(lengths[:, 0], 1)
    mask = (np.arange(tokens)[None, None, :] < lengths[..., None]).astype(np.float32)
    return {"text_mask": mask}


def _valid_logits(name: str, expected: np.ndarray) -> np.ndarray:
    """Parity scale from the real logits: the INVALID_LOGIT constants would make any error look tiny."""
    return expected != INVALID_LOGIT


def build(model: str, preset: str, sources) -> Exportable:
    plannet = build_plannet(preset, sources)
    config = plannet.config
    scale_mask = None
    if model == "plannet_encoder":
        module, overrides = plannet.encoder, _encoder_inputs
        static = {"plan_image_size": config.image_size, "text_vocab_size": config.text_vocab_size,
                  "plan_dim": config.dim}
    elif model == "plannet_denoiser":
        module, overrides, scale_mask = plannet.denoiser, _denoiser_inputs(config), _valid_logits
        static = {"max_elements": config.max_elements, "plan_vocab_size": config.num_bins + 1,
                  "plan_dim": config.dim, "plan_num_bins": config.num_bins}
    else:
        raise InputError(f"model {model!r} is not a plannet model; expected plannet_encoder or plannet_denoiser")
    contract = get_contract(model)
    assert set(static) == set(contract.static_dims), (static, contract.static_dims)
    return Exportable(model, ContractModule(module, contract.output_names).eval(), static,
                      config.runtime_config(), input_overrides=overrides, parity_scale_mask=scale_mask)


def write_assets(preset: str, sources, folder: Path) -> dict:
    """The line tokenizer: ``--from-pretrained plannet_tokenizer=DIR`` or a tiny BPE within the model's vocabulary."""
    config = get_config(preset)
    path = sources.pretrained.get("plannet_tokenizer")
    if path:
        try:
            tokenizer = tokenizer_from_pretrained(path)
        except Exception as error:
            raise CheckpointError(f"--from-pretrained plannet_tokenizer={path}: cannot load a tokenizer "
                                  f"({type(error).__name__})") from None
    else:
        tokenizer = train_tiny_tokenizer(config.text_vocab_size)
    if tokenizer.get_vocab_size() > config.text_vocab_size:
        raise CheckpointError(f"plannet tokenizer {path or 'tiny'}: vocabulary of {tokenizer.get_vocab_size()} "
                              f"ids, expected at most the model's text_vocab_size {config.text_vocab_size}")
    return {"plannet_tokenizer": save_tokenizer(tokenizer, folder, "plannet")}
