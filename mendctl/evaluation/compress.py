"""Prompt compression of the demonstrations to K tokens with the LLM itself (eval method `llmlingua`).

Perplexity pruning after LLMLingua (Jiang et al., EMNLP 2023), own implementation: its token-level
iterative compression, without its coarse demonstration-level step and budget controller. The context
ids are cut into segments of SEGMENT_TOKENS; each token of a segment is scored by its
self-information -log p(token | kept tokens of the earlier segments, earlier tokens of this segment)
under the LLM, and the segment keeps its most informative tokens, in their original order. Each
segment's quota is its share of the budget by length (cumulative rounding, so the quotas sum to
exactly K). Conditioning on the *kept* tokens rather than the full text is LLMLingua's iterative
step: a token made predictable by text already pruned away is informative again.

The very first token has nothing to be predicted from and counts as most informative (LLMLingua
keeps it too). Ties keep the earlier token, so the result is deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models.lm import FrozenLM
from . import flops

# LLMLingua's default `iterative_size`.
SEGMENT_TOKENS = 200
NOTE = "perplexity pruning after LLMLingua (Jiang et al. 2023), own implementation: token-level, segment-wise"


@dataclass
class Compressed:
    ids: list[int]  # the kept context ids, in their original order
    flops: float    # forward FLOPs the LLM spent scoring, once per demonstration set


def _long(ids: list[int], llm: FrozenLM) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=llm.device)


def _self_information(llm: FrozenLM, kept: list[int], segment: list[int], gated_mlp: bool) -> tuple[list[float], float]:
    """-log p of each segment token after the kept tokens, and the FLOPs of the forward that gave them."""
    # With nothing kept yet the segment's first token has no context: the LLM reads it as input
    # (encoder input for an encoder-decoder) and it scores +inf.
    x, y = (segment[:1], segment[1:]) if not kept else ([], segment)
    if not y:
        return [float("inf")] * len(x), 0.0
    out = llm.target_logits([llm.embed(_long(kept, llm))], [_long(x, llm)], [_long(y, llm)])
    info = -F.log_softmax(out.logits[out.is_y], -1).gather(1, out.targets[out.is_y].unsqueeze(1)).squeeze(1)
    cost = flops.llm_query_flops(llm.model.config, len(kept), len(x), [len(y)], llm.is_encoder_decoder, gated_mlp)
    return [float("inf")] * len(x) + info.tolist(), cost


@torch.no_grad()
def compress(llm: FrozenLM, ids: list[int], budget: int, gated_mlp: bool = True) -> Compressed:
    """The `budget` most informative of `ids` (all of them when there are no more), in order."""
    if len(ids) <= budget:
        return Compressed(list(ids), 0.0)
    kept: list[int] = []
    cost = 0.0
    # The kept tokens (at most `budget`) and a segment must fit the LLM's positions together.
    size = SEGMENT_TOKENS if llm.max_positions is None else max(1, min(SEGMENT_TOKENS, llm.max_positions - budget))
    for start in range(0, len(ids), size):
        segment = ids[start:start + size]
        quota = round(budget * (start + len(segment)) / len(ids)) - len(kept)
        if quota <= 0:
            continue
        scores, c = _self_information(llm, kept, segment, gated_mlp)
        cost += c
        # sorted() is stable: among equal scores the earlier token wins.
        best = sorted(range(len(segment)), key=lambda i: -scores[i])[:quota]
        kept += [segment[i] for i in sorted(best)]
    return Compressed(kept, cost)
