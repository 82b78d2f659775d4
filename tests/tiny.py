"""Tiny offline models for tests: one place that builds them from a config (no download).

``tiny_llama(seed, **config)``: a randomly initialised ``LlamaForCausalLM`` (4 layers, width 64,
vocab 256 unless overridden); ``byte_tokenizer()``: a lossless byte-level BPE tokenizer with no
merges (vocab 256); ``tiny_llama_lm(...)``: both wrapped as a saeflow ``LM``. conftest.py's
``tiny_lm`` fixture builds the other architectures the same way.
"""

from __future__ import annotations

import torch

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)


def tiny_llama(seed: int = 0, **config):
    """A random tiny Llama; ``config`` overrides ``LLAMA`` (and passes other config fields)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **config}))


def byte_tokenizer():
    """A lossless byte-level BPE tokenizer with no merges (vocab 256), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def tiny_llama_lm(seed: int = 0, name: str = "tiny-llama", tokenizer=True, **config):
    """``tiny_llama`` with ``byte_tokenizer`` (or none) as a saeflow ``LM``."""
    from saeflow.models import lm_from_model
    return lm_from_model(tiny_llama(seed, **config), byte_tokenizer() if tokenizer else None,
                         name=name)
