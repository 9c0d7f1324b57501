"""The distiller: demonstrations in, K vectors in the LLM's embedding space out (method.md, "The parts")."""
from __future__ import annotations

import torch
from torch import nn

from ..core.config import ANCHORS
from .anchors import anchor_embeddings
from .padding import pad


class Distiller(nn.Module):
    """A trainable LM body, K learnable placeholders appended after the demonstrations, a projector.

    Inputs are LEFT-padded so that the placeholders always sit right after the last real
    demonstration token; with a causal body, position ids are counted over real tokens only, so a
    demonstration set gives the same vectors whatever it is batched with.

    Anchored (`anchor` other than "none"): the vectors are K of the frozen LLM's own input
    embeddings, chosen from the demonstrations by `mendctl.models.anchors` and passed to `forward`, plus a
    correction read from the placeholders' hidden states. The correction's last layer starts at
    zero, so an untrained anchored distiller gives exactly the anchors (for `last`, truncated ICL):
    training starts from a prefix the LLM can already read instead of from vectors far off its
    embedding scale. The anchors are inputs, never parameters: nothing of them is trained or saved.
    """

    def __init__(self, body: nn.Module, d_llm: int, num_vectors: int, *, placeholder_init: str = "random",
                 causal: bool = True, init_std: float = 0.02, anchor: str = "none",
                 read_anchors: bool = False, max_correction: float | None = None,
                 embedding_stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, not {anchor!r}")
        if anchor != "none" and embedding_stats is not None:
            raise ValueError("embedding_stats (scale_to_embeddings) is for the plain distiller; anchored vectors "
                             "already have the embeddings' scale")
        if read_anchors and anchor == "none":
            raise ValueError("read_anchors needs an anchor")
        if max_correction is not None and anchor == "none":
            raise ValueError("max_correction needs an anchor")
        self.max_correction = max_correction
        self.body = body
        self.causal = causal
        self.anchor = anchor
        self.anchor_in: nn.Linear | None = None
        embeddings = body.get_input_embeddings().weight
        d = embeddings.shape[1]
        if placeholder_init == "vocab":
            rows = torch.randint(0, embeddings.shape[0], (num_vectors,))
            init = embeddings.detach()[rows].clone().float()
        elif placeholder_init == "random":
            init = torch.randn(num_vectors, d) * init_std
        else:
            raise ValueError(f"placeholder_init must be 'random' or 'vocab', not {placeholder_init!r}")
        self.placeholders = nn.Parameter(init)
        # Inputs beyond the body's last position (GPT-2: 1024) minus the K placeholders are cut from
        # the left: the newest demonstrations are kept, as MetaICL does.
        from ..core.positions import max_positions

        limit = max_positions(body.config)
        if limit is not None and limit <= num_vectors:
            raise ValueError(f"num_vectors={num_vectors} leaves no room for demonstrations in the distiller's "
                             f"{limit} positions")
        self.max_input = limit - num_vectors if limit is not None else None
        if anchor != "none":
            # A differently named module than `projector`, so that weights trained one way refuse
            # to load into a distiller built the other way.
            last = nn.Linear(d, d_llm)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.correction = nn.Sequential(nn.LayerNorm(d), last)
            if read_anchors:
                # Otherwise slot i's correction cannot know which token it corrects (the placeholders are
                # the same for every set). Identity where the widths match: a body made of the LLM's own
                # layers then reads each anchor as the token it is, after the demonstrations.
                self.anchor_in = nn.Linear(d_llm, d)
                if d == d_llm:
                    with torch.no_grad():
                        self.anchor_in.weight.copy_(torch.eye(d))
                        self.anchor_in.bias.zero_()
        else:
            # Identity when sizes match: a projector there would only add parameters to train.
            self.projector = nn.Sequential(nn.Linear(d, d_llm), nn.Tanh()) if d != d_llm else nn.Identity()
            if embedding_stats is not None:
                # Hidden states of a deep layer are ~10x the norm of input embeddings; a LayerNorm
                # whose gain and bias start at the embeddings' per-dimension std and mean puts the
                # vectors where the LLM's input usually is.
                mean, std = embedding_stats
                norm = nn.LayerNorm(d_llm)
                with torch.no_grad():
                    norm.weight.copy_(std.float())
                    norm.bias.copy_(mean.float())
                self.projector = nn.Sequential(self.projector, norm)

    @property
    def num_vectors(self) -> int:
        return self.placeholders.shape[0]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                anchors: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] left-padded demonstration ids (and, anchored, [B, K, d_llm] anchors) -> [B, K, d_llm] vectors."""
        if (anchors is None) != (self.anchor == "none"):
            raise ValueError(f"distiller.anchor={self.anchor!r}: anchors must be given exactly when anchored")
        batch, k = input_ids.shape[0], self.num_vectors
        if self.max_input is not None and input_ids.shape[1] > self.max_input:
            input_ids, attention_mask = input_ids[:, -self.max_input:], attention_mask[:, -self.max_input:]
        embeds = self.body.get_input_embeddings()(input_ids)
        slots = self.placeholders.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        if self.anchor_in is not None:
            slots = slots + self.anchor_in(anchors.to(self.anchor_in.weight.dtype)).to(embeds.dtype)
        embeds = torch.cat([embeds, slots], dim=1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(batch, k)], dim=1)
        kwargs = {}
        if self.causal:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.body(inputs_embeds=embeds, attention_mask=mask, **kwargs).last_hidden_state
        # Placeholders and projector stay float32 whatever the body's dtype.
        hidden = hidden[:, -k:].to(self.placeholders.dtype)
        if anchors is None:
            return self.projector(hidden)
        anchors = anchors.to(hidden.dtype)
        return anchors + self._bounded(self.correction(hidden), anchors)

    def _bounded(self, correction: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """The correction, its norm squashed below max_correction x its anchor's norm (m tanh(n / m)).

        Trained unbounded, corrections grow to most of their anchor's norm, as far from the token as
        another token is, while the vectors move away from ICL on held-out tasks; a bound keeps each
        vector near the token it started from. Near zero it is the identity, so the start is unchanged;
        a zero anchor (an empty slot) gets no correction."""
        if self.max_correction is None:
            return correction
        bound = self.max_correction * anchors.norm(dim=-1, keepdim=True)
        x = correction.norm(dim=-1, keepdim=True) / bound.clamp_min(1e-12)
        # m tanh(n / m) / n = tanh(x) / x, whose limit at 0 is 1: so the zero correction still has a gradient
        return correction * torch.where(x > 1e-12, torch.tanh(x) / x.clamp_min(1e-12), torch.ones_like(x))


def _input_rows(texts: list[str], tokenizer, max_length: int) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False).input_ids[-max_length:] for t in texts]


def distiller_inputs(texts: list[str], tokenizer, max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Demonstrations as the distiller reads them, left-padded; the oldest tokens go first if too long."""
    rows = _input_rows(texts, tokenizer, max_length)
    ids, mask = pad([torch.tensor(r, dtype=torch.long) for r in rows], tokenizer.pad_token_id, left=True)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def distill(models, contexts: list[str], max_length: int, batch_size: int,
           anchors: list[list[int]] | None = None) -> list[torch.Tensor]:
    """[K, d_llm] vectors per context, in the LLM's dtype; batching does not change them (left padding).

    `anchors`: for an anchored distiller, each context's anchor ids (`set_anchors`)."""
    distiller, training = models.distiller, models.distiller.training
    distiller.eval()  # no dropout: the vectors of a set are always the same (the trainer's curves restore training)
    device, k = models.llm.device, distiller.num_vectors
    out = []
    for i in range(0, len(contexts), batch_size):
        ids, mask = distiller_inputs(contexts[i:i + batch_size], models.distiller_tokenizer, max_length, device)
        rows = None if anchors is None else anchor_embeddings(models.llm, anchors[i:i + batch_size], k)
        out += list(distiller(ids, mask, rows).to(models.llm.dtype))
    distiller.train(training)
    return out


def tokens_read(models, context: str, max_length: int) -> int:
    """How many tokens of `context` the distiller reads: what distiller_inputs keeps, then what its
    body's position limit leaves beside the K placeholders (for FLOPs counting)."""
    n = len(_input_rows([context], models.distiller_tokenizer, max_length)[0])
    return min(n, models.distiller.max_input or n)
