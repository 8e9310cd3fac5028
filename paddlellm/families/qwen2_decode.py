"""Qwen2's decode runner: LLaMA's (families/llama_decode.py: KV cache written in place, prompts prefilled in chunks)
on Qwen2's layers, which are LLaMA's design (RMSNorm, rotary, grouped-query attention, SwiGLU); the q/k/v biases are
inside the model's own projections, which the runner calls as they are."""
from __future__ import annotations

from typing import Optional

from .llama_decode import LlamaDecoder, _inner, unsupported_layers


def unsupported(model) -> Optional[str]:
    """Why the runner can't reproduce this Qwen2 model's forward, or None when it can."""
    from paddlenlp.transformers import Qwen2ForCausalLM
    from paddlenlp.transformers.qwen2.modeling import Qwen2Attention, Qwen2RotaryEmbedding

    inner = _inner(model)
    if not isinstance(inner, Qwen2ForCausalLM):
        return f"not a Qwen2ForCausalLM ({type(inner).__name__})"
    if getattr(inner.config, "use_fused_linear_cross_entropy", False):
        return "use_fused_linear_cross_entropy"
    return unsupported_layers(inner, inner.qwen2, Qwen2Attention, Qwen2RotaryEmbedding)


class Qwen2Decoder(LlamaDecoder):
    BASE = "qwen2"

    @staticmethod
    def unsupported(model) -> Optional[str]:
        return unsupported(model)

    @staticmethod
    def _head_class():
        from paddlenlp.transformers.qwen2.modeling import Qwen2LMHead

        return Qwen2LMHead
