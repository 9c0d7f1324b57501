"""T5 family: encoder-decoder LLM; the distiller is a (smaller) T5 encoder. Vectors are prepended
to the LLM's encoder input and options are scored as decoder targets."""
from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

from mendctl.models.backend import Backend as Base
from mendctl.models.lm import Seq2SeqLM


class T5LM(Seq2SeqLM):
    def head(self, hidden):
        # As T5ForConditionalGeneration.forward does: the original T5 rescales the decoder output, v1.1
        # (lm-adapt, flan-t5) does not. transformers 5 records which in `scale_decoder_outputs` and
        # always sets tie_word_embeddings=True, so that flag no longer tells them apart.
        config = self.model.config
        if getattr(config, "scale_decoder_outputs", config.tie_word_embeddings):
            hidden = hidden * config.d_model ** -0.5
        return super().head(hidden)


class Backend(Base):
    name = "t5"
    lm_class = T5LM
    llm_class = T5ForConditionalGeneration
    distiller_class = T5EncoderModel
    distiller_is_causal = False
    layers_attr = "block"
    lora_targets = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")  # wi_0/wi_1: gated (v1.1, lm-adapt) MLPs

    def llm_base(self, model):
        return model.get_encoder()

    def tiny_config(self, spec, tokenizer, *, encoder_only=False):
        return T5Config(vocab_size=len(tokenizer), d_model=spec.hidden, d_kv=spec.hidden // spec.heads,
                        d_ff=spec.hidden * 4, num_layers=spec.layers, num_decoder_layers=spec.layers,
                        num_heads=spec.heads, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        decoder_start_token_id=tokenizer.pad_token_id, is_encoder_decoder=not encoder_only,
                        # T5 scales its own 1/sqrt(d) init by this factor: 1.0 (its default) at init_std 0.2.
                        initializer_factor=spec.init_std * 5)
