"""Perplexity on non-overlapping windows (GPTQ protocol): the token stream (1, ntokens) is cut
into ``ntokens // seqlen`` windows of ``seqlen`` tokens; ppl = exp(mean next-token NLL)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(nwindows, seqlen) non-overlapping windows of a (1, ntokens) stream (tail dropped)."""
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens are fewer than one window of {seqlen}")
    return tokens.reshape(-1)[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int,
               max_windows: int | None = None, batch_size: int = 1,
               device: torch.device | None = None, desc: str = "ppl",
               bos_id: int | None = None) -> float:
    """Perplexity of ``model`` (already on ``device``) over the windows of ``tokens`` (1, ntokens),
    using the plain batched ``model(input_ids)`` forward; every window has the same size, so
    this equals exp of the mean of the per-window losses. ``bos_id``: prepend this token to
    every window (then all ``seqlen`` tokens of a window are predicted, not ``seqlen - 1``)."""
    device = device or next(model.parameters()).device
    wins = windows(tokens, seqlen, max_windows)
    if bos_id is not None:
        wins = torch.cat([torch.full_like(wins[:, :1], bos_id), wins], dim=1)
    nll, count = 0.0, 0
    for batch in tqdm(wins.split(batch_size), desc=desc, unit="batch", leave=False):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                               reduction="sum")
        nll += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
