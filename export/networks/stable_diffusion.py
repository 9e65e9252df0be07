"""The Stable-Diffusion family: the background generator's five served models (networks.md section 3).

* ``clip_text_encoder`` (prologue): CLIPTextModel, last hidden state.
* ``image_encoder`` (prologue): CLIP vision model + IP-Adapter projection to ``image_tokens``
  context tokens; CLIP's mean/std normalization is in the graph, the input is RGB 0..1.
* ``vae_encoder`` (prologue): AutoencoderKL encoder, posterior *mean* (deterministic) times the
  scaling factor; input -1..1.
* ``bg_unet`` (per step): a stock diffusers ``UNet2DConditionModel`` with 9 input channels whose
  attention processors add mask-guided category attention and image-prompt attention
  (``adapters.py``); the 9-channel concatenation happens in the graph.
* ``vae_decoder`` (epilogue): divides by the scaling factor, decodes, maps to 0..1 and clamps.

Weights are random (seeded per model, so a rebuild gives the same module) unless
``--from-pretrained`` names diffusers/transformers folders (``sd_pretrained.py``) and
``--checkpoint bg_adapter=PATH`` brings the adapter layers. The family ``config`` written to the
manifest is everything the runtime needs to drive the pipeline without importing this module.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from posterrt.runtime.contracts import ModelContract, get_contract
from posterrt.runtime.errors import CheckpointError, InputError
from posterrt.runtime.families import FAMILIES

from .. import tokenizers
from ..checkpoints import read_state_dict
from ..spec import ContractModule, Exportable
from . import sd_pretrained
from .adapters import (ADAPTER_KWARG, AdapterInputs, ImagePromptProjection, install_adapters,
                       load_image_projection, load_unet_adapters)
from .feature_cache import ShallowUNet, deep_channels, run_capturing_deep_feature

MODELS = FAMILIES["stable_diffusion"].models
UNET_MODELS = ("bg_unet", *FAMILIES["stable_diffusion"].cached_steps)  # one UNet's weights, three graphs
ADAPTER_CHECKPOINT = "bg_adapter"  # --checkpoint bg_adapter=PATH
TOKENIZER_ASSET = "clip_tokenizer"
UNET_IN_CHANNELS = 9  # noisy latent 4 + mask 1 + masked-image latent 4 (SD inpainting)

# CLIP's image normalization (OpenAI CLIP and every SD image encoder derived from it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: SD 1.5's scheduler_config.json (the DDIM/PNDM fields the runtime's samplers read).
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "timestep_spacing": "leading",
}
#: The category-common generator's prompt: ``{category}`` is the product category's identifier;
#: the runtime marks the tokens of the text it substitutes there in ``category_token_mask``.
PROMPT_TEMPLATE = "a product photo of {category}, {style} background"
DEFAULT_STYLE = "clean minimalist studio"


@dataclass(frozen=True)
class SDSizes:
    """Sizes of the family. Defaults are SD 1.5's (the paper's); the tiny preset is an instance."""

    unet_block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    unet_cross_attn_blocks: int = 3  # the first N down blocks (and last N up blocks) have attention
    unet_layers_per_block: int = 2
    unet_heads: int = 8
    unet_norm_groups: int = 32
    cross_attention_dim: int = 768
    latent_channels: int = 4
    vae_block_channels: tuple[int, ...] = (128, 256, 512, 512)  # 4 blocks -> 3 downsamples -> factor 8
    vae_layers_per_block: int = 2
    vae_norm_groups: int = 32
    scaling_factor: float = 0.18215
    # CLIP ViT-L/14 (SD 1.5's text encoder; its vision tower is the image encoder)
    clip_vocab_size: int = 49408
    clip_tokens: int = 77
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vision_hidden: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_intermediate: int = 4096
    clip_image_size: int = 224
    vision_patch: int = 14
    vision_projection: int = 768
    image_tokens: int = 4  # IP-Adapter's context tokens per reference image


PAPER = SDSizes()
TINY = replace(
    PAPER,
    unet_block_channels=(32, 64, 64), unet_cross_attn_blocks=2, unet_layers_per_block=1, unet_heads=4,
    unet_norm_groups=8, cross_attention_dim=32,
    vae_block_channels=(8, 16, 16, 16), vae_layers_per_block=1, vae_norm_groups=4,
    clip_vocab_size=512, text_hidden=32, text_layers=2, text_heads=4, text_intermediate=64,
    vision_hidden=32, vision_layers=2, vision_heads=4, vision_intermediate=64, clip_image_size=32,
    vision_patch=8, vision_projection=32,
)
PRESET_SIZES = {"paper": PAPER, "tiny": TINY}
TINY_TOKENIZER_VOCAB = 512  # <= every preset's clip_vocab_size


def sizes_of(preset: str) -> SDSizes:
    if preset not in PRESET_SIZES:
        raise InputError(f"--preset: unknown preset {preset!r}; expected one of {', '.join(PRESET_SIZES)}")
    return PRESET_SIZES[preset]


# ---------------------------------------------------------------------------------------------
# Library configs of a preset (plain functions: RenderNet builds its UNet + ControlNet from them)
# ---------------------------------------------------------------------------------------------
def unet_config(preset: str, in_channels: int = 4) -> dict:
    """``UNet2DConditionModel(**unet_config(preset, in_channels))``: SD 1.5's UNet for ``paper``."""
    s = sizes_of(preset)
    plain = len(s.unet_block_channels) - s.unet_cross_attn_blocks
    return dict(
        sample_size=64, in_channels=in_channels, out_channels=s.latent_channels,
        block_out_channels=s.unet_block_channels, layers_per_block=s.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * s.unet_cross_attn_blocks + ("DownBlock2D",) * plain,
        up_block_types=("UpBlock2D",) * plain + ("CrossAttnUpBlock2D",) * s.unet_cross_attn_blocks,
        cross_attention_dim=s.cross_attention_dim,
        attention_head_dim=s.unet_heads,  # diffusers' SD 1.5 field: it is the number of heads
        norm_num_groups=s.unet_norm_groups,
    )


def vae_config(preset: str) -> dict:
    """``AutoencoderKL(**vae_config(preset))``: SD's VAE (scale factor 8) for ``paper``."""
    s = sizes_of(preset)
    blocks = len(s.vae_block_channels)
    return dict(
        in_channels=3, out_channels=3, latent_channels=s.latent_channels,
        block_out_channels=s.vae_block_channels, layers_per_block=s.vae_layers_per_block,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        norm_num_groups=s.vae_norm_groups, scaling_factor=s.scaling_factor, sample_size=512,
    )


def clip_text_config(preset: str, tokens: "sd_pretrained.TokenizerInfo | None" = None):
    from transformers import CLIPTextConfig

    s = sizes_of(preset)
    ids = tokens or _tiny_tokenizer_info()
    return CLIPTextConfig(
        vocab_size=s.clip_vocab_size, hidden_size=s.text_hidden, intermediate_size=s.text_intermediate,
        num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
        max_position_embeddings=s.clip_tokens, hidden_act="quick_gelu", projection_dim=s.cross_attention_dim,
        bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id, pad_token_id=ids.pad_token_id,
    )


def clip_vision_config(preset: str):
    from transformers import CLIPVisionConfig

    s = sizes_of(preset)
    return CLIPVisionConfig(
        hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate, num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads, image_size=s.clip_image_size, patch_size=s.vision_patch,
        projection_dim=s.vision_projection, hidden_act="quick_gelu",
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
def _tiny_tokenizer():
    # CLIP's special tokens, padding with the end token as SD 1.5's tokenizer does.
    return tokenizers.train_tiny_tokenizer(TINY_TOKENIZER_VOCAB, bos="<|startoftext|>", eos="<|endoftext|>",
                                           pad="<|endoftext|>")


@lru_cache(maxsize=1)
def _tiny_tokenizer_info() -> sd_pretrained.TokenizerInfo:
    tokenizer = _tiny_tokenizer()
    bos, eos = tokenizer.token_to_id("<|startoftext|>"), tokenizer.token_to_id("<|endoftext|>")
    return sd_pretrained.TokenizerInfo(tokenizer.get_vocab_size(), bos, eos, eos)


# ---------------------------------------------------------------------------------------------
# The family as configured by preset + sources: sizes from the folders' configs where given
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    preset: str
    folders: dict  # component -> (sd_pretrained.Folder, its config dict)
    adapter_checkpoint: str | None
    tokens: sd_pretrained.TokenizerInfo
    unet: dict  # UNet2DConditionModel config
    vae: dict  # AutoencoderKL config
    text: dict  # size fields of the text encoder
    vision: dict  # size fields of the image encoder

    @property
    def static_dims(self) -> dict:
        return {
            "latent_channels": self.unet["out_channels"],
            "cross_attention_dim": self.unet["cross_attention_dim"],
            "clip_tokens": self.text["max_position_embeddings"],
            "clip_vocab_size": self.text["vocab_size"],
            "image_tokens": sizes_of(self.preset).image_tokens,
            "clip_image_size": self.vision["image_size"],
        }

    @property
    def adapter_weights(self) -> str:
        if self.adapter_checkpoint:
            return "checkpoint"
        return "zero" if "unet" in self.folders else "random"

    def config(self) -> dict:
        """The manifest's ``config["stable_diffusion"]``: what the runtime drives the pipeline with."""
        dims = self.static_dims
        shift = self.vae.get("shift_factor")
        return {
            "family": "stable_diffusion",
            "scaling_factor": float(self.vae.get("scaling_factor") or PAPER.scaling_factor),
            "shift_factor": float(shift or 0.0),
            "vae_scale_factor": 2 ** (len(self.vae["block_out_channels"]) - 1),
            "latent_channels": dims["latent_channels"],
            "unet_in_channels": UNET_IN_CHANNELS,
            "cross_attention_dim": dims["cross_attention_dim"],
            "clip_tokens": dims["clip_tokens"],
            "tokenizer": TOKENIZER_ASSET,
            "bos_token_id": self.tokens.bos_token_id,
            "eos_token_id": self.tokens.eos_token_id,
            "pad_token_id": self.tokens.pad_token_id,
            "image_tokens": dims["image_tokens"],
            "clip_image_size": dims["clip_image_size"],
            "scheduler": dict(SD15_SCHEDULER),
            "prompt_template": PROMPT_TEMPLATE,
            "default_style": DEFAULT_STYLE,
            "negative_prompt": "",
            "guidance_scale": 7.5,
            "num_inference_steps": 30,
            "adapter_weights": self.adapter_weights,
            # zero adapters contribute nothing whatever the scale; say so rather than pretend
            "default_ip_scale": 0.0 if self.adapter_weights == "zero" else 1.0,
        }


def _sources_key(sources) -> tuple:
    pretrained = tuple(sorted((sources.pretrained or {}).items()))
    return pretrained, (sources.checkpoints or {}).get(ADAPTER_CHECKPOINT)


def family(preset: str, sources) -> Family:
    return _family(preset, *_sources_key(sources))


@lru_cache(maxsize=8)
def _family(preset: str, pretrained_items: tuple, adapter_checkpoint: str | None) -> Family:
    """Reads only config files (no weights): cheap, and shared by every model's build."""
    sizes_of(preset)
    pretrained = dict(pretrained_items)
    folders = {}
    for component in ("unet", "vae", "text_encoder", "image_encoder", "tokenizer"):
        found = sd_pretrained.checked_config(pretrained, component)
        if found:
            folders[component] = found

    if "tokenizer" in folders:
        tokens = sd_pretrained.tokenizer_info(folders["tokenizer"][0])
    elif "text_encoder" in folders:
        raise CheckpointError(f"{folders['text_encoder'][0].flag}: a pretrained text encoder needs its tokenizer; "
                              f"add --from-pretrained tokenizer=PATH (the CLIP tokenizer folder)")
    else:
        tokens = _tiny_tokenizer_info()

    unet = folders["unet"][1] if "unet" in folders else unet_config(preset, UNET_IN_CHANNELS)
    vae = folders["vae"][1] if "vae" in folders else vae_config(preset)
    text = folders["text_encoder"][1] if "text_encoder" in folders else clip_text_config(preset, tokens).to_dict()
    vision = folders["image_encoder"][1] if "image_encoder" in folders else clip_vision_config(preset).to_dict()
    built = Family(preset, folders, adapter_checkpoint, tokens, unet, vae, text, vision)
    _check_consistent(built)
    return built


def _origin(built: Family, component: str) -> str:
    if component in built.folders:
        return built.folders[component][0].flag
    return f"the {built.preset} preset's random {component}"


def _check_consistent(built: Family) -> None:
    """Pieces from different folders (or a folder and the preset) must fit together."""
    cross = built.unet["cross_attention_dim"]
    if built.text["hidden_size"] != cross:
        raise CheckpointError(f"text_encoder: hidden size {built.text['hidden_size']} ({_origin(built, 'text_encoder')}) "
                              f"does not match the UNet's cross_attention_dim {cross} ({_origin(built, 'unet')})")
    if built.vae["latent_channels"] != built.unet["out_channels"]:
        raise CheckpointError(f"vae: latent_channels {built.vae['latent_channels']} ({_origin(built, 'vae')}) does not "
                              f"match the UNet's out_channels {built.unet['out_channels']} ({_origin(built, 'unet')})")
    if built.tokens.vocab_size > built.text["vocab_size"]:
        raise CheckpointError(f"tokenizer: {built.tokens.vocab_size} tokens ({_origin(built, 'tokenizer')}) exceed the "
                              f"text encoder's vocab_size {built.text['vocab_size']} ({_origin(built, 'text_encoder')})")


# ---------------------------------------------------------------------------------------------
# The served modules (forward in contract input order, outputs in contract order)
# ---------------------------------------------------------------------------------------------
class ClipTextEncoder(nn.Module):
    def __init__(self, text_model):
        super().__init__()
        self.text_model = text_model

    def forward(self, input_ids):
        # SD conditions on the last hidden state (after the final LayerNorm), not the pooled token.
        return self.text_model(input_ids=input_ids).last_hidden_state


class ImageEncoder(nn.Module):
    def __init__(self, vision_model, projection: ImagePromptProjection, with_projection: bool, mean, std):
        super().__init__()
        self.vision_model = vision_model
        self.projection = projection
        self.with_projection = with_projection
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, image):
        out = self.vision_model(pixel_values=(image - self.mean) / self.std)
        embeds = out.image_embeds if self.with_projection else out.pooler_output
        return self.projection(embeds)


class VaeEncoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)

    def forward(self, image):
        # The posterior mean, not a sample: the prologue must be deterministic (and export cannot sample).
        mean = self.vae.encode(image).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor


class VaeDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)

    def forward(self, latent):
        image = self.vae.decode(latent / self.scaling_factor + self.shift_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


class BackgroundUNet(nn.Module):
    """The 9-channel inpainting UNet; the adapters read the mask, the category tokens and the image
    prompt through ``cross_attention_kwargs``."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, masked_image_latents, mask, category_token_mask,
                image_prompt_embeds, ip_scale):
        # diffusers' SD-inpainting channel order: noisy latents, mask, masked-image latents
        unet_input = torch.cat([sample, mask, masked_image_latents], dim=1)
        adapter = AdapterInputs(mask, category_token_mask, image_prompt_embeds, ip_scale)
        return self.unet(unet_input, timestep, encoder_hidden_states,
                         cross_attention_kwargs={ADAPTER_KWARG: adapter}, return_dict=False)[0]


class BackgroundUNetDeep(BackgroundUNet):
    """bg_unet_deep: the same forward, plus the deep feature for the cache (``feature_cache.py``)."""

    def forward(self, sample, timestep, encoder_hidden_states, masked_image_latents, mask, category_token_mask,
                image_prompt_embeds, ip_scale):
        unet_input = torch.cat([sample, mask, masked_image_latents], dim=1)
        adapter = AdapterInputs(mask, category_token_mask, image_prompt_embeds, ip_scale)
        return run_capturing_deep_feature(self.unet, unet_input, timestep, encoder_hidden_states,
                                          cross_attention_kwargs={ADAPTER_KWARG: adapter})


class BackgroundUNetShallow(nn.Module):
    """bg_unet_shallow: the shallow path on a cached deep feature; the adapters work as in the full step
    (the first down and last up block run at the latent resolution, level 0)."""

    def __init__(self, unet):
        super().__init__()
        self.shallow = ShallowUNet(unet)

    @property
    def unet(self):
        return self.shallow.unet

    def forward(self, sample, timestep, encoder_hidden_states, masked_image_latents, mask, category_token_mask,
                image_prompt_embeds, ip_scale, deep_feature):
        unet_input = torch.cat([sample, mask, masked_image_latents], dim=1)
        adapter = AdapterInputs(mask, category_token_mask, image_prompt_embeds, ip_scale)
        return self.shallow(unet_input, timestep, encoder_hidden_states, deep_feature,
                            cross_attention_kwargs={ADAPTER_KWARG: adapter})


UNET_GRAPHS = {"bg_unet": BackgroundUNet, "bg_unet_deep": BackgroundUNetDeep, "bg_unet_shallow": BackgroundUNetShallow}


# ---------------------------------------------------------------------------------------------
# Building each model
# ---------------------------------------------------------------------------------------------
def _seed(model: str) -> None:
    """A fixed seed per model: random weights are the same on every build (the PyTorch reference
    backend rebuilds the modules the exporter exported)."""
    torch.manual_seed(zlib.crc32(model.encode()))


def _adapter_state(built: Family) -> dict | None:
    return read_state_dict(built.adapter_checkpoint) if built.adapter_checkpoint else None


def build_text_encoder(built: Family) -> nn.Module:
    from transformers import CLIPTextModel

    if "text_encoder" in built.folders:
        text_model = sd_pretrained.load_text_encoder(built.folders["text_encoder"][0])
    else:
        text_model = CLIPTextModel(clip_text_config(built.preset, built.tokens))
    return ClipTextEncoder(text_model.eval())


def build_image_encoder(built: Family) -> nn.Module:
    from transformers import CLIPVisionModelWithProjection

    mean, std = CLIP_MEAN, CLIP_STD
    if "image_encoder" in built.folders:
        folder, config = built.folders["image_encoder"]
        vision = sd_pretrained.load_image_encoder(folder, config)
        with_projection = sd_pretrained.image_encoder_has_projection(config)
        mean, std = sd_pretrained.image_normalization(folder) or (mean, std)
    else:
        vision = CLIPVisionModelWithProjection(clip_vision_config(built.preset))
        with_projection = True
    embed_dim = vision.config.projection_dim if with_projection else vision.config.hidden_size
    dims = built.static_dims
    projection = ImagePromptProjection(embed_dim, dims["cross_attention_dim"], dims["image_tokens"])
    state = _adapter_state(built)
    if state is not None:
        load_image_projection(projection, state, built.adapter_checkpoint)
    return ImageEncoder(vision.eval(), projection, with_projection, mean, std)


def build_vae(built: Family):
    from diffusers import AutoencoderKL

    if "vae" in built.folders:
        return sd_pretrained.load_vae(built.folders["vae"][0])
    return AutoencoderKL(**vae_config(built.preset)).eval()


def build_unet(built: Family, graph: str = "bg_unet") -> nn.Module:
    """The UNet as one of its three graphs (the plain step, the deep step, the shallow step)."""
    from diffusers import UNet2DConditionModel

    if "unet" in built.folders:
        unet = sd_pretrained.load_unet(built.folders["unet"][0])
    else:
        unet = UNet2DConditionModel(**unet_config(built.preset, UNET_IN_CHANNELS))
    # Random adapters on a random UNet (so parity exercises them); zeros on a pretrained one.
    install_adapters(unet, zero_init="unet" in built.folders)
    state = _adapter_state(built)
    if state is not None:
        load_unet_adapters(unet, state, built.adapter_checkpoint)
    return UNET_GRAPHS[graph](unet.eval())


def _unet_overrides(sizes: Mapping[str, int], rng: np.random.Generator, contract: ModelContract) -> dict:
    """Inputs shaped like a real request: a rectangular product, a short category span, moderate scales."""
    batch, tokens = sizes["cfg_batch"], contract.input("category_token_mask").shape[1]
    latent_h, latent_w = sizes["height"] // 8, sizes["width"] // 8
    mask = np.ones((batch, 1, latent_h, latent_w), np.float32)
    category = np.zeros((batch, tokens), np.float32)
    for b in range(batch):
        top, left = rng.integers(0, latent_h // 2), rng.integers(0, latent_w // 2)
        mask[b, :, top:top + rng.integers(3, latent_h // 2 + 1), left:left + rng.integers(3, latent_w // 2 + 1)] = 0
        start = rng.integers(1, 8)
        category[b, start:start + rng.integers(1, 4)] = 1
    return {"mask": mask, "category_token_mask": category,
            "ip_scale": rng.uniform(0, 1.5, size=batch).astype(np.float32)}


def build(model: str, preset: str, sources) -> Exportable:
    assert model in MODELS, f"{model} is not a stable_diffusion model"
    built = family(preset, sources)
    _seed("bg_unet" if model in UNET_MODELS else model)  # the cached steps hold the plain step's weights
    overrides = None
    if model == "clip_text_encoder":
        module = build_text_encoder(built)
    elif model == "image_encoder":
        module = build_image_encoder(built)
    elif model == "vae_encoder":
        module = VaeEncoder(build_vae(built))
    elif model == "vae_decoder":
        module = VaeDecoder(build_vae(built))
    else:
        module = build_unet(built, model)
        overrides = _unet_overrides
    known = {**built.static_dims, "deep_channels": deep_channels(module.unet) if model in UNET_MODELS else None}
    static_dims = {name: known[name] for name in get_contract(model).static_dims}
    # ContractModule: a tuple of outputs in contract order, as the parity check and tracer expect
    module = ContractModule(module.eval(), get_contract(model).output_names)
    return Exportable(model, module, static_dims, built.config(), input_overrides=overrides)


def write_assets(preset: str, sources, folder: Path) -> dict:
    built = family(preset, sources)
    if "tokenizer" in built.folders:
        tokenizer = tokenizers.tokenizer_from_pretrained(str(built.folders["tokenizer"][0].path))
    else:
        tokenizer = _tiny_tokenizer()
    return {TOKENIZER_ASSET: tokenizers.save_tokenizer(tokenizer, Path(folder), "clip")}
