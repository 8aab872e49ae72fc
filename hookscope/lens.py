"""The logit lens: read the residual stream after every layer through the model's own readout.

>>> lens = hs.logit_lens(model, "When Mary and John went to the store, John gave a drink to")
>>> print(lens)                       # layer x position table of top tokens
>>> lens.prob(" Mary")                # [layer, batch, pos]: the token's probability per layer
>>> lens.plot()

Each row is ``model.unembed`` (the real final norm with the component's own statistics, the
unembedding and its bias, Gemma's soft-cap) of ``resid_pre.0``, ``resid_post.0`` ...
``resid_post.{L-1}``, so the last row is exactly the model's own prediction. Only the top
``k`` tokens per cell are kept; :meth:`LogitLens.logits` recomputes full logits on demand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hookscope.errors import InputError
from hookscope.inputs import call_arguments

__all__ = ["logit_lens", "LogitLens"]


@dataclass
class LogitLens:
    """Top tokens of every layer's readout. Tensors are [layer, batch, pos, ...]."""

    labels: list[str]  #: the stream each row reads: resid_pre.0, resid_post.0, ...
    top_ids: Tensor  #: [layer, batch, pos, k]
    top_probs: Tensor  #: [layer, batch, pos, k]
    resid: Tensor  #: [layer, batch, pos, d_model], the stream read (before the final norm)
    tokens: Tensor  #: [batch, pos] the input ids
    model: Any  #: the HookedModel (for decoding and recomputing logits)

    def logits(self, layer: int | None = None) -> Tensor:
        """Full lens logits, [layer, batch, pos, vocab] (or one layer's [batch, pos, vocab])."""
        with torch.no_grad():
            if layer is not None:
                return self.model.unembed(self.resid[layer])
            return torch.stack([self.model.unembed(r) for r in self.resid])

    def _ids(self, token: Any) -> Tensor:
        from hookscope.tokens import parse_tokens, resolve

        ids = resolve(parse_tokens(token, "token"), "token", self.model, "LogitLens")
        batch, vocab = self.top_ids.shape[1], self.model.W_U.shape[1]
        if ids.ndim == 1 and ids.shape[0] != batch:
            raise InputError(f"one token per row needs {batch} ids (the batch), got {ids.shape[0]}")
        if ids.numel() and int(ids.max()) >= vocab:
            raise InputError(f"token id {int(ids.max())} >= the {vocab} outputs of the readout")
        return ids

    def _batch(self, batch: Any) -> int:
        n = self.top_ids.shape[1]
        if isinstance(batch, bool) or not isinstance(batch, int) or not -n <= batch < n:
            raise InputError(f"batch must be an int in 0-{n - 1}, got {batch!r}")
        return batch

    def prob(self, token: Any) -> Tensor:
        """[layer, batch, pos]: the probability each layer's readout gives ``token`` (a text
        of one token, or an id; ids per row [batch] also work)."""
        return self._gather(token, probs=True)

    def rank(self, token: Any) -> Tensor:
        """[layer, batch, pos]: the rank of ``token`` in each readout (0 = top)."""
        return self._gather(token, probs=False)

    def _gather(self, token: Any, probs: bool) -> Tensor:
        ids = self._ids(token)
        out = []
        with torch.no_grad():
            for r in self.resid:
                logits = self.model.unembed(r).float()  # [batch, pos, vocab]
                idx = ids.to(logits.device).reshape(-1, 1, 1).expand(*logits.shape[:2], 1)
                chosen = logits.gather(-1, idx)
                if probs:
                    out.append((chosen - logits.logsumexp(-1, keepdim=True)).exp()[..., 0])
                else:
                    out.append((logits > chosen).sum(-1))
        return torch.stack(out)

    def str_tokens(self, batch: int = 0) -> list[str]:
        """The input tokens of row ``batch`` as strings (ids if the model has no tokenizer;
        ``CLS``, ``patch 0`` ... for a ViT)."""
        batch = self._batch(batch)
        if self.tokens is None or self.tokens.is_floating_point():  # images
            return ["CLS"] + [f"patch {i}" for i in range(self.resid.shape[2] - 1)]
        tok = self.model.tokenizer
        ids = self.tokens[batch].tolist()
        return [tok.decode([i]) for i in ids] if tok is not None else [str(i) for i in ids]

    def top_tokens(self, batch: int = 0) -> list[list[str]]:
        """[layer][pos]: the top token (a class id for a classifier head) of every cell of
        row ``batch``, as strings."""
        tok = self.model.tokenizer
        ids = self.top_ids[:, self._batch(batch), :, 0].tolist()
        return [[tok.decode([i]) if tok is not None else str(i) for i in row] for row in ids]

    def to_pandas(self):
        """One row per (layer, batch, pos, rank): the top-k tokens with their probabilities."""
        import pandas as pd

        tok = self.model.tokenizer
        rows = []
        n_layer, n_batch, n_pos, k = self.top_ids.shape
        for li in range(n_layer):
            for b in range(n_batch):
                for p in range(n_pos):
                    for r in range(k):
                        i = int(self.top_ids[li, b, p, r])
                        rows.append(
                            {
                                "layer": self.labels[li],
                                "batch": b,
                                "pos": p,
                                "rank": r,
                                "token_id": i,
                                "token": tok.decode([i]) if tok is not None else str(i),
                                "prob": float(self.top_probs[li, b, p, r]),
                            }
                        )
        return pd.DataFrame(rows)

    def plot(self, batch: int = 0, positions: slice | None = None):
        """A layer x position table of top tokens coloured by their probability (a Figure)."""
        from hookscope import plot

        if positions is not None and not isinstance(positions, slice):
            raise InputError(f"positions must be a slice (e.g. slice(-8, None)), got {positions!r}")
        batch = self._batch(batch)
        sel = positions if positions is not None else slice(None)
        top = [row[sel] for row in self.top_tokens(batch)]
        values = self.top_probs[:, batch, sel, 0].float().cpu().numpy()
        return plot.logit_lens(
            top,
            values,
            layer_labels=self.labels,
            position_labels=self.str_tokens(batch)[sel],
            title="logit lens: top token (colour: its probability)",
        )

    def __repr__(self) -> str:
        top = self.top_tokens(0)
        toks = self.str_tokens(0)  # one label per position (patches on a ViT)
        show = list(range(max(0, len(toks) - 8), len(toks)))  # the last 8 positions
        width = 12
        head = f"{'':<16}" + "".join(f"{toks[p]!r:>{width}.{width - 1}}" for p in show)
        lines = [
            f"LogitLens: {len(self.labels)} readouts x {len(toks)} positions, top-"
            f"{self.top_ids.shape[-1]} kept (batch 0, last {len(show)} positions)",
            head,
        ]
        for label, row in zip(self.labels, top, strict=True):
            lines.append(f"{label:<16}" + "".join(f"{row[p]!r:>{width}.{width - 1}}" for p in show))
        return "\n".join(lines)


def logit_lens(model: Any, inputs: Any, *, k: int = 5, **kwargs: Any) -> LogitLens:
    """Run ``inputs`` once and read the stream after every layer through the model's
    readout (see the module docstring). ``k``: top tokens kept per cell. Extra keywords go to
    the model's forward (e.g. ``attention_mask``)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k must be a positive int (top tokens kept per cell), got {k!r}")
    weights = model.weights  # a clear error on models without a readout
    vocab = weights.W_U.shape[1]
    k = min(k, vocab)
    args, _ = call_arguments(model, inputs, dict(kwargs))
    tokens = args[0]
    _, cache = model.run_with_cache(inputs, names=["resid_pre.0", "resid_post.*"], **kwargs)
    resid, labels = cache.accumulated_resid(return_labels=True)
    top_ids, top_probs = [], []
    with torch.no_grad():
        for r in resid:
            probs = model.unembed(r).float().softmax(-1)
            p, i = probs.topk(k, dim=-1)
            top_ids.append(i)
            top_probs.append(p)
    return LogitLens(labels, torch.stack(top_ids), torch.stack(top_probs), resid, tokens, model)
