"""Prompt rendering: context ids + query ids + option ids are the ids of the whole prompt string."""
import os

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from mendctl.core.config import TemplateSpec
from mendctl.models.render import context_ids, render_context, render_query
from mendctl.models.tokenizer import byte_tokenizer

DEMOS = [{"input": "the movie was great", "output": "positive"},
         {"input": "what a dull film", "output": "negative"},
         {"input": "I loved every minute", "output": "positive"}]
QUERY, OPTIONS = "the plot was dull", ["positive", "negative"]
TEMPLATES = {  # the gpt2 and llama backends' defaults, and one whose separator is not whitespace
    "gpt2": TemplateSpec(input="{input}", output=" {output}", separator=" "),
    "llama": TemplateSpec(input="{input}\n", output="{output}", separator="\n\n"),
    "bars": TemplateSpec(input="Q: {input}", output=" A: {output}", separator=" | "),
}


def gpt2_style_bpe() -> PreTrainedTokenizerFast:
    """A small byte-level BPE like GPT-2's (and SmolLM2's): words carry their leading space."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [d["input"] + " " + d["output"] for d in DEMOS] * 20 + [" " + QUERY, "Q: A: | positive negative"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


TOKENIZERS = {"bpe": gpt2_style_bpe, "bytes": byte_tokenizer}


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_icl_prompt_tokenizes_as_the_whole_string(template, tokenizer):
    t, tok = TEMPLATES[template], TOKENIZERS[tokenizer]()
    context = render_context(t, DEMOS, tok)
    query = render_query(t, QUERY, OPTIONS, tok, after_context=True)
    for option, option_ids in zip(OPTIONS, query.options):
        whole = context + t.separator + t.input.replace("{input}", QUERY) + t.output.replace("{output}", option)
        assert context_ids(t, context, tok) + query.x + option_ids == ids(tok, whole)


def test_query_after_context_starts_with_a_spaced_word_not_a_lone_space():
    t, tok = TEMPLATES["gpt2"], gpt2_style_bpe()
    x = render_query(t, QUERY, OPTIONS, tok, after_context=True).x
    first = tok.convert_ids_to_tokens(x[:1])[0]
    assert first.startswith("Ġ") and first != "Ġ"  # "Ġthe", the form a word takes after a space
    assert tok.convert_ids_to_tokens(context_ids(t, render_context(t, DEMOS, tok), tok))[-1] != "Ġ"


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_zero_shot_query_has_no_leading_separator(template, tokenizer):
    t, tok = TEMPLATES[template], TOKENIZERS[tokenizer]()
    alone = render_query(t, QUERY, OPTIONS, tok, after_context=False)
    assert alone.x == ids(tok, t.input.replace("{input}", QUERY))
    assert not tok.decode(alone.x).startswith(t.separator)
    assert tok.decode(render_query(t, QUERY, OPTIONS, tok, after_context=True).x).startswith(t.separator)
    assert context_ids(t, "", tok) == []


@pytest.mark.real_model
@pytest.mark.skipif(os.environ.get("MENDCTL_REAL") != "1", reason="needs the SmolLM2 weights and MENDCTL_REAL=1")
def test_smollm2_prompt_tokenizes_as_the_whole_string():
    from transformers import AutoTokenizer

    from mendctl.models.model_sources import resolve_source

    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m-instruct").path)
    t = TEMPLATES["llama"]
    context = render_context(t, DEMOS, tok)
    query = render_query(t, QUERY, OPTIONS, tok, after_context=True)
    whole = context + t.separator + t.input.replace("{input}", QUERY) + t.output.replace("{output}", OPTIONS[0])
    assert context_ids(t, context, tok) + query.x + query.options[0] == ids(tok, whole)
    # Its BOS is the one the model's config names.
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
