"""A byte-level tokenizer built in-process, for randomly initialised models that have no files.

256 byte tokens plus pad/eos/bos: it needs no download and no training, covers any text, and is
the same on every machine.
"""
from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "</s>", "<s>")


@lru_cache(maxsize=1)
def _backend_json() -> str:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    # Map bytes to ByteLevel's printable alphabet, then split into single characters so that
    # every byte is one token.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), pre_tokenizers.Split("", "isolated")])
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_backend_json()),
        pad_token="<pad>", eos_token="</s>", bos_token="<s>")
