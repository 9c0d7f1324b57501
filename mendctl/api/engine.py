"""The one seam between the Python API and the model that runs the queries.

Every call takes the prefix the LLM reads before a query as input embeddings [P, d] (the distilled
vectors, the embedded demonstrations, or nothing) and the query's token ids; BOS, when the family
uses one, is the engine's to add. `TorchEngine` runs the recipe's transformers model in this
process. Another engine (a vLLM server taking prompt embeddings, say) implements the same four
methods and `Mend` works unchanged on it.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..models.padding import pad
from ..models.render import Query


class Engine(Protocol):
    hidden_size: int

    def embed(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), d] input embeddings of the ids (the ICL prefix of demonstrations)."""

    def option_losses(self, prefix: torch.Tensor, queries: list[Query], where: list[str], pack: int,
                      advance: Callable[[], None]) -> list[list[float]]:
        """Each query's options' mean per-token loss after prefix + the query input, as eval scores them."""

    def continuation_logprobs(self, prefix: torch.Tensor, xs: list[list[int]], ys: list[list[int]],
                              ) -> list[tuple[float, bool]]:
        """Each y's summed log-probability after prefix + x, and whether greedy decoding would produce y."""

    def generate(self, prefix: torch.Tensor, xs: list[list[int]], **generate_kwargs) -> list[list[int]]:
        """The ids each x continues with after the prefix (only the new ones)."""


class TorchEngine:
    """The engine of one in-process transformers model (`FrozenLM`), on its device."""

    def __init__(self, llm, gated_mlp: bool = True):
        self.llm = llm
        self.gated_mlp = gated_mlp

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.llm.device)

    @torch.no_grad()
    def embed(self, ids: list[int]) -> torch.Tensor:
        return self.llm.embed(self._tensor(ids))

    @torch.no_grad()
    def option_losses(self, prefix, queries, where, pack, advance=lambda: None):
        # eval's own scoring (prefix cache, packed queries, left cuts) so that a prediction here is
        # the one eval makes for the same prefix and query.
        from ..evaluation.scoring import DemoSet, QuerySet, score

        if not queries:
            return []
        qs = QuerySet(DemoSet("", 0, [], ""), queries, queries, [[] for _ in queries], ["" for _ in queries], where)
        return score(self.llm, prefix.to(self.llm.device, self.llm.dtype), qs, self.gated_mlp, advance,
                     pack=pack).losses

    @torch.no_grad()
    def continuation_logprobs(self, prefix, xs, ys):
        llm = self.llm
        prefix = prefix.to(llm.device, llm.dtype)
        out = []
        for x, y in zip(xs, ys):
            got = llm.target_logits([prefix], [self._tensor(x)], [self._tensor(y)])
            logits, targets = got.logits[got.is_y], got.targets[got.is_y]
            logp = F.log_softmax(logits, -1).gather(1, targets.unsqueeze(1)).squeeze(1)
            out.append((float(logp.sum()), bool((logits.argmax(-1) == targets).all())))
        return out

    @torch.no_grad()
    def generate(self, prefix, xs, **generate_kwargs):
        from ..models.lm import _cut_left

        llm = self.llm
        prefix = prefix.to(llm.device, llm.dtype)
        kwargs = {"max_new_tokens": 32, "do_sample": False, "pad_token_id": llm.pad_token_id, **generate_kwargs}
        if llm.is_encoder_decoder:
            embeds, mask = pad([torch.cat([llm.with_bos(prefix), llm.embed(self._tensor(x))]) for x in xs])
            out = llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
            return [self._new_ids(row[1:]) for row in out]  # the decoder's start token opens every row
        rows = []
        for x in xs:
            p, x_ids = prefix, self._tensor(x)
            if llm.max_positions is not None:  # room for the new tokens, then the newest context
                p, x_ids = _cut_left(max(llm.max_positions - kwargs["max_new_tokens"], 1), p, x_ids)
            rows.append(torch.cat([llm.with_bos(p), llm.embed(x_ids)]))
        # Left padding: every row's last position is where its generation starts.
        embeds, mask = pad(rows, left=True)
        out = llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return [self._new_ids(row) for row in out]

    def _new_ids(self, row: torch.Tensor) -> list[int]:
        """Generated ids up to the end-of-sequence token (what follows it is padding)."""
        eos = self.llm.model.generation_config.eos_token_id
        stops = set(eos if isinstance(eos, list) else [eos]) - {None}
        ids = []
        for i in row.tolist():
            if i in stops:
                break
            ids.append(i)
        return ids
