"""NEFTune: per-segment noise scale alpha / sqrt(L * d) on packed rows, only in training."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from raysft.data.packing import collate_packed
from raysft.train.neftune import attach_neftune, neftune_scale

ALPHA = 5.0
DIM = 64


@pytest.fixture
def model(tiny_config):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(hidden_size=DIM))


def _packed_batch():
    # Row 0: segments of 10 and 30 tokens; row 1: 10 tokens + 30 padding.
    gen = torch.Generator().manual_seed(0)

    def sample(n):
        ids = torch.randint(3, 128, (n,), generator=gen).tolist()
        return ids, ids

    return collate_packed([[sample(10), sample(30)], [sample(10)]], pad_id=0)


def _noise(model, batch, hook) -> torch.Tensor:
    """Hooked embedding output minus the clean embedding."""
    emb = model.get_input_embeddings()
    if hook is not None:
        hook.set_lengths(batch["seg_lens"])
    with torch.no_grad():
        return emb(batch["input_ids"]) - emb.weight[batch["input_ids"]]


def test_neftune_scale_values():
    seg = torch.tensor([[10, 10, 30, 0]])
    scale = neftune_scale(seg, alpha=ALPHA, dim=DIM)
    assert scale.shape == (1, 4, 1)
    expected = [ALPHA / math.sqrt(10 * DIM)] * 2 + [ALPHA / math.sqrt(30 * DIM), 0.0]
    torch.testing.assert_close(scale[0, :, 0], torch.tensor(expected))


def test_noise_is_uniform_with_each_segments_own_scale(model):
    torch.manual_seed(1)
    batch = _packed_batch()
    hook = attach_neftune(model, alpha=ALPHA)
    model.train()
    noise = _noise(model, batch, hook)
    segments = {10: [noise[0, :10], noise[1, :10]], 30: [noise[0, 10:40]]}
    for length, parts in segments.items():
        values = torch.cat([p.flatten() for p in parts])
        scale = ALPHA / math.sqrt(length * DIM)
        assert values.abs().max() <= scale * (1 + 1e-6)
        assert values.abs().max() > 0.9 * scale
        # std of Uniform(-s, s) is s / sqrt(3); >= 1280 values: well within 10%.
        assert values.std().item() == pytest.approx(scale / math.sqrt(3), rel=0.1)
    assert torch.count_nonzero(noise[1, 10:]) == 0  # padding untouched


def test_no_noise_in_eval_mode_and_remove_restores(model):
    batch = _packed_batch()
    hook = attach_neftune(model, alpha=ALPHA)
    model.eval()
    assert torch.count_nonzero(_noise(model, batch, hook)) == 0
    model.train()
    assert torch.count_nonzero(_noise(model, batch, hook)) > 0
    hook.remove()
    assert torch.count_nonzero(_noise(model, batch, None)) == 0


@pytest.mark.parametrize("alpha", [None, 0, 0.0])
def test_off_when_alpha_is_zero_or_none(model, alpha):
    assert attach_neftune(model, alpha=alpha) is None
    model.train()
    assert torch.count_nonzero(_noise(model, _packed_batch(), None)) == 0


def test_missing_or_mismatched_lengths_raise(model):
    batch = _packed_batch()
    hook = attach_neftune(model, alpha=ALPHA)
    model.train()
    with pytest.raises(RuntimeError, match="set_lengths"):
        model.get_input_embeddings()(batch["input_ids"])
    hook.set_lengths(batch["seg_lens"][:, :5])
    with pytest.raises(RuntimeError, match="does not match"):
        model.get_input_embeddings()(batch["input_ids"])


def test_training_forward_with_noise_has_gradients(model):
    batch = _packed_batch()
    hook = attach_neftune(model, alpha=ALPHA)
    model.train()
    model.config.use_cache = False
    hook.set_lengths(batch["seg_lens"])
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    out.logits.float().pow(2).mean().backward()
    assert model.get_input_embeddings().weight.grad is not None
