import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config,
                          T5ForConditionalGeneration)

from mendctl.evaluation.flops import (Dims, causal_layers_flops, distill_flops, encoder_layers_flops, head_flops,
                           llm_query_flops, query_memory_bytes)

GPT2 = GPT2Config()  # gpt2 small: 12 layers, d 768, ungated MLP of 4d
LLAMA_GQA = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, vocab_size=1000)
# flan-t5-small's shape: d_attn = 6 x 64 = 384 differs from d_model = 512, gated-gelu MLP.
T5_GATED = T5Config(d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8, num_decoder_layers=6,
                    feed_forward_proj="gated-gelu", vocab_size=1000)
T5_PLAIN = T5Config(d_model=256, d_kv=32, num_heads=8, d_ff=1024, num_layers=2, vocab_size=500)


def _gated(config) -> bool:
    # What the backends declare (Backend.gated_mlp): GPT-2's MLP is two matrices.
    return not isinstance(config, GPT2Config)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta(cls, config):
    with torch.device("meta"):
        return cls(config)


def test_dims_read_the_config_aliases():
    gpt2 = Dims.from_config(GPT2, gated_mlp=False)
    assert (gpt2.layers, gpt2.d, gpt2.d_attn, gpt2.d_kv, gpt2.d_ff, gpt2.mlp_matrices, gpt2.vocab) == (
        12, 768, 768, 768, 3072, 2, 50257)
    llama = Dims.from_config(LLAMA_GQA)
    assert (llama.d_attn, llama.d_kv, llama.d_ff, llama.mlp_matrices) == (512, 128, 1376, 3)
    t5 = Dims.from_config(T5_GATED)
    assert (t5.layers, t5.decoder_layers, t5.d, t5.d_attn, t5.d_ff, t5.mlp_matrices) == (8, 6, 512, 384, 1024, 3)
    assert Dims.from_config(T5_PLAIN).mlp_matrices == 2


@pytest.mark.parametrize("cls, config, stack", [
    (GPT2LMHeadModel, GPT2, lambda m: m.transformer.h),
    (LlamaForCausalLM, LLAMA_GQA, lambda m: m.model.layers),
    (T5ForConditionalGeneration, T5_GATED, lambda m: m.encoder.block),
    (T5ForConditionalGeneration, T5_PLAIN, lambda m: m.encoder.block),
], ids=["gpt2", "llama-gqa", "t5-gated", "t5"])
def test_matmul_term_matches_the_parameter_count(cls, config, stack):
    # 2 FLOPs per weight per token: the per-token matmul term is 2 x the layers' parameters, up to
    # the biases and norms the formula leaves out.
    layers = stack(_meta(cls, config))
    dims = Dims.from_config(config, gated_mlp=_gated(config))
    assert dims.layers * dims.layer_params == pytest.approx(_params(layers), rel=0.01)
    per_token = causal_layers_flops(dims, 1, 0) - 4 * dims.layers * dims.d_attn  # minus its one key's attention
    assert per_token == pytest.approx(2 * _params(layers), rel=0.01)


def test_t5_decoder_layers_add_cross_attention():
    model = _meta(T5ForConditionalGeneration, T5_GATED)
    dims = Dims.from_config(T5_GATED)
    expected = dims.decoder_layers * (dims.layer_params + 4 * dims.d * dims.d_attn)
    assert expected == pytest.approx(_params(model.decoder.block), rel=0.01)


def _eager(config):
    # SDPA's CPU path is invisible to the flop counter; eager attention is plain matmuls. Set before
    # building: submodules (T5's encoder) keep their own copy of the config.
    config = config.__class__(**config.to_dict())
    config._attn_implementation = "eager"
    return config


def _counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_causal_count_against_torch_flop_counter():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(_eager(config)).eval()
    length = 37
    measured = _counted(lambda: model(input_ids=torch.randint(0, 300, (1, length))))
    dims = Dims.from_config(config, gated_mlp=_gated(config))
    # Eager attention computes the full length x length scores and masks half of them; the formula
    # counts only the keys a causal token can see.
    masked = dims.layers * 2 * dims.d_attn * length * (length - 1)
    assert measured == causal_layers_flops(dims, length, 0) + head_flops(dims, length) + masked


def test_encoder_count_against_torch_flop_counter():
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(_eager(T5_PLAIN)).eval()
    length = 23
    measured = _counted(lambda: model.get_encoder()(input_ids=torch.randint(0, 500, (1, length))))
    assert measured == encoder_layers_flops(Dims.from_config(T5_PLAIN), length)


@pytest.mark.parametrize("config, enc_dec", [(GPT2, False), (LLAMA_GQA, False), (T5_GATED, True)],
                         ids=["gpt2", "llama", "t5"])
def test_icl_costs_more_than_mend_when_the_context_is_longer_than_k(config, enc_dec):
    k, context, x, options = 16, 300, 20, [1, 3, 2]
    icl = llm_query_flops(config, context, x, options, enc_dec, gated_mlp=_gated(config))
    mend = llm_query_flops(config, k, x, options, enc_dec, gated_mlp=_gated(config))
    zero = llm_query_flops(config, 0, x, options, enc_dec, gated_mlp=_gated(config))
    assert icl > mend > zero
    assert llm_query_flops(config, k, x, options, enc_dec, gated_mlp=_gated(config)) == mend  # a pure function of the lengths
    assert query_memory_bytes(config, context, x, options, enc_dec, 2, _gated(config)) > query_memory_bytes(config, k, x, options,
                                                                                          enc_dec, 2, _gated(config))


def test_decoder_only_query_structure():
    dims, c = Dims.from_config(GPT2, gated_mlp=False), 50
    # One-token options need no pass beyond the context: the head at its last position scores them all.
    assert llm_query_flops(GPT2, 40, 10, [1, 1, 1], False, gated_mlp=False) == causal_layers_flops(dims, c, 0) + head_flops(dims, 1)
    # A longer option adds its tokens but the last, on top of the cached context.
    extra = llm_query_flops(GPT2, 40, 10, [1, 4], False, gated_mlp=False) - llm_query_flops(GPT2, 40, 10, [1], False, gated_mlp=False)
    assert extra == causal_layers_flops(dims, 3, c) + head_flops(dims, 3)
    # Sharing the prefix: two options cost less than two separate queries.
    assert llm_query_flops(GPT2, 40, 10, [3, 3], False, gated_mlp=False) < 2 * llm_query_flops(GPT2, 40, 10, [3], False, gated_mlp=False)


def test_distill_flops():
    dims = Dims.from_config(GPT2, gated_mlp=False)
    assert distill_flops(GPT2, 200, 16, gated_mlp=False) == causal_layers_flops(dims, 216, 0)
    # Bidirectional attention sees every key: more attention FLOPs for the same tokens.
    assert distill_flops(T5_PLAIN, 200, 16, causal=False) > distill_flops(T5_PLAIN, 200, 16, causal=True)
    assert distill_flops(GPT2, 400, 16, gated_mlp=False) > distill_flops(GPT2, 200, 16, gated_mlp=False)
