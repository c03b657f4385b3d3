"""Offline tokenizers and frozen random-init text encoders for the text-to-image teachers.

Nothing is downloaded: every tokenizer is built from a character vocabulary (one token per character, enough for
the class captions), every encoder from a small config with seeded random weights. The encoders stay frozen; the
denoiser learns to read their states (issue 12: "random-init frozen CLIP/T5/Gemma encoders over a small
vocabulary are fine"). Their sizes are fixed here and named by the families that use them (family sizes only
choose the denoiser).
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import torch

CHARACTERS = string.ascii_lowercase + string.digits + " -/'.,:"  # what the class captions (and Sana's preamble) use
CLIP_MAX_TOKENS = 32  # CLIP tokenizer model_max_length: the longest caption is 24 characters + <bos>, <eos>


@dataclass(frozen=True)
class EncoderSize:
    """A small transformer text encoder."""

    hidden: int = 64  # width of the token states (what the denoiser's cross/joint attention reads)
    layers: int = 2  # transformer layers
    heads: int = 2  # attention heads
    projection: int | None = None  # CLIPTextModelWithProjection's text_embeds width (None: plain CLIPTextModel)


def clip_tokenizer():
    """CLIP BPE tokenizer without merges: one token per character (word-final characters carry </w>)."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in CHARACTERS:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(f"{char}</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_TOKENS)


def clip_encoder(size: EncoderSize, seed: int):
    """A frozen CLIPTextModel (or CLIPTextModelWithProjection) over the character vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(clip_tokenizer()), hidden_size=size.hidden,
                            intermediate_size=2 * size.hidden, num_hidden_layers=size.layers,
                            num_attention_heads=size.heads, max_position_embeddings=CLIP_MAX_TOKENS, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1, projection_dim=size.projection or size.hidden)  # fmt: skip
    model = CLIPTextModelWithProjection(config) if size.projection else CLIPTextModel(config)
    return model.eval().requires_grad_(False)


def t5_tokenizer():
    """T5 unigram tokenizer whose pieces are single characters (and the word-start marker)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in CHARACTERS + "\u2581"]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def t5_encoder(size: EncoderSize, seed: int):
    """A frozen T5EncoderModel over the character pieces."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(t5_tokenizer()), d_model=size.hidden, d_kv=size.hidden // size.heads,
                      d_ff=2 * size.hidden, num_layers=size.layers, num_heads=size.heads,
                      relative_attention_num_buckets=8)  # fmt: skip
    return T5EncoderModel(config).eval().requires_grad_(False)


def gemma_tokenizer():
    """Gemma BPE tokenizer without merges over the characters (prompts start with <bos>, as Gemma's)."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({c: len(vocab) + i for i, c in enumerate(CHARACTERS)})
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


def gemma_encoder(size: EncoderSize, seed: int):
    """A frozen Gemma2Model over the characters (positions for Sana's long instruction preamble)."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=len(gemma_tokenizer()), hidden_size=size.hidden,
                          intermediate_size=2 * size.hidden, num_hidden_layers=size.layers,
                          num_attention_heads=size.heads, num_key_value_heads=1, head_dim=size.hidden // size.heads,
                          max_position_embeddings=8192)  # fmt: skip
    return Gemma2Model(config).eval().requires_grad_(False)
