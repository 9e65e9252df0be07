"""Tokenization with the `tokenizers` library from the bundle's ``tokenizer.json`` files.

Each encoder gets its own ``Tokenizer`` configured once with fixed-length padding and truncation
(the library keeps the special tokens when it truncates), so token ids depend only on the text.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from tokenizers import Tokenizer

from .bundle import Bundle
from .errors import BundleError


def load_tokenizer(bundle: Bundle, asset: str, length: int, pad_id: int | None = None) -> Tokenizer:
    """The bundle's tokenizer ``assets[asset]``, padding and truncating every text to ``length`` tokens.

    ``pad_id``: the padding id the model was trained with (CLIP pads with its end token); None
    takes the tokenizer's ``<pad>`` token.
    """
    relative = bundle.manifest.get("assets", {}).get(asset)
    if relative is None:
        raise BundleError(f"bundle {bundle.root}: the manifest has no tokenizer asset {asset!r}; export the bundle again")
    path = bundle.file(relative, f"tokenizer {asset!r}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception for malformed JSON
        raise BundleError(f"bundle {bundle.root}: tokenizer {relative} cannot be read ({error})") from None
    if pad_id is None:
        pad_id = tokenizer.token_to_id("<pad>")
        if pad_id is None:
            raise BundleError(f"bundle {bundle.root}: tokenizer {relative} has no <pad> token and the config names no pad id")
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=int(pad_id), pad_token=tokenizer.id_to_token(int(pad_id)) or "<pad>")
    return tokenizer


def encode_lines(tokenizer: Tokenizer, lines: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, attention mask), both int64 ``[len(lines), length]``: one row per poster text line."""
    encodings = tokenizer.encode_batch(lines)
    ids = np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(lines), -1)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64).reshape(len(lines), -1)
    return ids, mask


def encode_prompt(tokenizer: Tokenizer, template: str, fields: Mapping[str, str],
                  marked: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[length]`` of ``template.format(**fields)`` and a float32 mask ``[length]`` marking
    the tokens that spell the field ``marked`` (the category identifier whose cross-attention the
    background generator confines to the background).

    Tokens are matched by character offsets, so the mask is right for any BPE split of the word.
    """
    prompt = template.format(**fields)
    encoding = tokenizer.encode(prompt)
    ids = np.array(encoding.ids, dtype=np.int64)
    marks = np.zeros(len(ids), dtype=np.float32)
    placeholder = "{" + marked + "}" if marked else None
    if placeholder and placeholder in template and fields[marked]:
        start = len(template.split(placeholder)[0].format(**fields))
        end = start + len(fields[marked])
        for index, ((lo, hi), special) in enumerate(zip(encoding.offsets, encoding.special_tokens_mask)):
            if not special and lo < end and hi > start:
                marks[index] = 1.0
    return ids, marks
