"""Analytic forward cost of scoring a query and of distilling demonstrations, from a model config.

FLOPs count multiply-adds of matrix products as 2 FLOPs and ignore everything else (norms,
softmax, activations, biases, position encodings: a few percent at most). Sizes come from the
standard transformers config aliases (`num_hidden_layers`, `hidden_size`, `num_attention_heads`,
`head_dim`, `num_key_value_heads`, `vocab_size`, and `intermediate_size` / `d_ff` / `n_inner`).

With d = hidden size, d_attn = heads x head_dim, d_kv = kv_heads x head_dim (GQA) and
m = 3 for a gated MLP (Llama's SwiGLU, T5 v1.1's gated-gelu) else 2 (GPT-2); the backend
says which (`Backend.gated_mlp`) unless the config does (T5's `is_gated_act`), one layer holds

    P = 2 d d_attn (Q, O) + 2 d d_kv (K, V) + m d d_ff                  weights of its matrices

and a token passing through it, attending to `keys` positions, costs

    2 P  +  2 keys d_attn (Q K^T)  +  2 keys d_attn (A V)

A causal token at position i attends to i + 1 keys; an encoder token to every input position. The
LM head costs 2 d V at each position where it runs. Encoder-decoder decoder layers add cross
attention: Q and O per decoder token (4 d d_attn FLOPs), K and V over the encoder output once per
query (4 d d_attn per encoder token), and 4 enc_len d_attn for the scores.

Scoring a query (MetaICL, shared prefix), with c = prefix + query-input tokens and options o:
- decoder-only: c tokens through the layers once, the head at the last of them (it predicts every
  option's first token); then for each option its tokens but the last (the last predicts nothing)
  on top of the cached c, and the head at each of them.
- encoder-decoder: the encoder over c once; the decoder over each option (start token + all but its
  last token), the head at each decoder position.
This is the work the scoring needs; padding options to a common length in a batch is not counted.

Distillation runs the distiller body over the demonstration tokens + K placeholders, once per
demonstration set (the projector, 2 d_distiller d_llm per vector, is left out: it is tiny).
"""
from __future__ import annotations

from dataclasses import dataclass

@dataclass(frozen=True)
class Dims:
    layers: int          # encoder layers for an encoder-decoder model
    decoder_layers: int  # equal to `layers` for decoder-only models
    d: int
    heads: int
    d_attn: int          # heads x head_dim: width of queries, scores and attention output
    d_kv: int            # kv_heads x head_dim: width of keys and values (smaller under GQA)
    d_ff: int
    mlp_matrices: int
    vocab: int

    @classmethod
    def from_config(cls, config, gated_mlp: bool = True) -> "Dims":
        """`gated_mlp` comes from the backend (`Backend.gated_mlp`); a config's own `is_gated_act` wins."""
        d, heads = config.hidden_size, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        layers = config.num_hidden_layers
        return cls(layers=layers, decoder_layers=getattr(config, "num_decoder_layers", None) or layers, d=d,
                   heads=heads, d_attn=heads * head_dim, d_kv=kv_heads * head_dim, d_ff=_d_ff(config),
                   mlp_matrices=3 if getattr(config, "is_gated_act", gated_mlp) else 2, vocab=config.vocab_size)

    @property
    def layer_params(self) -> int:
        """Weights of one (self-attention) layer's matrices: what 2 FLOPs per token multiply."""
        return 2 * self.d * self.d_attn + 2 * self.d * self.d_kv + self.mlp_matrices * self.d * self.d_ff


def _d_ff(config) -> int:
    for name in ("intermediate_size", "d_ff", "n_inner"):
        value = getattr(config, name, None)
        if value:
            return value
    # GPT-2 leaves n_inner unset to mean 4 d.
    return 4 * config.hidden_size


def _attention(dims: Dims, keys: float) -> float:
    return 4 * keys * dims.d_attn  # Q K^T and A V


def causal_layers_flops(dims: Dims, new: int, past: int, layers: int | None = None) -> float:
    """`new` tokens through a causal stack on top of `past` cached ones (token i sees past + i + 1 keys)."""
    keys = new * past + new * (new + 1) / 2
    return (layers or dims.layers) * (2 * dims.layer_params * new + _attention(dims, keys))


def encoder_layers_flops(dims: Dims, tokens: int) -> float:
    """`tokens` through a bidirectional stack: every token sees every token."""
    return dims.layers * (2 * dims.layer_params * tokens + _attention(dims, tokens * tokens))


def decoder_layers_flops(dims: Dims, tokens: int, enc_len: int) -> float:
    """One target of `tokens` through an encoder-decoder's decoder: causal self- plus cross-attention.

    The cross-attention keys and values of the encoder output are not included (shared by all options).
    """
    cross = 2 * (2 * dims.d * dims.d_attn) * tokens + _attention(dims, tokens * enc_len)
    return causal_layers_flops(dims, tokens, 0, dims.decoder_layers) + dims.decoder_layers * cross


def head_flops(dims: Dims, positions: int) -> float:
    return 2 * dims.d * dims.vocab * positions


def llm_query_flops(config, prefix_len: int, x_len: int, option_lens: list[int], is_encoder_decoder: bool,
                    gated_mlp: bool = True) -> float:
    """Forward FLOPs of scoring one query's options after a prefix (see the module docstring)."""
    dims, c = Dims.from_config(config, gated_mlp), prefix_len + x_len
    if is_encoder_decoder:
        cross_kv = dims.decoder_layers * 2 * (2 * dims.d * dims.d_attn) * c
        options = sum(decoder_layers_flops(dims, m, c) + head_flops(dims, m) for m in option_lens)
        return encoder_layers_flops(dims, c) + cross_kv + options
    options = sum(causal_layers_flops(dims, m - 1, c) + head_flops(dims, m - 1) for m in option_lens)
    return causal_layers_flops(dims, c, 0) + head_flops(dims, 1) + options


def distill_flops(config, input_len: int, num_vectors: int, causal: bool = True, gated_mlp: bool = True) -> float:
    """Forward FLOPs of the distiller body over one demonstration set plus the K placeholders."""
    dims, tokens = Dims.from_config(config, gated_mlp), input_len + num_vectors
    return causal_layers_flops(dims, tokens, 0) if causal else encoder_layers_flops(dims, tokens)


def query_memory_bytes(config, prefix_len: int, x_len: int, option_lens: list[int], is_encoder_decoder: bool,
                       dtype_bytes: int, gated_mlp: bool = True) -> int:
    """Rough peak of what scoring one query holds beyond the weights, for devices without an allocator counter.

    keys/values: every layer's, for the c context tokens copied once per option (the batched option
                 pass reads the cache per option) plus the options' own; cross- and self-attention
                 for an encoder-decoder's decoder
    one layer's activations at a time: hidden state and MLP intermediates of the widest pass, and
                 its attention probabilities (heads x queries x keys)
    logits: float32 logits and log-probabilities over the vocabulary where the head runs
    """
    dims, c, n, longest = Dims.from_config(config, gated_mlp), prefix_len + x_len, len(option_lens), max(option_lens)
    if is_encoder_decoder:
        cache = dims.decoder_layers * 2 * dims.d_attn * n * (c + longest)
        head_positions = sum(option_lens)
    else:
        cache = dims.layers * 2 * dims.d_kv * n * (c + longest)
        head_positions = 1 + sum(m - 1 for m in option_lens)
    # (query rows, keys per row) of the context pass and of the batched option pass; a gated MLP
    # holds two d_ff-wide intermediates, an ungated one one.
    passes = [(c, c), (n * longest, c + longest)]
    activations = max(rows * (dims.d + (dims.mlp_matrices - 1) * dims.d_ff) + dims.heads * rows * keys
                      for rows, keys in passes)
    return int(dtype_bytes * (cache + activations) + 4 * 2 * dims.vocab * head_positions)
