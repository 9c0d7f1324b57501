"""A query set's prefix runs once (FrozenLM.prefix_cache) and every query on top of its cache: the same
option losses as running prefix + query each time, a left cut where positions run out, and latency
that still carries the prefix."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mendctl import scoring
from mendctl.lm import CausalLM
from mendctl.render import Query
from mendctl.scoring import DemoSet, QuerySet, score

D = 32


def _llama(bos: int | None) -> CausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return CausalLM(LlamaForCausalLM(config), pad_token_id=0, bos_token_id=bos)


def _gpt2(positions: int = 256, bos: int | None = None) -> CausalLM:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=positions, n_embd=D, n_layer=2, n_head=4, bos_token_id=1,
                        eos_token_id=2)
    return CausalLM(GPT2LMHeadModel(config), pad_token_id=0, bos_token_id=bos)


MODELS = {"llama+bos": lambda: _llama(1), "llama": lambda: _llama(None),
          "gpt2": lambda: _gpt2(), "gpt2+bos": lambda: _gpt2(bos=1)}


def _queries(gen) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Queries of several input lengths, an empty one included, with options of 1 to 5 tokens."""
    out = []
    for x_len in (6, 1, 0, 9):
        x = torch.randint(3, 100, (x_len,), generator=gen)
        out.append((x, [torch.randint(3, 100, (n,), generator=gen) for n in (1, 4, 2, 5)]))
    return out


class _Reads:
    """Counts the positions the LLM body runs (query tokens, not keys attended to)."""

    def __init__(self, llm: CausalLM):
        self.positions = 0
        llm._base().register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, out):
        self.positions += kwargs["inputs_embeds"].shape[0] * kwargs["inputs_embeds"].shape[1]


@pytest.mark.parametrize("prefix_len", [0, 7, 40])
@pytest.mark.parametrize("name", MODELS)
def test_cached_prefix_gives_the_losses_of_a_full_forward(name, prefix_len):
    llm = MODELS[name]()
    gen = torch.Generator().manual_seed(prefix_len)
    prefix = torch.randn(prefix_len, D, generator=gen) * 0.5
    queries = [q for q in _queries(gen) if prefix_len + llm.bos_len + q[0].shape[0] > 0]
    with torch.no_grad():
        full = [llm.option_losses(prefix, x, options) for x, options in queries]
        cached = llm.prefix_cache(prefix)
        assert (cached is None) == (prefix_len + llm.bos_len == 0)  # nothing to cache without BOS or prefix
        # In sequence on one cache: a query that wrote into the shared prefix would spoil the next.
        reused = [llm.option_losses(prefix, x, options, cached) for x, options in queries]
    for a, b in zip(full, reused):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_the_prefix_is_not_run_again_per_query():
    llm = _llama(1)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randn(40, D, generator=gen)
    queries = _queries(gen)
    reads = _Reads(llm)
    with torch.no_grad():
        cached = llm.prefix_cache(prefix)
        assert reads.positions == 1 + 40
        for x, options in queries:
            llm.option_losses(prefix, x, options, cached)
    option_pass = 3 * 4  # the options of 4, 2 and 5 tokens but their last, padded to 4
    assert reads.positions == 1 + 40 + sum(x.shape[0] + option_pass for x, _ in queries)
    with torch.no_grad():
        llm.option_losses(prefix, queries[0][0], [torch.tensor([5]), torch.tensor([6])], cached)
    assert reads.positions == 1 + 40 + sum(x.shape[0] + option_pass for x, _ in queries) + queries[0][0].shape[0]


def test_a_query_past_the_last_position_is_cut_as_before():
    llm = _gpt2(positions=16)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randn(10, D, generator=gen)
    fits = (torch.arange(1, 4), [torch.tensor([5, 6, 7]), torch.tensor([8])])          # 10 + 3 + 3 = 16
    over = (torch.arange(1, 6), [torch.tensor([5, 6, 7]), torch.tensor([8])])          # 10 + 5 + 3 = 18
    long_option = (torch.arange(1, 2), [torch.arange(2, 22), torch.tensor([8])])       # an option of 20
    with torch.no_grad():
        cached = llm.prefix_cache(prefix)
        reads = _Reads(llm)
        reused = llm.option_losses(prefix, *fits, cached)
        assert reads.positions == 3 + 2  # the query, then the 3-token option but its last on the cache
        torch.testing.assert_close(reused, llm.option_losses(prefix, *fits))
        # Past 16 positions the query reads the newest 16 - 3 - 5 = 8 prefix rows, not the cached 10.
        torch.testing.assert_close(llm.option_losses(prefix, *over, cached), llm.option_losses(prefix[-8:], *over))
        torch.testing.assert_close(llm.option_losses(prefix, *long_option, cached),
                                   llm.option_losses(prefix, *long_option))
        # A prefix that alone fills the positions is cut for every query: nothing to cache.
        assert llm.prefix_cache(torch.randn(16, D, generator=gen)) is None
        assert llm.prefix_cache(torch.randn(15, D, generator=gen)) is not None


def _query_set(n: int) -> QuerySet:
    gen = torch.Generator().manual_seed(0)
    queries = [Query(torch.randint(3, 100, (5,), generator=gen).tolist(), [[7, 8], [9]]) for _ in range(n)]
    return QuerySet(DemoSet("t", 0, [], ""), queries, queries, [["a", "b"]] * n, ["a"] * n, ["f:1"] * n)


def test_score_with_and_without_reuse_agree():
    llm = _llama(1)
    qs = _query_set(5)
    prefix = torch.randn(30, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = score(llm, prefix, qs, gated_mlp=True, reuse_prefix=False)
        after = score(llm, prefix, qs, gated_mlp=True)
    torch.testing.assert_close(torch.tensor(after.losses), torch.tensor(before.losses), atol=1e-4, rtol=0)
    assert after.predictions == before.predictions
    assert after.flops == before.flops  # the prefix still counts in full per query
    assert before.prefix_seconds == 0 and after.prefix_seconds > 0


def test_latency_per_query_carries_an_even_share_of_the_prefix(monkeypatch):
    """A fake clock: the prefix takes 10 s, each query 1 s; 5 queries then take 3 s each."""
    llm = _llama(1)
    now = [0.0]
    monkeypatch.setattr(scoring.time, "perf_counter", lambda: now[0])
    prefix_cache, option_losses = llm.prefix_cache, llm.option_losses

    def slow_prefix(*args):
        now[0] += 10
        return prefix_cache(*args)

    def slow_query(*args):
        now[0] += 1
        return option_losses(*args)

    monkeypatch.setattr(llm, "prefix_cache", slow_prefix)
    monkeypatch.setattr(llm, "option_losses", slow_query)
    with torch.no_grad():
        run = score(llm, torch.randn(30, D), _query_set(5), gated_mlp=True)
    assert run.prefix_seconds == 10
    assert run.seconds == [3.0] * 5
