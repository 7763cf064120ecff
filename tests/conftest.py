"""Shared fixtures: a random-init tiny Llama (with a word-level tokenizer) saved to a tmp dir."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

TINY_VOCAB = 128
# Set once per pytest run (pytest_configure); see there.
SUITE_RUN_VAR = "RAYSFT_IT_RUN"


# `make test` runs the suite on 2 xdist workers (`-n 2`). The scheduler below gives the
# integration tests two lanes, one per worker, each running its modules one after the other in
# INTEGRATION_LANES order, the two lanes side by side (every test starts a Ray of its own); then
# both workers take the unit tests, a module at a time. Most integration tests wait more than
# they compute (a Ray start, one trial at a time, a resume after a kill), so two at once fill the
# 2 cores. Lane 1 holds the tests that start clusters with `ray start` (whose raylet must register
# within Ray's fixed 30 s) and the 4-trials-at-a-time load test, so they never overlap. The load
# test goes last in its lane, beside lane 0's one-trial-at-a-time searches; lane 0 is kept the
# longer, since beside CPU-bound unit tests the load test takes half as long again (464 s
# against 299-329 s, README "Tests").
INTEGRATION_DIR = "tests/integration/"
INTEGRATION_LANES = (
    ("test_faults", "test_search_local", "test_backend", "test_tracking_outage"),
    ("test_job_submit", "test_autoscale", "test_default_run", "test_storage", "test_load"),
)


def integration_lane(nodeid: str) -> int:
    """Index of the lane an integration test runs in (modules not listed: the last lane)."""
    name = nodeid[len(INTEGRATION_DIR) :].split("::", 1)[0].removesuffix(".py")
    for i, lane in enumerate(INTEGRATION_LANES):
        if name in lane:
            return i
    return len(INTEGRATION_LANES) - 1


@pytest.hookimpl(optionalhook=True)  # xdist's hook: without xdist, never called
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scope scheduler, with one scope per integration lane and one per module for the
    rest, in collection order (the lanes first: they take longest, and each goes to a worker of
    its own). xdist's own ``xdist_group`` marker cannot do it under pytest 9.2: xdist 3.8
    renames the node id through an attribute pytest no longer reads."""
    from xdist.scheduler import LoadScopeScheduling

    class IntegrationLanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(INTEGRATION_DIR):
                return f"{INTEGRATION_DIR}lane-{integration_lane(nodeid)}"
            return nodeid.split("::", 1)[0]

    config.option.loadscopereorder = False  # keep the order pytest_collection_modifyitems made
    return IntegrationLanes(config, log)


def _integration_rank(item: pytest.Item) -> tuple[int, int]:
    lane = integration_lane(item.nodeid)
    names = INTEGRATION_LANES[lane]
    name = item.path.stem
    return lane, names.index(name) if name in names else len(names)


def pytest_configure(config: pytest.Config) -> None:
    # Idempotent with pyproject's list; keeps `--strict-markers` happy if run without it.
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "integration: real Ray cluster / MLflow server")
    # One id per `pytest` run, inherited by its xdist workers (started after this hook): the
    # integration tests mark every process they start with it, so a lane tells its sibling
    # lane's Ray from anyone else's (tests/integration/conftest.py).
    os.environ.setdefault(SUITE_RUN_VAR, uuid.uuid4().hex[:12])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Integration tests are told apart by their directory, as the scheduler tells them apart.
    integration = [item for item in items if item.nodeid.startswith(INTEGRATION_DIR)]
    if integration:  # integration first, lane by lane, each lane in its order
        rest = [item for item in items if not item.nodeid.startswith(INTEGRATION_DIR)]
        items[:] = sorted(integration, key=_integration_rank) + rest  # sorted() is stable

    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return  # only import torch when a cuda test was collected
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in cuda_items:
        item.add_marker(skip)


def save_word_tokenizer(out_dir: Path, *, with_unk: bool = True) -> None:
    """A whitespace word-level tokenizer over ``TINY_VOCAB`` ids and no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] if with_unk else ["<s>", "</s>"]
    words = [f"w{i}" for i in range(TINY_VOCAB - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>" if with_unk else None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>" if with_unk else None,
    )
    tok.save_pretrained(out_dir)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    # hidden 64: a multiple of bitsandbytes' 64-value NF4 block.
    kwargs = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="session")
def word_tokenizer_saver():
    """``save_word_tokenizer`` as a fixture: ``saver(out_dir, with_unk=...)``."""
    return save_word_tokenizer


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_llama_config`` as a fixture: call it with overrides for a fresh LlamaConfig."""
    return tiny_llama_config


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with a seeded random tiny LlamaForCausalLM (fp32) and its tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    model.save_pretrained(out)
    save_word_tokenizer(out)
    return out
