"""Perplexity over non-overlapping windows equals a direct transformers loss."""
import math

import pytest
import torch

from hbllm.eval.perplexity import perplexity, windows


@pytest.fixture
def stream():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 257, (1, 5 * 24 + 7), generator=g)


def test_windows_are_non_overlapping(stream):
    w = windows(stream, 24)
    assert w.shape == (5, 24)
    assert torch.equal(w.reshape(1, -1), stream[:, : 5 * 24])
    assert windows(stream, 24, max_windows=2).shape == (2, 24)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(stream[:, :10], 24)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_perplexity_equals_direct_transformers_loss(tiny_model, stream, batch_size):
    model, _ = tiny_model
    with torch.no_grad():
        losses = [model(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item()
                  for w in stream[0, : 4 * 24].view(4, 24)]
    direct = math.exp(sum(losses) / len(losses))
    got = perplexity(model, stream, 24, max_windows=4, batch_size=batch_size)
    assert got == pytest.approx(direct, rel=1e-5)
    assert perplexity(model, stream, 24) != pytest.approx(got, rel=1e-9)  # all 5 windows


def test_bos_prepended_to_every_window(tiny_model, stream):
    model, _ = tiny_model
    wins = stream[0, : 3 * 24].view(3, 24)
    with_bos = torch.cat([torch.full((3, 1), 256), wins], dim=1)
    with torch.no_grad():
        losses = [model(input_ids=w.unsqueeze(0), labels=w.unsqueeze(0)).loss.item()
                  for w in with_bos]
    got = perplexity(model, stream, 24, max_windows=3, batch_size=2, bos_id=256)
    assert got == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
