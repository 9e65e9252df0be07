"""Tokenizer files for a bundle, in the standard `tokenizer.json` format the runtime reads with `tokenizers`.

Tiny bundles train a small byte-level BPE on a built-in corpus (so CJK and any script encode);
real checkpoints bring their own tokenizer folder, converted here with transformers.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Short poster phrases in the languages JD posters use; enough to learn merges for a tiny vocab.
_CORPUS = [
    "Summer sale 50% off", "New arrival", "Limited time offer", "Free shipping", "Buy one get one",
    "Fresh fruit juice", "Premium coffee beans", "Smart watch", "Wireless earphones", "Skin care set",
    "限时特惠", "新品上市", "全场五折", "买一送一", "包邮到家", "品质生活", "夏日清凉", "爆款直降",
    "京东自营", "好物推荐", "正品保障", "立即购买",
]


def train_tiny_tokenizer(vocab_size: int, bos: str = "<s>", eos: str = "</s>", pad: str = "<pad>") -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[pad, bos, eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))])
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, folder: Path, name: str) -> str:
    """Write ``folder/tokenizers/<name>.json``; returns the bundle-relative path."""
    relative = f"tokenizers/{name}.json"
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return relative


def tokenizer_from_pretrained(path: str) -> Tokenizer:
    """A transformers tokenizer folder (vocab.json + merges.txt, or tokenizer.json) as a `tokenizers` object."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, use_fast=True).backend_tokenizer
