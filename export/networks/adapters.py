"""The background generator's additions to a Stable-Diffusion UNet, as diffusers attention processors.

The paper (arXiv 2312.13309) adds two things to SD 1.5's cross-attention, both here:

* **mask-guided cross-attention** (category-common generator): the category identifier tokens of
  the prompt may only be attended to from the background. For query positions where the product
  mask says "product", those tokens' attention logits get a large negative bias. Adding a bias to
  the logits is the same as zeroing their probabilities and renormalizing, but it is one Add
  before the softmax, which ONNX Runtime and TensorRT fuse into their attention kernels; the
  product-region softmax stays well defined because the prompt always holds non-category tokens
  (BOS, EOS, padding).
* **image-prompt cross-attention** (personalized generator): IP-Adapter's decoupled attention,
  new ``to_k_ip``/``to_v_ip`` projections over the image-prompt tokens whose output is added with a
  per-sample ``ip_scale``.

They are installed with ``unet.set_attn_processor(...)`` on a stock ``UNet2DConditionModel``; the
per-call tensors travel through ``cross_attention_kwargs`` as one :class:`AdapterInputs`, which
``torch.onnx.export`` traces like any other tensor flow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from posterrt.runtime.errors import CheckpointError

from ..checkpoints import load_into

#: Name of the cross_attention_kwargs entry that carries :class:`AdapterInputs`.
ADAPTER_KWARG = "adapter_inputs"
#: Bias on a masked logit: exp(-1e4) is 0 in fp32 and fp16, and -1e4 is well inside fp16's range
#: (a -inf would turn into NaN in fp16 kernels that subtract the row max from -inf).
MASKED_LOGIT = -1.0e4
#: Checkpoint key prefix of the image-prompt projection (IP-Adapter's name for it).
IMAGE_PROJ_PREFIX = "image_proj."
#: Key prefix of the decoupled attention layers in IP-Adapter's own checkpoints
#: (``ip_adapter.<index in unet.attn_processors>.to_k_ip.weight``).
IP_ADAPTER_PREFIX = "ip_adapter."


@dataclass
class AdapterInputs:
    """What every adapted attention layer reads in one UNet call."""

    mask: torch.Tensor  # [B, 1, h, w] at latent resolution; 1 = background, 0 = product
    category_token_mask: torch.Tensor  # [B, text tokens]; 1 marks the category identifier tokens
    image_prompt_embeds: torch.Tensor  # [B, image tokens, cross_attention_dim]
    ip_scale: torch.Tensor  # [B]


def background_at_level(mask: torch.Tensor, level: int) -> torch.Tensor:
    """The latent-size background mask at an attention resolution ``latent / 2**level``, flattened
    to ``[B, h*w]`` in the order the UNet's transformer flattens its feature map.

    Min-pooling: a coarse cell counts as background only if every latent pixel under it does, so
    the category tokens never receive attention from a cell that touches the product. The result
    stays binary (an area average would give fractional masks at the product's edge)."""
    if level > 0:
        factor = 2 ** level
        mask = -F.max_pool2d(-mask, kernel_size=factor, stride=factor)
    return mask.flatten(1)


def category_attention_bias(background: torch.Tensor, category_token_mask: torch.Tensor) -> torch.Tensor:
    """Additive logits bias ``[B, 1, queries, tokens]``: MASKED_LOGIT where the query is product
    and the key is a category token, 0 elsewhere."""
    product = 1.0 - background
    return MASKED_LOGIT * product[:, None, :, None] * category_token_mask[:, None, None, :]


class SelfAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor for the UNet's self-attention layers. It only names the adapter
    kwarg, so diffusers does not warn that self-attention ignores it on every call."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, adapter_inputs: AdapterInputs | None = None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class BackgroundCrossAttnProcessor(nn.Module):
    """Cross-attention with the category-token mask and decoupled image-prompt attention.

    ``level`` fixes this layer's resolution (``latent / 2**level``); it is a property of where the
    layer sits in the UNet, so it is set once here rather than inferred from shapes while tracing.
    With ``adapter_inputs=None`` it is exactly SD's cross-attention.
    """

    def __init__(self, inner_dim: int, cross_attention_dim: int, level: int):
        super().__init__()
        self.level = level
        # IP-Adapter's layer names and shapes, so its checkpoints load unchanged.
        self.to_k_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, inner_dim, bias=False)

    def _heads(self, tensor: torch.Tensor, heads: int) -> torch.Tensor:
        batch, length, inner = tensor.shape
        return tensor.view(batch, length, heads, inner // heads).transpose(1, 2)

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, adapter_inputs: AdapterInputs | None = None):
        # SD's transformer blocks hand cross-attention flattened tokens, no norms inside Attention.
        assert hidden_states.ndim == 3 and attn.spatial_norm is None and attn.group_norm is None
        assert attention_mask is None, "the background UNet takes no encoder attention mask"
        residual = hidden_states
        batch, queries, _ = hidden_states.shape
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        query = self._heads(attn.to_q(hidden_states), attn.heads)
        key = self._heads(attn.to_k(context), attn.heads)
        value = self._heads(attn.to_v(context), attn.heads)

        bias = None
        if adapter_inputs is not None:
            background = background_at_level(adapter_inputs.mask, self.level)
            assert background.shape[1] == queries, f"level {self.level} does not match {queries} queries"
            bias = category_attention_bias(background, adapter_inputs.category_token_mask)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)

        if adapter_inputs is not None:
            ip_key = self._heads(self.to_k_ip(adapter_inputs.image_prompt_embeds), attn.heads)
            ip_value = self._heads(self.to_v_ip(adapter_inputs.image_prompt_embeds), attn.heads)
            ip_out = F.scaled_dot_product_attention(query, ip_key, ip_value)
            out = out + adapter_inputs.ip_scale.view(batch, 1, 1, 1) * ip_out

        out = out.transpose(1, 2).reshape(batch, queries, -1)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def attention_level(processor_name: str, num_blocks: int) -> int:
    """Resolution level of an attention layer from its place in a UNet2DConditionModel: down block
    i runs at latent/2**i (its downsampler comes after its attentions), the mid block at the
    lowest level, up block j at level num_blocks-1-j (its upsampler comes after its attentions)."""
    parts = processor_name.split(".")
    if parts[0] == "down_blocks":
        return int(parts[1])
    if parts[0] == "mid_block":
        return num_blocks - 1
    if parts[0] == "up_blocks":
        return num_blocks - 1 - int(parts[1])
    raise ValueError(f"attention layer {processor_name!r} is outside the UNet's down/mid/up blocks")


def install_adapters(unet, zero_init: bool) -> dict[str, BackgroundCrossAttnProcessor]:
    """Set the adapted processors on every attention layer of ``unet``; returns the cross-attention ones.

    ``zero_init``: zero the image-prompt projections so a pretrained UNet keeps its behaviour until
    adapter weights are loaded (mask-guided attention has no weights)."""
    num_blocks = len(unet.config.block_out_channels)
    processors, adapted = {}, {}
    for name in unet.attn_processors:
        attn = unet.get_submodule(name.removesuffix(".processor"))
        if attn.is_cross_attention:
            processor = BackgroundCrossAttnProcessor(attn.to_k.out_features, attn.to_k.in_features,
                                                     attention_level(name, num_blocks))
            if zero_init:
                nn.init.zeros_(processor.to_k_ip.weight)
                nn.init.zeros_(processor.to_v_ip.weight)
            adapted[name] = processor
            processors[name] = processor
        else:
            processors[name] = SelfAttnProcessor()
    unet.set_attn_processor(processors)
    return adapted


class ImagePromptProjection(nn.Module):
    """IP-Adapter's image projection: one CLIP image embedding -> ``tokens`` context tokens."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(image_embed_dim, tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        batch = image_embeds.shape[0]
        return self.norm(self.proj(image_embeds).reshape(batch, self.tokens, -1))


def unet_adapter_state(state: dict, processor_names: list[str]) -> dict:
    """The UNet's adapter tensors of a bg_adapter checkpoint, keyed like ``unet.state_dict()``.

    Accepts posterrt's own keys (``<processor name>.to_k_ip.weight``) and IP-Adapter's
    (``ip_adapter.<index in unet.attn_processors>.to_k_ip.weight``); the image projection's keys
    are left to the image encoder."""
    adapter = {}
    for key, tensor in state.items():
        if key.startswith(IMAGE_PROJ_PREFIX):
            continue
        if key.startswith(IP_ADAPTER_PREFIX):
            index, _, leaf = key[len(IP_ADAPTER_PREFIX):].partition(".")
            if not index.isdigit() or int(index) >= len(processor_names):
                raise CheckpointError(f"adapter checkpoint: key {key!r} names attention layer {index}, the UNet "
                                      f"has {len(processor_names)} attention layers")
            key = f"{processor_names[int(index)]}.{leaf}"
        adapter[key] = tensor
    return adapter


def load_unet_adapters(unet, state: dict, source: str) -> None:
    """Load the adapter layers of ``unet`` from a bg_adapter checkpoint; every adapter tensor must be
    there with its shape, and nothing else but the image projection may be."""
    adapter = unet_adapter_state(state, list(unet.attn_processors))
    current = unet.state_dict()
    expected = [k for k in current if ".processor." in k]
    missing = [k for k in expected if k not in adapter]
    if missing:
        raise CheckpointError(f"adapter checkpoint {source}: missing tensor {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                              + f" (the UNet has {len(expected)} adapter tensors)")
    # The UNet's own weights fill in the rest, so load_into checks the adapter keys' names and shapes.
    load_into(unet, {**{k: v for k, v in current.items() if k not in expected}, **adapter}, source)


def load_image_projection(projection: ImagePromptProjection, state: dict, source: str) -> None:
    subset = {k[len(IMAGE_PROJ_PREFIX):]: v for k, v in state.items() if k.startswith(IMAGE_PROJ_PREFIX)}
    if not subset:
        raise CheckpointError(f"adapter checkpoint {source}: no {IMAGE_PROJ_PREFIX}* tensors (the image-prompt "
                              f"projection the image_encoder needs)")
    load_into(projection, subset, source)


def adapter_state_dict(unet, projection: ImagePromptProjection) -> dict:
    """posterrt's bg_adapter checkpoint layout: the UNet's adapter tensors plus ``image_proj.*``."""
    state = {k: v for k, v in unet.state_dict().items() if ".processor." in k}
    state.update({IMAGE_PROJ_PREFIX + k: v for k, v in projection.state_dict().items()})
    return state
