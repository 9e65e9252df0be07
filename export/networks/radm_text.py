"""RADM's text encoder: a transformers ``RobertaModel`` whose pooled output is one vector per text line.

The public RADM code reads precomputed per-line features; posterrt serves the encoder so a request
only carries strings. Random init at the preset's size, or ``--from-pretrained roberta=PATH``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from posterrt.runtime.errors import CheckpointError

from .radm_config import TextEncoderConfig


def roberta_config(config: TextEncoderConfig, **extra):
    from transformers import RobertaConfig

    return RobertaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        **extra,
    )


def pretrained_text_config(path: str) -> TextEncoderConfig:
    """The sizes and special ids of a transformers RoBERTa folder (reads only its config.json)."""
    from transformers import AutoConfig

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"--from-pretrained roberta={path}: no config.json there; expected a transformers "
                              f"RobertaModel folder (save_pretrained output)")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as error:  # malformed JSON or unknown model_type
        raise CheckpointError(f"--from-pretrained roberta={path}: config.json cannot be read: {error}") from None
    if config.model_type not in ("roberta", "xlm-roberta"):
        raise CheckpointError(f"--from-pretrained roberta={path}: model_type is {config.model_type!r}, "
                              f"expected 'roberta'")
    return TextEncoderConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
    )


class RADMTextEncoder(nn.Module):
    """The served ``radm_text_encoder``: (input_ids, attention_mask) -> pooled feature per row."""

    def __init__(self, config: TextEncoderConfig, pretrained: str | None = None):
        super().__init__()
        from transformers import RobertaModel

        # Eager attention: the legacy ONNX tracer exports it exactly; the SDPA path builds its mask
        # with code the tracer cannot follow.
        if pretrained is None:
            self.roberta = RobertaModel(roberta_config(config, attn_implementation="eager"), add_pooling_layer=True)
        else:
            try:
                self.roberta = RobertaModel.from_pretrained(pretrained, add_pooling_layer=True,
                                                            attn_implementation="eager")
            except Exception as error:  # missing or corrupt weight files raise many types
                raise CheckpointError(f"--from-pretrained roberta={pretrained}: the weights cannot be loaded: "
                                      f"{type(error).__name__}: {error}") from None

    def forward(self, input_ids, attention_mask):
        # a tuple: outputs in contract order, like every served module
        return (self.roberta(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=self.position_ids(input_ids)).pooler_output,)

    def position_ids(self, input_ids):
        """RoBERTa's own position ids (padding keeps the padding id, tokens count up after it),
        summed in float: transformers sums an int32 mask, and TensorRT's ONNX parser lists CumSum
        for float types only (engines/onnx_operators.py). Exact below 2**24 tokens per row."""
        padding = self.roberta.config.pad_token_id
        mask = input_ids.ne(padding).float()
        return (torch.cumsum(mask, dim=1) * mask).long() + padding

