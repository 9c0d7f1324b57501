"""The frozen LLM seen through one interface, for decoder-only and encoder-decoder models.

A query is (prefix, x, y): prefix is a sequence of embeddings (the K distilled vectors, the
embedded demonstrations, or nothing), x the query input ids, y the target ids. Decoder-only: the
model reads prefix + x + y and predicts x and y. Encoder-decoder: the encoder reads prefix + x, the
decoder predicts y. For a family trained with a BOS token, BOS comes first, before the prefix:
callers never add it (`with_bos` is the one place). The LM head runs only at the positions a loss
or a score uses, never over every demonstration token.

Scoring many queries after the same prefix (a query set after its demonstrations) can run BOS +
prefix once (`prefix_cache`) and the queries on top of it (`cached_option_losses`): the decoder-only
LLM attends causally, so the prefix's keys and values do not depend on what follows them. Several
queries and all their options then run packed into one sequence whose attention mask lets each
token see only the prefix and its own query (and option), as if each ran alone.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .padding import pad


@dataclass
class TargetLogits:
    logits: torch.Tensor   # [N, V], one row per predicted target token, examples in order
    targets: torch.Tensor  # [N]
    is_y: torch.Tensor     # [N] bool: the token belongs to y (CE applies), else to x
    example: torch.Tensor  # [N] index of the example in the batch


@dataclass
class PrefixCache:
    """BOS + one prefix run once through a decoder-only LLM, for every query that follows that prefix."""

    rows: int                  # prefix rows, BOS not counted: what the left cut weighs against max_positions
    positions: int             # positions the cache holds: BOS + prefix (0: nothing, the cache is empty)
    cache: object              # the transformers Cache after those positions; never written into (see _fork)
    last: torch.Tensor | None  # [d] hidden state at the last position: it predicts a query's first option
                               # token when the query input is empty


def _fork(cache):
    """A copy of `cache` that the query can grow without touching the original."""
    from transformers.cache_utils import DynamicLayer

    fork = copy.copy(cache)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        # A DynamicLayer grows by torch.cat and reassigns, never writing into its tensors: the fork
        # can share the prefix's keys and values, no copy per pack.
        fork.layers = [copy.copy(layer) for layer in cache.layers]
        return fork
    return copy.deepcopy(cache)  # other layer kinds (static, sliding) may write in place


def _cut_left(limit: int | None, *parts: torch.Tensor) -> list[torch.Tensor]:
    """`parts` (read in order) cut from the left to `limit` rows in all, the oldest first, as MetaICL does."""
    over = sum(p.shape[0] for p in parts) - limit if limit is not None else 0
    out = []
    for p in parts:
        drop = min(max(over, 0), p.shape[0])
        out.append(p[drop:])
        over -= drop
    return out


class FrozenLM(nn.Module):
    """Base: freezing, embedding, and the head applied to selected hidden states."""

    is_encoder_decoder = False

    def __init__(self, model: nn.Module, pad_token_id: int, bos_token_id: int | None = None):
        super().__init__()
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        # Learned absolute positions end somewhere (GPT-2: 1024); past it the oldest context is cut.
        from ..core.positions import max_positions

        limit = max_positions(model.config)
        # BOS always stays: the room left for prefix, query and target is what follows it.
        self.max_positions = None if limit is None else limit - self.bos_len

    @property
    def bos_len(self) -> int:
        """Positions the LLM reads before any prefix: 1 with BOS, else 0 (for cost counting)."""
        return int(self.bos_token_id is not None)

    def with_bos(self, prefix: torch.Tensor) -> torch.Tensor:
        """The prefix [P, d] as the LLM reads it: after the BOS embedding when the family uses one."""
        prefix = prefix.to(self.dtype)
        if self.bos_token_id is None:
            return prefix
        return torch.cat([self.embed(torch.tensor([self.bos_token_id], device=prefix.device)), prefix])

    def train(self, mode: bool = True) -> "FrozenLM":
        # The LLM stays in eval mode (no dropout) whatever its owner does.
        return self

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden).float()

    def target_logits(self, prefixes: list[torch.Tensor], xs: list[torch.Tensor], ys: list[torch.Tensor],
                      ) -> TargetLogits:
        raise NotImplementedError

    def shared_target_logits(self, prefix: torch.Tensor, xs: list[torch.Tensor], ys: list[torch.Tensor],
                             ) -> TargetLogits:
        """`target_logits` of several queries after one prefix (a training episode's demonstrations)."""
        return self.target_logits([prefix] * len(xs), xs, ys)

    def prefix_cache(self, prefix: torch.Tensor) -> PrefixCache | None:
        """BOS + `prefix` computed once for the queries that follow it, or None when nothing can be reused."""
        return None

    def fits(self, cached: PrefixCache, x: torch.Tensor, options: list[torch.Tensor]) -> bool:
        """Whether `cached_option_losses` can score this query after `cached` (else `option_losses` does)."""
        return False

    def cached_option_losses(self, cached: PrefixCache, queries: list[tuple[torch.Tensor, list[torch.Tensor]]],
                             ) -> list[torch.Tensor]:
        """`option_losses` of each query (x, options) after the cached prefix; each query must fit."""
        raise NotImplementedError

    def option_losses(self, prefix: torch.Tensor, x: torch.Tensor, options: list[torch.Tensor]) -> torch.Tensor:
        """Mean per-token loss of each option given prefix + x; prefix + x is computed once for all options."""
        raise NotImplementedError


class CausalLM(FrozenLM):
    def _base(self) -> nn.Module:
        return self.model.base_model

    def target_logits(self, prefixes, xs, ys) -> TargetLogits:
        rows, positions, targets, is_y, example = [], [], [], [], []
        for b, (p, x, y) in enumerate(zip(prefixes, xs, ys)):
            p, x, y = _cut_left(self.max_positions, p, x, y)
            p = self.with_bos(p)
            rows.append(torch.cat([p, self.embed(x), self.embed(y)]))
            tokens = torch.cat([x, y])
            # Token i of x+y sits at len(p)+i (BOS counted in p) and is predicted from the position
            # before it; with nothing before it the very first token has nothing to be predicted from.
            pos = torch.arange(tokens.shape[0], device=tokens.device) + p.shape[0] - 1
            keep = pos >= 0
            positions.append(pos[keep])
            targets.append(tokens[keep])
            is_y.append((torch.arange(tokens.shape[0], device=tokens.device) >= x.shape[0])[keep])
            example.append(torch.full((int(keep.sum()),), b, device=tokens.device))
        embeds, mask = pad(rows)
        hidden = self._base()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        example_t = torch.cat(example)
        selected = hidden[example_t, torch.cat(positions)]
        return TargetLogits(self.head(selected), torch.cat(targets), torch.cat(is_y), example_t)

    def shared_target_logits(self, prefix, xs, ys):
        cached = self.prefix_cache(prefix) if len(xs) > 1 else None
        tokens = [torch.cat([x, y]) for x, y in zip(xs, ys)]
        if (cached is None or cached.positions == 0 or self.max_positions is not None
                and cached.rows + max(t.shape[0] for t in tokens) > self.max_positions):
            return super().shared_target_logits(prefix, xs, ys)  # a query would cut the prefix: each its own cut
        device, shared = self.device, cached.positions
        new = torch.cat([torch.stack([torch.full_like(t, q), torch.full_like(t, -1),
                                      shared + torch.arange(t.shape[0], device=device)], dim=1)
                         for q, t in enumerate(tokens)])
        hidden, _ = self._packed(cached.cache, shared, torch.zeros(0, 3, dtype=torch.long, device=device),
                                 new, self.embed(torch.cat(tokens)))
        # Each query's first token is predicted from the prefix's last position, token i from token i - 1.
        rows, start = [], 0
        for t in tokens:
            rows += [cached.last[None], hidden[start: start + t.shape[0] - 1]]
            start += t.shape[0]
        is_y = torch.cat([torch.arange(t.shape[0], device=device) >= x.shape[0] for t, x in zip(tokens, xs)])
        example = torch.cat([torch.full((t.shape[0],), q, device=device) for q, t in enumerate(tokens)])
        return TargetLogits(self.head(torch.cat(rows)), torch.cat(tokens), is_y, example)

    def _packs(self) -> bool:
        """Whether packed queries score as if alone: the attention takes a custom 4D mask as given
        (sdpa, eager) and no sliding window would have masked what the custom mask lets through."""
        config = self.model.config
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        return (getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
                and not getattr(config, "sliding_window", None) and layer_types == {"full_attention"})

    def prefix_cache(self, prefix):
        if not self._packs():
            return None
        if self.max_positions is not None and prefix.shape[0] >= self.max_positions:
            return None  # every query would cut the prefix from the left: each reads its own cut
        from transformers import DynamicCache

        ctx = self.with_bos(prefix)
        if ctx.shape[0] == 0:  # no BOS, no prefix (GPT-2 zero-shot): the queries still pack together
            return PrefixCache(0, 0, DynamicCache(), None)
        out = self._base()(inputs_embeds=ctx.unsqueeze(0), use_cache=True)
        return PrefixCache(prefix.shape[0], ctx.shape[0], out.cache, out.last_hidden_state[0, -1])

    def fits(self, cached, x, options):
        if cached.positions + x.shape[0] == 0:
            return False  # nothing to predict the first option token from
        if self.max_positions is None:
            return True
        # Exactly when option_losses would cut nothing: then the cached prefix is what the query reads.
        longest = max(o.shape[0] for o in options)
        return longest < self.max_positions and cached.rows + x.shape[0] + longest <= self.max_positions

    def _packed(self, cache, shared: int, seen: torch.Tensor, new: torch.Tensor, embeds: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs `new` packed tokens on `cache`, which holds `shared` positions and then the `seen` tokens.

        A packed token is a row (query, option, position), option -1 for the query input. It sees the
        shared positions, its query's input and its own option up to its position: what it would see
        were its query and option run alone. Returns the new tokens' hidden states and all tokens seen.
        """
        keys = torch.cat([seen, new])
        q, o, p = (new[:, i, None] for i in range(3))
        see = (keys[:, 0] == q) & (keys[:, 2] <= p) & ((keys[:, 1] == -1) | (keys[:, 1] == o))
        see = torch.cat([see.new_ones(new.shape[0], shared), see], dim=1)
        # Additive, not boolean: eager attention adds the mask to its scores, sdpa takes either.
        mask = torch.zeros(see.shape, dtype=self.dtype, device=see.device)
        mask = mask.masked_fill(~see, torch.finfo(self.dtype).min)
        hidden = self._base()(inputs_embeds=embeds.unsqueeze(0), attention_mask=mask[None, None],
                              position_ids=new[:, 2].unsqueeze(0), cache=cache, use_cache=True).last_hidden_state[0]
        return hidden, keys

    def cached_option_losses(self, cached, queries):
        device, shared = self.device, cached.positions
        cache = _fork(cached.cache)
        xs = [x for x, _ in queries]
        seen, hidden = torch.zeros(0, 3, dtype=torch.long, device=device), None
        if sum(x.shape[0] for x in xs):
            new = torch.cat([torch.stack([torch.full_like(x, q), torch.full_like(x, -1),
                                          shared + torch.arange(x.shape[0], device=device)], dim=1)
                             for q, x in enumerate(xs)])
            hidden, seen = self._packed(cache, shared, seen, new, self.embed(torch.cat(xs)))
        ends = torch.tensor([x.shape[0] for x in xs]).cumsum(0) - 1
        last = torch.stack([hidden[int(ends[q])] if x.shape[0] else cached.last for q, x in enumerate(xs)])
        first = F.log_softmax(self.head(last), -1)
        # Options numbered across all queries: `owner` says whose each is.
        options = [o for _, opts in queries for o in opts]
        owner = [q for q, (_, opts) in enumerate(queries) for _ in opts]
        loss_sum = -first[torch.tensor(owner, device=device), torch.stack([o[0] for o in options])]
        # An option's last token predicts nothing, so a one-token option needs no pass at all and a
        # longer one only its others.
        longer = [(k, o) for k, o in enumerate(options) if o.shape[0] > 1]
        if longer:
            new = torch.cat([torch.stack([torch.full_like(o[1:], owner[k]), torch.full_like(o[1:], k),
                                          shared + xs[owner[k]].shape[0] + torch.arange(o.shape[0] - 1, device=device)],
                                         dim=1)
                             for k, o in longer])
            hidden, _ = self._packed(cache, shared, seen, new, self.embed(torch.cat([o[:-1] for _, o in longer])))
            logp = F.log_softmax(self.head(hidden), -1)
            targets = torch.cat([o[1:] for _, o in longer])
            tok_loss = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
            loss_sum = loss_sum.index_add(0, new[:, 1], tok_loss)
        losses = loss_sum / torch.tensor([o.shape[0] for o in options], device=device)
        return list(losses.split([len(opts) for _, opts in queries]))

    def option_losses(self, prefix, x, options):
        if self.max_positions is not None:
            # Room for the longest option (cut to leave one context position), then the newest context.
            options = [o[: self.max_positions - 1] for o in options]
            room = self.max_positions - max(o.shape[0] for o in options)
            prefix, x = _cut_left(room, prefix, x)
        ctx = torch.cat([self.with_bos(prefix), self.embed(x)]).unsqueeze(0)
        out = self._base()(inputs_embeds=ctx, use_cache=True)
        return self._options_after(out.cache, ctx.shape[1], out.last_hidden_state[:, -1], options)

    def _options_after(self, cache, c: int, last: torch.Tensor, options: list[torch.Tensor],
                       start: int | None = None) -> torch.Tensor:
        """The options' mean losses after a context of `c` positions: its keys and values in `cache`
        (consumed), `last` [1, d] the hidden state of its last position. `start`: the position the
        options begin at where it is not `c` (a cache that kept only some of a longer context's positions)."""
        first = F.log_softmax(self.head(last), -1)[0]
        loss_sum = torch.stack([-first[o[0]] for o in options])
        lengths = torch.tensor([o.shape[0] for o in options], device=last.device)
        # An option's last token predicts nothing, so a one-token option needs no pass at all and a
        # longer one only its others: single-token labels (most classification tasks) skip the
        # option pass, and with it copying the context's keys and values once per option.
        longer = [i for i, o in enumerate(options) if o.shape[0] > 1]
        if longer:
            ids, mask = pad([options[i][:-1] for i in longer], self.pad_token_id)
            nexts, _ = pad([options[i][1:] for i in longer], self.pad_token_id)
            n = len(longer)
            if n > 1:
                cache.batch_repeat_interleave(n)
            full_mask = torch.cat([mask.new_ones(n, c), mask], dim=1)
            first_pos = c if start is None else start
            pos = (first_pos + torch.arange(ids.shape[1], device=ids.device)).unsqueeze(0).expand(n, -1)
            hidden = self._base()(inputs_embeds=self.embed(ids), attention_mask=full_mask, position_ids=pos,
                                  cache=cache).last_hidden_state
            # Token j + 1 of an option is predicted from its hidden[j]; only those rows reach the head.
            rows, cols = torch.nonzero(mask, as_tuple=True)
            logp = F.log_softmax(self.head(hidden[rows, cols]), -1)
            tok_loss = -logp.gather(1, nexts[rows, cols].unsqueeze(1)).squeeze(1)
            loss_sum = loss_sum.index_add(0, torch.tensor(longer, device=rows.device)[rows], tok_loss)
        return loss_sum / lengths


class Seq2SeqLM(FrozenLM):
    is_encoder_decoder = True

    def _start_id(self) -> int:
        return self.model.config.decoder_start_token_id

    def _decode(self, enc_hidden, enc_mask, y_ids, y_mask) -> torch.Tensor:
        dec_in = torch.cat([torch.full_like(y_ids[:, :1], self._start_id()), y_ids[:, :-1]], dim=1)
        return self.model.get_decoder()(input_ids=dec_in, attention_mask=y_mask, encoder_hidden_states=enc_hidden,
                                        encoder_attention_mask=enc_mask).last_hidden_state

    def _encode(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = pad(rows)
        return self.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask

    def target_logits(self, prefixes, xs, ys) -> TargetLogits:
        enc, enc_mask = self._encode([torch.cat([self.with_bos(p), self.embed(x)]) for p, x in zip(prefixes, xs)])
        y_ids, y_mask = pad(ys, self.pad_token_id)
        hidden = self._decode(enc, enc_mask, y_ids, y_mask)
        rows, cols = torch.nonzero(y_mask, as_tuple=True)
        logits = self.head(hidden[rows, cols])
        return TargetLogits(logits, y_ids[rows, cols], torch.ones_like(rows, dtype=torch.bool), rows)

    def option_losses(self, prefix, x, options):
        # No prefix_cache: the encoder reads prefix + x bidirectionally, so the prefix's states depend on x.
        enc, enc_mask = self._encode([torch.cat([self.with_bos(prefix), self.embed(x)])])
        n = len(options)
        y_ids, y_mask = pad(options, self.pad_token_id)
        hidden = self._decode(enc.expand(n, -1, -1), enc_mask.expand(n, -1), y_ids, y_mask)
        rows, cols = torch.nonzero(y_mask, as_tuple=True)
        logp = F.log_softmax(self.head(hidden[rows, cols]), -1)
        tok_loss = -logp.gather(1, y_ids[rows, cols].unsqueeze(1)).squeeze(1)
        return torch.zeros(n, device=tok_loss.device).index_add(0, rows, tok_loss) / y_mask.sum(1)
