"""DeepCache's two graphs of a diffusers ``UNet2DConditionModel`` (arXiv 2312.00858, our cut).

The cut is at diffusers' block boundary, on the shallowest skip branch: the *deep* step is the
UNet's own forward, unchanged, that also hands out what its second-to-last up block passes to the
last one (the *deep feature*); the *shallow* step runs ``conv_in``, the first down block, the last
up block on the cached deep feature, and the output convolutions. Everything in between (down
blocks 1.., the mid block, up blocks ..-2) is what a shallow step saves.

Why this cut: it is the skip branch DeepCache's SD 1.5 results favour (the shallowest one: the most
compute saved), taken at whole blocks so that both graphs call diffusers' blocks as they are
(DeepCache's own finer cut, inside the first down and last up block, needs a fork of diffusers'
block code). The last up block's inputs are the deep feature plus the skip residuals of
``conv_in`` and of the first down block's layers, all of which the shallow step computes itself;
the first down block's downsampler output feeds only the skipped up block, so the shallow graph
does not compute it (the exporter drops the unused node).
"""
from __future__ import annotations

import torch
from torch import nn

from posterrt.runtime.errors import CheckpointError

#: UNet config fields that add inputs or embeddings the shallow path does not carry.
_UNSUPPORTED = ("class_embed_type", "addition_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim")


def check_cacheable(unet, where: str) -> None:
    """Refuse UNets the shallow path cannot reproduce (extra embeddings, a centred input)."""
    config = unet.config
    for key in _UNSUPPORTED:
        if config.get(key) is not None:
            raise CheckpointError(f"{where}: UNet config {key}={config[key]!r} is not supported by the cached "
                                  f"steps (expected None: an SD 1.5-style UNet)")
    if config.get("center_input_sample"):
        raise CheckpointError(f"{where}: UNet config center_input_sample=True is not supported by the cached steps")
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    if len(last.resnets) != 1 + len(first.resnets):
        raise CheckpointError(f"{where}: the last up block takes {len(last.resnets)} skip residuals, the first down "
                              f"block and conv_in give {1 + len(first.resnets)}; expected a symmetric UNet")


def deep_channels(unet) -> int:
    """Width of the deep feature: the second-to-last up block's output (its input width into the last)."""
    return int(unet.up_blocks[-2].resnets[-1].conv2.out_channels)


def run_capturing_deep_feature(unet, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``unet(*args, **kwargs)`` (return_dict=False) and the hidden state its last up block received."""
    captured = []

    def capture(module, args, kwargs):
        captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handle = unet.up_blocks[-1].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        noise = unet(*args, return_dict=False, **kwargs)[0]
    finally:
        handle.remove()
    assert len(captured) == 1, "the last up block runs once per forward"
    return noise, captured[0]


def time_embedding(unet, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The UNet's timestep embedding as its forward computes it (no class / added embeddings: checked)."""
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


def first_block_residuals(block, hidden: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor,
                          cross_attention_kwargs: dict | None = None) -> tuple[torch.Tensor, ...]:
    """The skip residuals of one down block's layers (its downsampler's output is left out)."""
    if getattr(block, "has_cross_attention", False):
        _, residuals = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states,
                             cross_attention_kwargs=cross_attention_kwargs)
    else:
        _, residuals = block(hidden_states=hidden, temb=emb)
    return tuple(residuals[:len(block.resnets)])


class ShallowUNet(nn.Module):
    """conv_in, down block 0, [cached deep feature], last up block, output convolutions.

    ``residual_additions`` are a ControlNet's scaled residuals for the skip connections the shallow
    path has (conv_in's and the first down block's layers'), added where the UNet's forward adds them.
    """

    def __init__(self, unet):
        super().__init__()
        check_cacheable(unet, "shallow step")
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, deep_feature, cross_attention_kwargs=None,
                residual_additions=None):
        unet = self.unet
        emb = time_embedding(unet, sample, timestep)
        hidden = unet.conv_in(sample)
        residuals = (hidden, *first_block_residuals(unet.down_blocks[0], hidden, emb, encoder_hidden_states,
                                                    cross_attention_kwargs))
        if residual_additions is not None:
            assert len(residual_additions) == len(residuals), "one ControlNet residual per skip connection"
            residuals = tuple(r + a for r, a in zip(residuals, residual_additions))
        last = unet.up_blocks[-1]
        if getattr(last, "has_cross_attention", False):
            out = last(hidden_states=deep_feature, temb=emb, res_hidden_states_tuple=residuals,
                       encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs)
        else:
            out = last(hidden_states=deep_feature, temb=emb, res_hidden_states_tuple=residuals)
        if unet.conv_norm_out is not None:
            out = unet.conv_act(unet.conv_norm_out(out))
        return unet.conv_out(out)
