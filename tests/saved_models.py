"""Tiny gpt2 and t5 models saved with save_pretrained, laid out as their hub repositories are, with
real tokenizers trained here: what `llm.source` / `distiller.source` load by path through the same
code as a hub id."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, T5Config, T5ForConditionalGeneration,
                          T5Tokenizer)

ROOT = Path(__file__).resolve().parents[1]
GPT2_POSITIONS = 1024  # GPT-2's learned positions: every gpt2 checkpoint on the hub has this many
EOT = "<|endoftext|>"
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 in every T5 vocabulary
T5_SENTINELS = 100


def corpus() -> list[str]:
    """The tiny recipes' text and task files: what the tokenizers are trained on."""
    files = sorted((ROOT / "data" / "tiny").rglob("*.txt")) + sorted((ROOT / "data" / "tiny").rglob("*.jsonl"))
    return [f.read_text(encoding="utf-8") for f in files]


def gpt2_tokenizer(vocab_size: int = 600) -> GPT2Tokenizer:
    """Byte-level BPE as GPT-2's: `<|endoftext|>` is bos, eos and unk, and there is no pad token."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GPT2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=EOT, bos_token=EOT, eos_token=EOT)


def t5_tokenizer(vocab_size: int = 500) -> T5Tokenizer:
    """SentencePiece-style Unigram as T5's: pad 0, eos 1, unk 2, then the pieces, then 100 sentinels."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    unigram.train_from_iterator(corpus(), trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=T5_SPECIALS, unk_token="<unk>", show_progress=False))
    vocab = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    assert [p for p, _ in vocab[:3]] == T5_SPECIALS
    return T5Tokenizer(vocab=vocab, extra_ids=T5_SENTINELS)


def save_gpt2(folder: Path, layers: int, hidden: int, heads: int, seed: int) -> Path:
    """A GPT2LMHeadModel, as the hub's gpt2 and gpt2-large repositories hold (the distiller reads it as GPT2Model)."""
    tok = gpt2_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=GPT2_POSITIONS, n_embd=hidden, n_layer=layers, n_head=heads,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_t5(folder: Path, layers: int, hidden: int, heads: int, seed: int) -> Path:
    """A T5ForConditionalGeneration configured as the lm-adapt (v1.1) checkpoints: gated-GELU MLPs, untied
    head, an embedding table padded past the tokenizer's size (the distiller reads it as T5EncoderModel)."""
    tok = t5_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(vocab_size=(len(tok) + 127) // 128 * 128, d_model=hidden, d_kv=hidden // heads,
                      d_ff=hidden * 2, num_layers=layers, num_decoder_layers=layers, num_heads=heads,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id, initializer_factor=1.0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


SAVERS = {"gpt2": save_gpt2, "t5": save_t5}
