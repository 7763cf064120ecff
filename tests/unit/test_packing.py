"""Bin packing, collation, the loss, and packed == unpacked equivalence on a real tiny Llama."""

from __future__ import annotations

import random
import time

import pytest
import torch

from raysft.data.batching import BatchStream, batches
from raysft.data.packing import (
    IGNORE_INDEX,
    by_length,
    causal_lm_loss,
    collate_packed,
    collate_padded,
    pack,
    packing_efficiency,
)
from raysft.data.tokens import Example

# ---------------------------------------------------------------- pack


def _check_bins(lengths: list[int], bins: list[list[int]], max_len: int) -> None:
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(b for b in bins)
    assert all(sum(lengths[i] for i in b) <= max_len for b in bins)


@pytest.mark.parametrize(
    ("lengths", "max_len", "optimal"),
    [
        ([5, 5, 5, 5], 10, 2),
        ([7, 3, 6, 4, 5, 5], 10, 3),
        ([9, 8, 2, 2, 1], 10, 3),
        ([10, 10, 10], 10, 3),
        ([1] * 25, 10, 3),
        ([4, 8, 1, 4, 2, 1], 10, 2),
        ([6, 6, 6, 4, 4, 4], 10, 3),
    ],
)
def test_pack_known_cases_are_optimal(lengths, max_len, optimal):
    bins = pack(lengths, max_len=max_len)
    _check_bins(lengths, bins, max_len)
    assert len(bins) == optimal


def test_pack_exact_best_fit_decreasing_assignment():
    # 7 -> bin0 (room 3), 6 -> bin1 (4), 5 -> bin2 (5), 5 -> bin2 (0), 4 -> bin1 (0), 3 -> bin0.
    assert pack([7, 3, 6, 4, 5, 5], max_len=10) == [[0, 1], [2, 3], [4, 5]]


def test_pack_best_fit_prefers_tightest_bin_and_ties_by_index():
    # After 6 -> bin0 (room 4) and 5 -> bin1 (room 5), the 4 must go to bin0 (tightest fit).
    assert pack([6, 5, 4], max_len=10) == [[0, 2], [1]]
    # Equal lengths: lower index first; equal rooms: older bin first.
    assert pack([3, 3, 3, 3], max_len=6) == [[0, 1], [2, 3]]


def test_pack_random_invariants_and_determinism():
    rng = random.Random(0)
    for _ in range(50):
        max_len = rng.randint(1, 64)
        lengths = [rng.randint(1, max_len) for _ in range(rng.randint(0, 80))]
        bins = pack(lengths, max_len=max_len)
        _check_bins(lengths, bins, max_len)
        # Any-fit rule: no two bins are both at most half full, so bins < 2 * volume + 1.
        assert len(bins) < 2 * sum(lengths) / max_len + 1
        assert sum(sum(lengths[i] for i in b) * 2 <= max_len for b in bins) <= 1
        assert pack(list(lengths), max_len=max_len) == bins


def test_pack_is_fast_on_many_samples():
    rng = random.Random(1)
    lengths = [rng.randint(1, 512) for _ in range(100_000)]
    start = time.perf_counter()
    bins = pack(lengths, max_len=512)
    assert time.perf_counter() - start < 5.0
    assert packing_efficiency(lengths, bins, max_len=512) > 0.95


@pytest.mark.parametrize("bad", [[11], [0], [3, -1]])
def test_pack_rejects_lengths_outside_capacity(bad):
    with pytest.raises(ValueError, match="1..10"):
        pack(bad, max_len=10)


def test_packing_efficiency():
    lengths = [7, 3, 6, 2]
    bins = [[0, 1], [2, 3]]
    assert packing_efficiency(lengths, bins, max_len=10) == pytest.approx(18 / 20)
    assert packing_efficiency(lengths, [[0], [1], [2], [3]], max_len=10) == pytest.approx(18 / 40)
    assert packing_efficiency([], [], max_len=10) == 0.0


# ---------------------------------------------------------------- collation


def test_collate_packed_positions_segments_and_padding():
    rows = [
        [([1, 2, 3], [-100, 2, 3]), ([4, 5], [4, 5])],
        [([6], [6])],
    ]
    batch = collate_packed(rows, pad_id=0)
    assert "attention_mask" not in batch
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in batch.values())
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, 4, 5], [6, -100, -100, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert batch["seg_lens"].tolist() == [[3, 3, 3, 2, 2], [1, 0, 0, 0, 0]]


def test_collate_packed_pads_to_a_given_width():
    batch = collate_packed([[([1, 2], [1, 2])], [([3], [3])]], pad_id=0, width=4)
    assert batch["input_ids"].tolist() == [[1, 2, 0, 0], [3, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 0, 1, 2]]
    assert batch["seg_lens"].tolist() == [[2, 2, 0, 0], [1, 0, 0, 0]]
    with pytest.raises(ValueError, match="3 tokens is over the width 2"):
        collate_packed([[([1, 2, 3], [1, 2, 3])]], pad_id=0, width=2)


def test_fixed_width_stream_has_one_shape_and_skips_partial_batches():
    # 7 one-sample rows, batches of 3: [3, 3, 1] per epoch; fixed width keeps the two full ones.
    examples = [Example([1] * (i + 1), [1] * (i + 1), truncated=False) for i in range(7)]
    bins = [[i] for i in range(7)]
    fixed = BatchStream(examples, bins, packing=True, batch_size=3, pad_id=0, seed=0,
                        fixed_width=16)  # fmt: skip
    free = BatchStream(examples, bins, packing=True, batch_size=3, pad_id=0, seed=0)
    seen: set[int] = set()
    for epoch in range(4):
        for _ in range(2):
            batch = next(fixed)
            assert batch["input_ids"].shape == (3, 16)
            seen.update(int(n) for n in batch["seg_lens"][:, 0])
        assert fixed.epoch == epoch
        widths = [next(free)["input_ids"].shape for _ in range(3)]
        assert widths[-1][0] == 1  # without it, the epoch's last batch is partial
    assert seen == set(range(1, 8))  # a row skipped in one epoch comes up in another
    # An epoch of one partial batch keeps it: it is the only shape there is.
    alone = BatchStream(examples[:2], bins[:2], packing=True, batch_size=3, pad_id=0, seed=0,
                        fixed_width=16)  # fmt: skip
    assert next(alone)["input_ids"].shape == (2, 16) and next(alone)["input_ids"].shape == (2, 16)
    with pytest.raises(ValueError, match="unpacked rows keep their own width"):
        BatchStream(examples, bins, packing=False, batch_size=3, pad_id=0, seed=0, fixed_width=16)


def test_collate_packed_rejects_mismatched_sample():
    with pytest.raises(ValueError, match="differ"):
        collate_packed([[([1, 2], [1])]], pad_id=0)


def test_collate_padded():
    batch = collate_padded([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert batch["seg_lens"].tolist() == [[3, 3, 3], [1, 0, 0]]


def test_collate_padded_causal_has_no_mask_and_positions_that_never_restart():
    batch = collate_padded([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=9, causal=True)
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch["seg_lens"].tolist() == [[3, 3, 3], [1, 0, 0]]


def test_by_length_batches_by_hand():
    # sorted: idx 1 (1), 3 (2), 2 (3), 0 (5), 4 (8); a batch is rows x its longest <= 6 tokens
    assert by_length([5, 1, 3, 2, 8], tokens=6) == [[1, 3], [2], [0], [4]]
    assert by_length([2, 2, 2, 2], tokens=6) == [[0, 1, 2], [3]]
    assert by_length([], tokens=6) == []


def _examples(lengths: list[int]) -> list[Example]:
    """Example i has ``lengths[i]`` tokens, all of id i + 1 (so a row's first id names it)."""
    return [Example([i + 1] * n, [1] * n, truncated=False) for i, n in enumerate(lengths)]


def _first_tokens(batch) -> list[tuple[int, int]]:
    """(length, first id) of each row: identifies the sample in ``_examples``."""
    rows = zip(batch["seg_lens"], batch["input_ids"], strict=True)
    return [(int(n[0]), int(ids[0])) for n, ids in rows]


def test_grouped_stream_covers_each_epoch_within_the_token_budget():
    rng = random.Random(1)
    lengths = [rng.randint(5, 120) for _ in range(300)]
    examples = _examples(lengths)
    bins = [[i] for i in range(len(examples))]
    tokens = 4 * 128
    stream = BatchStream(examples, bins, packing=False, batch_size=4, pad_id=0, seed=7,
                         group_tokens=tokens)  # fmt: skip
    epochs: list[list[list[int]]] = [[], []]
    real = padded = 0
    while True:
        batch = next(stream)
        epoch = stream.epoch  # of this batch (the stream moves on when asked for the next)
        if epoch == 2:
            break
        rows, width = batch["input_ids"].shape
        assert rows * width <= tokens and "attention_mask" not in batch
        real += int((batch["seg_lens"] > 0).sum())
        padded += rows * width
        epochs[epoch].append(sorted(n for n, _ in _first_tokens(batch)))
    for batches_ in epochs:  # every sample exactly once per epoch
        assert sorted(n for b in batches_ for n in b) == sorted(lengths)
    assert real == 2 * sum(lengths)
    assert real / padded > 0.9  # grouped: little padding (random batches of 4: about 0.6)
    assert epochs[0] != epochs[1]  # reshuffled
    # Resumable: seeking to (1, 3) gives the same batches as reading on.
    again = BatchStream(examples, bins, packing=False, batch_size=4, pad_id=0, seed=7,
                        group_tokens=tokens)  # fmt: skip
    again.seek(1, 3)
    assert sorted(n for n, _ in _first_tokens(next(again))) == epochs[1][3]
    with pytest.raises(ValueError, match="packed rows are full"):
        BatchStream(examples, bins, packing=True, batch_size=4, pad_id=0, seed=0, group_tokens=8)


def test_grouped_stream_deals_ranks_equal_batch_counts_of_disjoint_rows():
    rng = random.Random(2)
    lengths = [rng.randint(5, 120) for _ in range(101)]
    examples = _examples(lengths)
    bins = [[i] for i in range(len(examples))]
    streams = [
        BatchStream(
            examples,
            bins,
            packing=False,
            batch_size=2,
            pad_id=0,
            seed=3,
            shard=(rank, 2),
            group_tokens=256,
        )  # fmt: skip
        for rank in range(2)
    ]
    counts = [len(s._chunks) for s in streams]
    assert counts[0] == counts[1] > 0
    seen = [[(n, f) for _ in range(counts[0]) for n, f in _first_tokens(next(s))] for s in streams]
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) <= len(lengths)
    # Two ranks, three rows: fewer grouped batches than ranks falls back to a row each.
    few = [BatchStream(examples[:3], bins[:3], packing=False, batch_size=2, pad_id=0, seed=0,
                       shard=(rank, 2), group_tokens=4096) for rank in range(2)]  # fmt: skip
    assert [len(s._chunks) for s in few] == [1, 1]


@pytest.mark.parametrize("fixed_width", [None, 16])
def test_ranks_of_uneven_rows_resume_from_rank_0s_position(fixed_width):
    # 5 rows over 2 ranks: were rank 0 to take 3 rows and rank 1 two, their epochs would end
    # at different steps, and rank 0's (epoch, position), all a checkpoint holds, would put
    # rank 1 elsewhere on resume.
    examples = _examples([3, 4, 5, 6, 7])
    bins = [[i] for i in range(len(examples))]

    def stream(rank: int) -> BatchStream:
        return BatchStream(examples, bins, packing=True, batch_size=2, pad_id=0, seed=0,
                           shard=(rank, 2), fixed_width=fixed_width)  # fmt: skip

    streams = [stream(rank) for rank in range(2)]
    assert len(streams[0]._chunks) == len(streams[1]._chunks)
    whole = [[_first_tokens(next(s)) for _ in range(9)] for s in streams]
    for k in range(1, 9):
        replay = [stream(rank) for rank in range(2)]
        for s in replay:
            for _ in range(k):
                next(s)
        assert replay[0].epoch == replay[1].epoch and replay[0].position == replay[1].position
        for rank in range(2):
            resumed = stream(rank)
            resumed.seek(replay[0].epoch, replay[0].position)
            assert [_first_tokens(next(resumed)) for _ in range(9 - k)] == whole[rank][k:]
    # Within an epoch the ranks' rows are disjoint.
    epoch = [{r for b in whole[rank][:1] for r in b} for rank in range(2)]
    assert not epoch[0] & epoch[1]


def test_grouped_eval_batches_cover_every_row_once():
    examples = _examples([9, 3, 4, 10, 2])
    bins = [[i] for i in range(5)]
    out = list(batches(examples, bins, packing=False, batch_size=2, pad_id=0, group_tokens=10))
    assert [b["input_ids"].shape for b in out] == [(2, 3), (1, 4), (1, 9), (1, 10)]
    assert sorted(n for b in out for n, _ in _first_tokens(b)) == [2, 3, 4, 9, 10]


# ---------------------------------------------------------------- loss


def test_causal_lm_loss_masks_targets_at_sample_starts():
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[1, 2, 3, 4, 5]])
    position_ids = torch.tensor([[0, 1, 2, 0, 1]])
    loss, count = causal_lm_loss(logits, labels, position_ids)
    # Targets at t=1,2,4; t=3 (position 0) would be predicted from the previous sample.
    ce = torch.nn.functional.cross_entropy(
        logits[0, [0, 1, 3]], labels[0, [1, 2, 4]], reduction="sum"
    )
    assert count == 3
    torch.testing.assert_close(loss, ce)


def test_causal_lm_loss_is_fp32_and_zero_without_targets():
    logits = torch.randn(1, 3, 7, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.full((1, 3), IGNORE_INDEX)
    loss, count = causal_lm_loss(logits, labels, torch.arange(3)[None])
    assert count == 0 and loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()  # still part of the graph


# ---------------------------------------------------------------- model equivalence

ATTN_IMPLS = [
    "eager",
    "sdpa",
    "sdpa_fp32",
    pytest.param("flex_attention", marks=pytest.mark.cuda),
]


def _tiny_model(path, attn: str):
    from transformers import AutoModelForCausalLM

    from raysft.train import attention

    attention.register()  # raysft's model loading does this for sdpa_fp32
    device = "cuda" if attn == "flex_attention" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn, dtype=torch.float32
    )
    return model.to(device).eval()


LENGTHS = (5, 11, 8)


def _samples(*, prompt_len: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random samples; labels on every token but the first ``prompt_len`` (the prompt)."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, 128, (n,), generator=gen).tolist()
        out.append((ids, [IGNORE_INDEX] * prompt_len + ids[prompt_len:]))
    return out


def _alone(model, sample) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token logits [n, V] and mean loss of one sample run by itself."""
    dev = model.device
    ids = torch.tensor([sample[0]], device=dev)
    labels = torch.tensor([sample[1]], device=dev)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
    loss, count = causal_lm_loss(logits, labels, torch.arange(ids.shape[1], device=dev)[None])
    return logits[0], loss / count


def _packed_logits(model, batch, **kwargs) -> torch.Tensor:
    dev = model.device
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"].to(dev),
            position_ids=batch["position_ids"].to(dev),
            **kwargs,
        ).logits.float()


def _segments(samples, logits_row, labels_row, pos_row):
    """Per-sample (logits, mean loss) cut out of one packed row."""
    out, start = [], 0
    for ids, _ in samples:
        end = start + len(ids)
        sl = slice(start, end)
        loss, count = causal_lm_loss(logits_row[None, sl], labels_row[None, sl], pos_row[None, sl])
        out.append((logits_row[sl], loss / count))
        start = end
    return out


@pytest.mark.parametrize("attn", ATTN_IMPLS)
def test_packed_row_equals_samples_run_alone(tiny_llama_dir, attn):
    model = _tiny_model(tiny_llama_dir, attn)
    samples = _samples()
    # Row 0: three samples packed; row 1: one sample plus padding (its own segment).
    batch = collate_packed([samples, samples[:1]], pad_id=0)
    logits = _packed_logits(model, batch, use_cache=False).cpu()
    alone = [_alone(model, s) for s in samples]
    labels, pos = batch["labels"], batch["position_ids"]
    for (seg_logits, seg_loss), (ref_logits, ref_loss) in zip(
        _segments(samples, logits[0], labels[0], pos[0]), alone, strict=True
    ):
        torch.testing.assert_close(seg_logits, ref_logits.cpu(), atol=1e-4, rtol=0)
        torch.testing.assert_close(seg_loss, ref_loss.cpu(), atol=1e-4, rtol=0)
    n0 = len(samples[0][0])
    torch.testing.assert_close(logits[1, :n0], alone[0][0].cpu(), atol=1e-4, rtol=0)

    # Every first token is labelled: only position masking keeps it out of the row's loss.
    total, count = causal_lm_loss(logits[:1], labels[:1], pos[:1])
    assert count == sum(n - 1 for n in LENGTHS)
    expected = sum(loss * (n - 1) for (_, loss), n in zip(alone, LENGTHS, strict=True))
    torch.testing.assert_close(total, expected.cpu(), atol=1e-3, rtol=1e-5)


def _max_later_segment_error(model, samples, batch, **kwargs) -> float:
    logits = _packed_logits(model, batch, **kwargs).cpu()
    segs = _segments(samples, logits[0], batch["labels"][0], batch["position_ids"][0])
    # Sample 0 sees nothing before it in any variant; samples 1, 2 are the contaminated ones.
    return max(
        (seg[0] - _alone(model, s)[0].cpu()).abs().max().item()
        for seg, s in zip(segs[1:], samples[1:], strict=True)
    )


@pytest.mark.parametrize("attn", ATTN_IMPLS)
def test_negative_controls_show_cross_contamination(tiny_llama_dir, attn):
    """Each wrong call convention must visibly fail the equivalence (the test above can fail)."""
    model = _tiny_model(tiny_llama_dir, attn)
    samples = _samples()
    batch = collate_packed([samples], pad_id=0)
    ones = torch.ones_like(batch["input_ids"]).to(model.device)
    naive = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    assert _max_later_segment_error(model, samples, batch, use_cache=False) < 1e-4
    # A mask of ones disables the per-sample mask derived from position ids.
    assert (
        _max_later_segment_error(model, samples, batch, attention_mask=ones, use_cache=False) > 1e-2
    )
    # A KV cache (config default use_cache=True) disables it too.
    assert _max_later_segment_error(model, samples, batch, use_cache=True) > 1e-2
    # Plain concatenation: positions never restart.
    assert _max_later_segment_error(model, samples, naive, use_cache=False) > 1e-2


def test_padded_loss_equals_hf_model_loss(tiny_llama_dir):
    model = _tiny_model(tiny_llama_dir, "sdpa")
    batch = collate_padded(_samples(prompt_len=2), pad_id=0)
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            use_cache=False,
        )
    loss, count = causal_lm_loss(out.logits, batch["labels"], batch["position_ids"])
    assert count == sum(n - 2 for n in LENGTHS)  # n - 1 shifted targets, minus 1 prompt target
    torch.testing.assert_close(loss / count, out.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ATTN_IMPLS)
def test_causal_batch_equals_samples_run_alone(tiny_llama_dir, attn):
    """One sample per row, right-padded, no mask: real tokens never see the padding."""
    model = _tiny_model(tiny_llama_dir, attn)
    samples = _samples(prompt_len=2)
    batch = collate_padded(samples, pad_id=0, causal=True)
    logits = _packed_logits(model, batch, use_cache=False).cpu()
    for row, sample in enumerate(samples):
        ref_logits, ref_loss = _alone(model, sample)
        n = len(sample[0])
        torch.testing.assert_close(logits[row, :n], ref_logits.cpu(), atol=1e-4, rtol=0)
        one = slice(row, row + 1)
        loss, count = causal_lm_loss(logits[one], batch["labels"][one], batch["position_ids"][one])
        torch.testing.assert_close(loss / count, ref_loss.cpu(), atol=1e-4, rtol=0)


def test_sdpa_fp32_attends_in_fp32_under_bf16_autocast(tiny_llama_dir):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[torch.dtype] = []

    class Spy(TorchDispatchMode):  # sees the aten ops after autocast has cast their inputs
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in str(func):
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    batch = collate_packed([_samples()], pad_id=0)
    for attn, dtype in (("sdpa", torch.bfloat16), ("sdpa_fp32", torch.float32)):
        model = _tiny_model(tiny_llama_dir, attn)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16), Spy():
            logits = _packed_logits(model, batch, use_cache=False)
        assert seen and set(seen) == {dtype}, (attn, seen)
        assert torch.isfinite(logits).all()
