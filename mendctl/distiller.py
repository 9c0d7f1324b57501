"""The distiller: demonstrations in, K vectors in the LLM's embedding space out (method.md, "The parts")."""
from __future__ import annotations

import torch
from torch import nn

ANCHORS = ("none", "last", "labels")


class Distiller(nn.Module):
    """A trainable LM body, K learnable placeholders appended after the demonstrations, a projector.

    Inputs are LEFT-padded so that the placeholders always sit right after the last real
    demonstration token; with a causal body, position ids are counted over real tokens only, so a
    demonstration set gives the same vectors whatever it is batched with.

    Anchored (`anchor` other than "none"): the vectors are K of the frozen LLM's own input
    embeddings, chosen from the demonstrations by `mendctl.anchors` and passed to `forward`, plus a
    correction read from the placeholders' hidden states. The correction's last layer starts at
    zero, so an untrained anchored distiller gives exactly the anchors (for `last`, truncated ICL):
    training starts from a prefix the LLM can already read instead of from vectors far off its
    embedding scale. The anchors are inputs, never parameters: nothing of them is trained or saved.
    """

    def __init__(self, body: nn.Module, d_llm: int, num_vectors: int, *, placeholder_init: str = "random",
                 causal: bool = True, init_std: float = 0.02, anchor: str = "none",
                 embedding_stats: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, not {anchor!r}")
        if anchor != "none" and embedding_stats is not None:
            raise ValueError("embedding_stats (scale_to_embeddings) is for the plain distiller; anchored vectors "
                             "already have the embeddings' scale")
        self.body = body
        self.causal = causal
        self.anchor = anchor
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
        if anchor != "none":
            # A differently named module than `projector`, so that weights trained one way refuse
            # to load into a distiller built the other way.
            last = nn.Linear(d, d_llm)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.correction = nn.Sequential(nn.LayerNorm(d), last)
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
        embeds = self.body.get_input_embeddings()(input_ids)
        slots = self.placeholders.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
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
        return anchors.to(hidden.dtype) + self.correction(hidden)
