"""A query set's prefix runs once (FrozenLM.prefix_cache) and every query on top of its cache: the same
option losses as running prefix + query each time, a left cut where positions run out, and latency
that still carries the prefix."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mendctl.evaluation import scoring
from mendctl.models.lm import CausalLM
from mendctl.models.render import Query
from mendctl.evaluation.scoring import DemoSet, QuerySet, score

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


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("prefix_len", [0, 7, 40])
@pytest.mark.parametrize("name", MODELS)
def test_cached_prefix_gives_the_losses_of_a_full_forward(name, prefix_len, attention):
    llm = MODELS[name]()
    llm.model.config._attn_implementation = attention
    gen = torch.Generator().manual_seed(prefix_len)
    prefix = torch.randn(prefix_len, D, generator=gen) * 0.5
    queries = [q for q in _queries(gen) if prefix_len + llm.bos_len + q[0].shape[0] > 0]
    with torch.no_grad():
        full = [llm.option_losses(prefix, x, options) for x, options in queries]
        cached = llm.prefix_cache(prefix)
        assert all(llm.fits(cached, x, options) for x, options in queries)
        # One by one on one cache (a query that wrote into the shared prefix would spoil the next),
        # then all packed together (a token that saw another query's would spoil its losses).
        alone = [llm.cached_option_losses(cached, [(x, options)])[0] for x, options in queries]
        packed = llm.cached_option_losses(cached, queries)
        packed_again = llm.cached_option_losses(cached, queries[::-1])[::-1]
    for a, b, c, d in zip(full, alone, packed, packed_again):
        for other in (b, c, d):
            torch.testing.assert_close(other, a, atol=1e-4, rtol=0)


def test_the_prefix_is_not_run_again_per_query():
    llm = _llama(1)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randn(40, D, generator=gen)
    queries = _queries(gen)
    reads = _Reads(llm)
    with torch.no_grad():
        cached = llm.prefix_cache(prefix)
        assert reads.positions == 1 + 40
        llm.cached_option_losses(cached, queries)
    # The inputs, then the options of 4, 2 and 5 tokens but their last (one-token options need no pass).
    assert reads.positions == 1 + 40 + sum(x.shape[0] for x, _ in queries) + 4 * (3 + 1 + 4)
    with torch.no_grad():
        llm.cached_option_losses(cached, [(queries[0][0], [torch.tensor([5]), torch.tensor([6])])])
    assert reads.positions == 1 + 40 + sum(x.shape[0] for x, _ in queries) + 4 * 8 + queries[0][0].shape[0]


def test_attention_that_cannot_take_a_packed_mask_scores_each_query_in_full():
    llm = _llama(1)
    llm.model.config._attn_implementation = "flash_attention_2"
    assert llm.prefix_cache(torch.randn(5, D)) is None
    llm = _llama(1)
    llm.model.config.sliding_window = 4  # the packed mask would let through what the window hides
    assert llm.prefix_cache(torch.randn(5, D)) is None


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
        assert llm.fits(cached, *fits)
        reused = llm.cached_option_losses(cached, [fits])[0]
        assert reads.positions == 3 + 2  # the query, then the 3-token option but its last
        torch.testing.assert_close(reused, llm.option_losses(prefix, *fits))
        # Past 16 positions the query must read the newest 16 - 3 - 5 = 8 prefix rows, not the cached
        # 10: it does not fit, so scoring runs it in full, cut as before.
        assert not llm.fits(cached, *over) and not llm.fits(cached, *long_option)
        torch.testing.assert_close(llm.option_losses(prefix, *over), llm.option_losses(prefix[-8:], *over))
        # A prefix that alone fills the positions is cut for every query: nothing to cache.
        assert llm.prefix_cache(torch.randn(16, D, generator=gen)) is None
        assert llm.prefix_cache(torch.randn(15, D, generator=gen)) is not None


def _query_set(queries: list[Query]) -> QuerySet:
    n = len(queries)
    return QuerySet(DemoSet("t", 0, [], ""), queries, queries, [["a", "b"]] * n, ["a"] * n, ["f:1"] * n)


def _random_queries(n: int, x_len: int = 5) -> list[Query]:
    gen = torch.Generator().manual_seed(0)
    return [Query(torch.randint(3, 100, (x_len,), generator=gen).tolist(), [[7, 8], [9]]) for _ in range(n)]


@pytest.mark.parametrize("pack", [1, 3, 8])
def test_score_with_and_without_reuse_agree(pack):
    llm = _llama(1)
    qs = _query_set(_random_queries(7))
    prefix = torch.randn(30, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = score(llm, prefix, qs, gated_mlp=True, reuse_prefix=False)
        after = score(llm, prefix, qs, gated_mlp=True, pack=pack)
    torch.testing.assert_close(torch.tensor(after.losses), torch.tensor(before.losses), atol=1e-4, rtol=0)
    assert after.predictions == before.predictions
    assert after.flops == before.flops  # the prefix still counts in full per query
    assert before.prefix_seconds == 0 and after.prefix_seconds > 0


def test_a_query_that_needs_a_cut_is_scored_alone_in_order():
    llm = _gpt2(positions=16)
    gen = torch.Generator().manual_seed(0)
    lengths = [2, 9, 3, 1, 10, 2]  # 9 and 10: past 16 positions after the 6-row prefix and a 2-token option
    queries = [Query(torch.randint(3, 100, (n,), generator=gen).tolist(), [[7, 8], [9]]) for n in lengths]
    prefix = torch.randn(6, D, generator=gen)
    calls = []
    original = llm.option_losses
    llm.option_losses = lambda *args: calls.append(args[1].shape[0]) or original(*args)
    with torch.no_grad():
        run = score(llm, prefix, _query_set(queries), gated_mlp=False, pack=8)
        assert calls == [9, 10]
        expected = [original(prefix, torch.tensor(q.x), [torch.tensor(o) for o in q.options]) for q in queries]
    torch.testing.assert_close(torch.tensor(run.losses), torch.stack(expected), atol=1e-4, rtol=0)


def test_latency_per_query_is_its_packs_share_plus_the_prefixs(monkeypatch):
    """A fake clock: the prefix takes 10 s and each pack 2 s; 5 queries packed 3 and 2."""
    llm = _llama(1)
    now = [0.0]
    monkeypatch.setattr(scoring.time, "perf_counter", lambda: now[0])
    prefix_cache, cached_option_losses = llm.prefix_cache, llm.cached_option_losses

    def slow_prefix(*args):
        now[0] += 10
        return prefix_cache(*args)

    def slow_pack(*args):
        now[0] += 2
        return cached_option_losses(*args)

    monkeypatch.setattr(llm, "prefix_cache", slow_prefix)
    monkeypatch.setattr(llm, "cached_option_losses", slow_pack)
    with torch.no_grad():
        run = score(llm, torch.randn(30, D), _query_set(_random_queries(5)), gated_mlp=True, pack=3)
    assert run.prefix_seconds == 10
    assert run.seconds == pytest.approx([2 / 3 + 2] * 3 + [1 + 2] * 2)


@pytest.mark.parametrize("prefix_len", [0, 7, 40])
@pytest.mark.parametrize("name", MODELS)
def test_queries_after_one_shared_prefix_get_the_target_logits_of_each_run_alone(name, prefix_len):
    llm = MODELS[name]()
    gen = torch.Generator().manual_seed(prefix_len)
    prefix = torch.randn(prefix_len, D, generator=gen) * 0.5
    xs = [torch.randint(3, 100, (n,), generator=gen) for n in (6, 1, 9, 3)]
    ys = [torch.randint(3, 100, (n,), generator=gen) for n in (1, 4, 2, 1)]
    if prefix_len + llm.bos_len == 0:  # nothing before a query: its first token has nothing to be predicted from
        xs, ys = xs[1:], ys[1:]
    reads = _Reads(llm)
    with torch.no_grad():
        shared = llm.shared_target_logits(prefix, xs, ys)
        packed_reads, reads.positions = reads.positions, 0
        alone = llm.target_logits([prefix] * len(xs), xs, ys)
    for field in ("targets", "is_y", "example"):
        assert torch.equal(getattr(shared, field), getattr(alone, field)), field
    torch.testing.assert_close(shared.logits, alone.logits, atol=1e-4, rtol=0)
    if prefix_len + llm.bos_len:  # the prefix ran once, then every query token once
        assert packed_reads == llm.bos_len + prefix_len + sum(x.shape[0] + y.shape[0] for x, y in zip(xs, ys))


def test_a_shared_prefix_that_a_query_would_cut_is_cut_per_query_as_before():
    llm = _gpt2(positions=16)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randn(10, D, generator=gen)
    xs, ys = [torch.arange(3, 6), torch.arange(3, 10)], [torch.tensor([5]), torch.tensor([7, 8])]  # 10 + 9 > 16
    with torch.no_grad():
        shared = llm.shared_target_logits(prefix, xs, ys)
        alone = llm.target_logits([prefix] * 2, xs, ys)
    torch.testing.assert_close(shared.logits, alone.logits)


def test_options_scored_after_a_cache_at_shifted_positions_take_their_start_from_the_caller():
    # Rotary positions are relative: a context run at positions s.. scores its options as at 0.., provided
    # the options continue from where the context and query really sit (start), not from the cache's length.
    torch.manual_seed(0)
    # weights large enough that attention depends on position at all (the default init attends nearly uniformly)
    config = LlamaConfig(vocab_size=100, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.5)
    lm, gen = CausalLM(LlamaForCausalLM(config), pad_token_id=0), torch.Generator().manual_seed(0)
    prefix, x = torch.randn(7, D, generator=gen), torch.randint(3, 100, (3,), generator=gen)
    options = [torch.randint(3, 100, (n,), generator=gen) for n in (1, 4, 2)]
    c, s = prefix.shape[0], 40
    with torch.no_grad():
        want = lm.option_losses(prefix, x, options)

        def shifted(start):
            base = lm._base()
            cache = base(inputs_embeds=prefix[None], position_ids=(s + torch.arange(c))[None], use_cache=True).cache
            out = base(inputs_embeds=lm.embed(x)[None], attention_mask=torch.ones(1, c + len(x), dtype=torch.long),
                       position_ids=(s + c + torch.arange(len(x)))[None], cache=cache, use_cache=True)
            return lm._options_after(out.cache, c + len(x), out.last_hidden_state[:, -1], options, start=start)

        torch.testing.assert_close(shifted(s + c + len(x)), want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(shifted(None), want, rtol=1e-4, atol=1e-4)
