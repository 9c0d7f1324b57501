"""A prefix's keys and values computed once, then generation after it for any batch of queries.

This is what a serving engine with prefix caching does for a prompt that always opens with the same
demonstrations: BOS + prefix run through the LLM once, and every later request reads their keys and
values instead of running them again. `mendctl serve` offers it as the strongest ICL baseline, beside
the distilled vectors (whose K positions are run with every request: they are few).

A decoder-only LLM attends causally, so the prefix's keys and values do not depend on what follows;
a batch reads them broadcast (`expand`, no copy): a DynamicLayer grows by concatenation into new
tensors and never writes into the prefix's.
"""
from __future__ import annotations

import torch

from .padding import pad


class PrefixKV:
    def __init__(self, engine, prefix: torch.Tensor):
        """`engine`: a TorchEngine of a decoder-only LLM; `prefix`: [P, d] embeddings (BOS is added
        here, as everywhere)."""
        from transformers.cache_utils import DynamicLayer

        llm = getattr(engine, "llm", None)
        if llm is None:
            raise ValueError("a cached prefix needs the in-process engine (TorchEngine)")
        if llm.is_encoder_decoder:
            raise ValueError("a cached prefix needs a decoder-only LLM (this one is encoder-decoder)")
        self.engine, self.llm = engine, llm
        with torch.no_grad():
            self.embeds = llm.with_bos(prefix.to(llm.device, llm.dtype))
            out = llm.model(inputs_embeds=self.embeds[None], use_cache=True)
        layers = out.cache.layers
        if not all(type(layer) is DynamicLayer for layer in layers):
            raise ValueError("a cached prefix needs an LLM whose cache layers are all dynamic (no sliding window)")
        self.kv = [(layer.keys, layer.values) for layer in layers]

    @property
    def positions(self) -> int:
        """Positions the cache holds: BOS + prefix."""
        return self.embeds.shape[0]

    @property
    def nbytes(self) -> int:
        """Memory the cached keys and values hold (what a server keeps per task for this baseline)."""
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)

    @torch.no_grad()
    def generate(self, xs: list[list[int]], **generate_kwargs) -> list[list[int]]:
        """Each query's generated ids after the cached prefix, up to end-of-sequence, as the engine's
        own generate returns them; `generate_kwargs` go to transformers' generate."""
        from transformers import DynamicCache

        llm, n = self.llm, len(xs)
        cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self.kv])
        # The queries left-padded after the prefix: generation starts at every row's last position; the
        # padding sits between prefix and query, masked, and positions count only what is attended.
        queries, mask = pad([llm.embed(torch.tensor(x, dtype=torch.long, device=llm.device)) for x in xs], left=True)
        embeds = torch.cat([self.embeds[None].expand(n, -1, -1), queries], dim=1)
        mask = torch.cat([mask.new_ones(n, self.positions), mask], dim=1)
        kwargs = {"max_new_tokens": 32, "do_sample": False, "pad_token_id": llm.pad_token_id, **generate_kwargs}
        out = llm.model.generate(inputs_embeds=embeds, attention_mask=mask, cache=cache, **kwargs)
        return [self.engine._new_ids(row) for row in out]
