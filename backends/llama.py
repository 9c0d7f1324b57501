"""Llama architecture (Llama, SmolLM2, TinyLlama...): causal LLM; the distiller is a small model or
the LLM's own first N layers (`distiller.init_from_llm_layers`), sharing its tokenizer."""
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from mendctl.models.backend import Backend as Base
from mendctl.core.config import RANDOM_INIT_POSITIONS
from mendctl.models.lm import CausalLM


class Backend(Base):
    name = "llama"
    lm_class = CausalLM
    llm_class = LlamaForCausalLM
    distiller_class = LlamaModel
    layers_attr = "layers"
    add_bos = True
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def tiny_config(self, spec, tokenizer, *, encoder_only=False):
        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden, intermediate_size=spec.hidden * 3,
                           num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                           num_key_value_heads=spec.heads, max_position_embeddings=RANDOM_INIT_POSITIONS,
                           tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           initializer_range=spec.init_std)
