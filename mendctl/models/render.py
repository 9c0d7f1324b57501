"""Demonstrations and queries rendered to text and ids with an explicit template.

One rendered context string serves both the teacher (tokenised by the LLM's tokenizer) and the
distiller (tokenised by its own), so both always see the same demonstrations.
"""
from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from ..core.config import TemplateSpec


def _fill(pattern: str, **values: str) -> str:
    # str.replace rather than str.format: task text is full of braces.
    for key, value in values.items():
        pattern = pattern.replace("{" + key + "}", value)
    return pattern


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _clip_input(text: str, tokenizer: PreTrainedTokenizerBase, budget: int) -> str:
    ids = _ids(tokenizer, text)
    return text if len(ids) <= budget else tokenizer.decode(ids[:budget])


def render_context(template: TemplateSpec, demos: list[dict], tokenizer: PreTrainedTokenizerBase) -> str:
    """The demonstrations as one string, within the token budgets (oldest demonstrations dropped first)."""
    pieces = [_fill(template.input, input=_clip_input(d["input"], tokenizer, template.max_example_tokens))
              + _fill(template.output, output=d["output"]) for d in demos]
    while pieces:
        text = template.separator.join(pieces)
        if len(_ids(tokenizer, text)) <= template.max_context_tokens:
            return text
        pieces = pieces[1:]
    return ""


@dataclass
class Query:
    x: list[int]              # the query input, as the LLM reads it after the context (or nothing)
    options: list[list[int]]  # each option as a continuation


def context_ids(template: TemplateSpec, context: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Teacher-side ids of the context alone; the separator after it belongs to the query."""
    return _ids(tokenizer, context) if context else []


def render_query(template: TemplateSpec, text: str, options: list[str], tokenizer: PreTrainedTokenizerBase,
                 after_context: bool) -> Query:
    """The query's ids; `after_context` when demonstrations (or vectors standing in for them) precede it.

    The separator is tokenised with the query, as MetaICL does: tokenised apart, a BPE tokenizer
    would end the context with a lone space token and start the query with an unspaced word, a
    split the LLM never saw in training. Then context ids + query ids + option ids are the ids of
    the whole prompt string wherever the tokenizer splits words at spaces.
    """
    x = _fill(template.input, input=_clip_input(text, tokenizer, template.max_example_tokens))
    x = _ids(tokenizer, template.separator + x if after_context else x)
    return Query(x, [_ids(tokenizer, _fill(template.output, output=o)) or [tokenizer.eos_token_id] for o in options])
