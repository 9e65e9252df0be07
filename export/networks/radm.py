"""RADM family (CIKM 2023, relation-aware layout diffusion): the served models ``radm_backbone``,
``radm_text_encoder`` and ``radm_head``, and the tokenizer asset.

Weights: random at the preset's size (seeded per model, so two builds are identical), or
``--checkpoint radm=model_final.pth|.safetensors`` (the public code's Detectron2 state dict: its
``backbone.*`` and ``head.*`` tensors) and ``--from-pretrained roberta=FOLDER`` (transformers).
"""
from __future__ import annotations

import zlib
from typing import Mapping

import numpy as np
import torch

from posterrt.runtime.contracts import ModelContract, get_contract
from posterrt.runtime.errors import CheckpointError, InputError

from ..checkpoints import load_into, read_state_dict
from ..spec import Exportable
from ..tokenizers import save_tokenizer, tokenizer_from_pretrained, train_tiny_tokenizer
from .radm_backbone import RADMBackbone
from .radm_config import RADMConfig
from .radm_head import RADMHead
from .radm_text import RADMTextEncoder, pretrained_text_config

CHECKPOINT_KEY = "radm"  # --checkpoint radm=PATH
PRETRAINED_KEY = "roberta"  # --from-pretrained roberta=PATH
TOKENIZER_ASSET = "radm_tokenizer"

# Tensors of the public code's checkpoints that inference does not read: the diffusion schedule
# buffers of the RADM meta-architecture (the runtime recomputes the schedule from the config) and
# the loss module. The intermediate stages' class branches *are* loaded (they belong to
# head.head_series.k like everything else) and simply drop out of the exported graph, since only
# the last stage's logits are an output.
TRAINING_ONLY_PREFIXES = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "criterion.",
)
# Which prefix of the checkpoint each served model owns; the other's tensors are expected extras.
CHECKPOINT_PREFIX = {"radm_backbone": "backbone.", "radm_head": "head."}


def family_config(preset: str, sources) -> RADMConfig:
    """The preset, with the text encoder's sizes taken from a pretrained folder when one is given."""
    config = RADMConfig.preset(preset)
    pretrained = sources.pretrained.get(PRETRAINED_KEY)
    if pretrained:
        config = config.with_text(pretrained_text_config(pretrained))
    return config


def static_dims(config: RADMConfig) -> dict:
    return {
        "fpn_channels": config.backbone.fpn_channels,
        "text_dim": config.text.hidden_size,
        "num_classes": config.num_classes,
        "text_vocab_size": config.text.vocab_size,
    }


def build(model: str, preset: str, sources) -> Exportable:
    _check_checkpoint_keys(sources)
    config = family_config(preset, sources)
    # A fixed seed per model: building twice gives the same weights (the PyTorch reference backend
    # rebuilds the modules a bundle was exported from). fork_rng keeps the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(model.encode()))
        if model == "radm_backbone":
            module = RADMBackbone(config.backbone)
        elif model == "radm_head":
            module = RADMHead(config.head, text_dim=config.text.hidden_size, num_classes=config.num_classes)
        elif model == "radm_text_encoder":
            module = RADMTextEncoder(config.text, pretrained=sources.pretrained.get(PRETRAINED_KEY))
        else:
            raise InputError(f"model {model!r} is not an RADM model; expected one of "
                             f"radm_backbone, radm_text_encoder, radm_head")
    checkpoint = sources.checkpoints.get(CHECKPOINT_KEY)
    if checkpoint and model in CHECKPOINT_PREFIX:
        other = tuple(p for m, p in CHECKPOINT_PREFIX.items() if m != model)
        load_into(module, read_state_dict(checkpoint), checkpoint, ignore_unexpected=other + TRAINING_ONLY_PREFIXES)
    contract = get_contract(model)
    dims = {name: value for name, value in static_dims(config).items() if name in contract.static_dims}
    overrides = _head_inputs if model == "radm_head" else None
    return Exportable(model, module.eval(), dims, config.manifest_config(), input_overrides=overrides)


def write_assets(preset: str, sources, folder) -> dict:
    """``tokenizers/radm.json``: the pretrained folder's tokenizer, or a tiny BPE trained here."""
    config = family_config(preset, sources)
    pretrained = sources.pretrained.get(PRETRAINED_KEY)
    if pretrained:
        try:
            tokenizer = tokenizer_from_pretrained(pretrained)
        except Exception as error:  # transformers raises OSError/ValueError/... for bad folders
            raise CheckpointError(f"--from-pretrained roberta={pretrained}: no usable tokenizer there "
                                  f"({type(error).__name__}: {error})") from None
    else:
        tokenizer = train_tiny_tokenizer(config.text.vocab_size)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > config.text.vocab_size:
        raise CheckpointError(f"RADM tokenizer has {vocab} tokens, more than the text encoder's vocab_size "
                              f"{config.text.vocab_size}: ids past it would index outside the embedding")
    return {TOKENIZER_ASSET: save_tokenizer(tokenizer, folder, "radm")}


def _check_checkpoint_keys(sources) -> None:
    misnamed = [k for k in sources.checkpoints if k.startswith("radm") and k != CHECKPOINT_KEY]
    if misnamed:
        raise InputError(f"--checkpoint {misnamed[0]}=...: RADM weights are one file for all its models; "
                         f"pass --checkpoint {CHECKPOINT_KEY}=PATH")


def _head_inputs(sizes: Mapping[str, int], rng: np.random.Generator, contract: ModelContract) -> dict:
    """Boxes a sampler could send: inside or slightly past the image, sizes from a few pixels to the
    whole image (log-uniform, so every FPN level is used), and the image size that matches P2."""
    batch, proposals = sizes["batch"], sizes["proposals"]
    height, width = sizes["height"], sizes["width"]
    centres = rng.uniform(0, 1, size=(batch, proposals, 2)) * [width, height]
    extents = np.exp(rng.uniform(np.log(4), np.log(max(height, width)), size=(batch, proposals, 2)))
    boxes = np.concatenate([centres - extents / 2, centres + extents / 2], axis=-1)
    image_size = np.tile(np.array([[height, width]], dtype=np.float32), (batch, 1))
    return {"boxes": boxes.astype(np.float32), "image_size": image_size}
