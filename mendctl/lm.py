"""The frozen LLM seen through one interface, for decoder-only and encoder-decoder models.

A query is (prefix, x, y): prefix is a sequence of embeddings (the K distilled vectors, the
embedded demonstrations, or nothing), x the query input ids, y the target ids. Decoder-only: the
model reads prefix + x + y and predicts x and y. Encoder-decoder: the encoder reads prefix + x, the
decoder predicts y. For a family trained with a BOS token, BOS comes first, before the prefix:
callers never add it (`with_bos` is the one place). The LM head runs only at the positions a loss
or a score uses, never over every demonstration token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TargetLogits:
    logits: torch.Tensor   # [N, V], one row per predicted target token, examples in order
    targets: torch.Tensor  # [N]
    is_y: torch.Tensor     # [N] bool: the token belongs to y (CE applies), else to x
    example: torch.Tensor  # [N] index of the example in the batch


def _pad_stack(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [L_i, d] rows into [B, L, d] plus a [B, L] mask."""
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return out, mask


def _cut_left(limit: int | None, *parts: torch.Tensor) -> list[torch.Tensor]:
    """`parts` (read in order) cut from the left to `limit` rows in all, the oldest first, as MetaICL does."""
    over = sum(p.shape[0] for p in parts) - limit if limit is not None else 0
    out = []
    for p in parts:
        drop = min(max(over, 0), p.shape[0])
        out.append(p[drop:])
        over -= drop
    return out


def _pad_ids(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(r.shape[0] for r in rows)
    out = torch.full((len(rows), length), pad, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = 1
    return out, mask


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
        from .positions import max_positions

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

    def option_losses(self, prefix: torch.Tensor, x: torch.Tensor, options: list[torch.Tensor]) -> torch.Tensor:
        """Mean per-token loss of each option given prefix + x; the prefix is computed once."""
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
        embeds, mask = _pad_stack(rows)
        hidden = self._base()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        example_t = torch.cat(example)
        selected = hidden[example_t, torch.cat(positions)]
        return TargetLogits(self.head(selected), torch.cat(targets), torch.cat(is_y), example_t)

    def option_losses(self, prefix, x, options):
        if self.max_positions is not None:
            # Room for the longest option (cut to leave one context position), then the newest context.
            options = [o[: self.max_positions - 1] for o in options]
            room = self.max_positions - max(o.shape[0] for o in options)
            prefix, x = _cut_left(room, prefix, x)
        ctx = torch.cat([self.with_bos(prefix), self.embed(x)]).unsqueeze(0)
        out = self._base()(inputs_embeds=ctx, use_cache=True)
        cache = out.cache
        first = F.log_softmax(self.head(out.last_hidden_state[:, -1]), -1)[0]
        n, c = len(options), ctx.shape[1]
        loss_sum = torch.stack([-first[o[0]] for o in options])
        lengths = torch.tensor([o.shape[0] for o in options], device=ctx.device)
        if int(lengths.max()) > 1:
            ids, mask = _pad_ids(options, self.pad_token_id)
            cache.batch_repeat_interleave(n)
            full_mask = torch.cat([mask.new_ones(n, c), mask], dim=1)
            pos = (c + torch.arange(ids.shape[1], device=ids.device)).unsqueeze(0).expand(n, -1)
            hidden = self._base()(inputs_embeds=self.embed(ids), attention_mask=full_mask, position_ids=pos,
                                  cache=cache).last_hidden_state
            # Token j >= 1 of option o is predicted from hidden[o, j-1]; only those rows reach the head.
            rows, cols = torch.nonzero(mask[:, 1:], as_tuple=True)
            logp = F.log_softmax(self.head(hidden[rows, cols]), -1)
            tok_loss = -logp.gather(1, ids[rows, cols + 1].unsqueeze(1)).squeeze(1)
            loss_sum = loss_sum.index_add(0, rows, tok_loss)
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
        embeds, mask = _pad_stack(rows)
        return self.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask

    def target_logits(self, prefixes, xs, ys) -> TargetLogits:
        enc, enc_mask = self._encode([torch.cat([self.with_bos(p), self.embed(x)]) for p, x in zip(prefixes, xs)])
        y_ids, y_mask = _pad_ids(ys, self.pad_token_id)
        hidden = self._decode(enc, enc_mask, y_ids, y_mask)
        rows, cols = torch.nonzero(y_mask, as_tuple=True)
        logits = self.head(hidden[rows, cols])
        return TargetLogits(logits, y_ids[rows, cols], torch.ones_like(rows, dtype=torch.bool), rows)

    def option_losses(self, prefix, x, options):
        enc, enc_mask = self._encode([torch.cat([self.with_bos(prefix), self.embed(x)])])
        n = len(options)
        y_ids, y_mask = _pad_ids(options, self.pad_token_id)
        hidden = self._decode(enc.expand(n, -1, -1), enc_mask.expand(n, -1), y_ids, y_mask)
        rows, cols = torch.nonzero(y_mask, as_tuple=True)
        logp = F.log_softmax(self.head(hidden[rows, cols]), -1)
        tok_loss = -logp.gather(1, y_ids[rows, cols].unsqueeze(1)).squeeze(1)
        return torch.zeros(n, device=tok_loss.device).index_add(0, rows, tok_loss) / y_mask.sum(1)
