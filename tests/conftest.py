"""Shared fixtures: tiny randomly initialised LMs built from configs (no download, no tokenizer).

``tiny_lm(model_type)`` builds (once per session) a 4-layer model of that architecture wrapped as
a saeflow ``LM``; ``tiny_llama`` is the llama one. Feed them ``torch.randint(0, 256, (B, T))``.
Tests that need a tokenizer or their own seed build one with ``tests/tiny.py`` (the same sizes).
"""

from __future__ import annotations

import pytest
import torch

from tiny import LLAMA as TINY


def _config(model_type: str):
    import transformers as tf
    if model_type == "llama":
        return tf.LlamaConfig(**TINY)
    if model_type == "qwen2":
        return tf.Qwen2Config(**TINY)
    if model_type == "gemma2":  # head_dim 24: att_z (96 wide) differs from d_model (64)
        return tf.Gemma2Config(**TINY, head_dim=24, sliding_window=16)
    if model_type == "gemma3_text":
        return tf.Gemma3TextConfig(**TINY, head_dim=24, sliding_window=16)
    if model_type == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=4, n_head=4, vocab_size=256, n_positions=128,
                             bos_token_id=0, eos_token_id=0)
    if model_type == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                num_attention_heads=4, vocab_size=256,
                                max_position_embeddings=128)
    raise ValueError(model_type)


def build_tiny(model_type: str, seed: int = 0):
    """A tiny random ``LM`` of ``model_type``; norm gains are randomised so they matter."""
    from transformers import AutoModelForCausalLM

    from saeflow.models import lm_from_model
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(model_type), attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or ".ln_" in name) and name.endswith("weight") and p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return lm_from_model(model, tokenizer=None, name=f"tiny-{model_type}")


@pytest.fixture(scope="session")
def tiny_lm():
    built = {}

    def make(model_type: str = "llama"):
        if model_type not in built:
            built[model_type] = build_tiny(model_type)
        return built[model_type]
    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_lm):
    return tiny_lm("llama")


@pytest.fixture
def ids():
    """A fixed batch of token ids [2, 12]."""
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
