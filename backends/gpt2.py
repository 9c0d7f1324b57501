"""GPT-2 family: causal LLM and causal distiller (placeholders after the demonstrations)."""
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from mendctl.models.backend import Backend as Base
from mendctl.core.config import RANDOM_INIT_POSITIONS, TemplateSpec
from mendctl.models.lm import CausalLM


class Backend(Base):
    name = "gpt2"
    lm_class = CausalLM
    llm_class = GPT2LMHeadModel
    distiller_class = GPT2Model
    layers_attr = "h"
    gated_mlp = False
    lora_targets = ("c_attn", "c_proj", "c_fc")  # attention and MLP projections (Conv1D)
    # MetaICL's format for GPT-2: input, a space, output; demonstrations joined by a space.
    default_template = TemplateSpec(input="{input}", output=" {output}", separator=" ")

    def tiny_config(self, spec, tokenizer, *, encoder_only=False):
        return GPT2Config(vocab_size=len(tokenizer), n_positions=RANDOM_INIT_POSITIONS, n_embd=spec.hidden,
                          n_layer=spec.layers, n_head=spec.heads, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, initializer_range=spec.init_std)
