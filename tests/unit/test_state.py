"""Resumable training state: a run restarted from the checkpoint of step k continues exactly."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_recipe import _config, _model_dir

from raysft.train.metrics import METRICS, REPLAYED
from raysft.train.recipe import run_trial
from raysft.train.state import STATE_FILE, LocalCheckpoints


class _KeepAll:
    """Reporter that keeps a copy of every checkpoint (LocalCheckpoints keeps the latest)."""

    def __init__(self, root: Path):
        self.root = root
        self.records: list[dict[str, Any]] = []

    def __call__(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        assert checkpoint_dir is not None
        self.records.append(dict(metrics))
        shutil.copytree(checkpoint_dir, self.root / f"step-{metrics['step']}")


@pytest.mark.parametrize(
    ("method", "optimizer"), [("lora", "adamw"), ("full", "adamw"), ("full", "adamw_8bit")]
)
def test_resumed_run_matches_an_uninterrupted_one(
    tmp_path: Path, method: str, optimizer: str
) -> None:
    model_dir = _model_dir(tmp_path, "llama")
    # 12 rows, 2 x 2 rows a step: the data wraps into a new epoch mid-run; dropout (LoRA) and
    # NEFTune noise draw from the RNGs the checkpoint must restore. bitsandbytes' 8-bit states
    # (full fine-tuning: tensors of 4096 values or more, the size it quantizes from).
    extra = {
        "train.max_steps": 8,
        "train.eval_every": 3,
        "train.exact_match": False,
        "train.optimizer": optimizer,
    }
    whole_cfg = _config(tmp_path, model_dir, method, output_dir=str(tmp_path / "whole"), **extra)
    keep = _KeepAll(tmp_path / "ckpts")
    whole = run_trial(whole_cfg, report=keep)
    assert [r["step"] for r in keep.records] == [3, 6, 8]
    assert (tmp_path / "ckpts" / "step-3" / STATE_FILE).is_file()
    # metrics.json's times are those the last eval reported (checkpoint_s: all but its own).
    written = json.loads((tmp_path / "whole" / "metrics.json").read_text())["final"]
    for phase in ("setup_s", "step_s", "eval_s", "checkpoint_s"):
        assert written[phase] == whole.final[phase] == keep.records[-1][phase], phase

    resumed_cfg = _config(tmp_path, model_dir, method, output_dir=str(tmp_path / "re"), **extra)
    resumed = run_trial(resumed_cfg, resume_from=str(tmp_path / "ckpts" / "step-3"))

    # The resumed run's history holds the checkpoint's steps too, then its own.
    assert [h["step"] for h in resumed.history] == list(range(1, 9))
    for a, b in zip(whole.history[3:], resumed.history[3:], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5), a["step"]
        assert b["lr"] == a["lr"]
        assert b["tokens"] == a["tokens"]
        assert b["epoch"] == a["epoch"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), a["step"]
    assert resumed.final["eval_loss"] == pytest.approx(whole.final["eval_loss"], abs=1e-5)
    # Its time counts from the first start: the checkpoint's, plus the resumed run's own.
    import torch

    before = torch.load(tmp_path / "ckpts" / "step-3" / STATE_FILE)["progress"]["seconds"]
    assert before["step_s"] > 0 and before["elapsed_s"] == keep.records[0]["elapsed_s"]
    for phase in ("setup_s", "step_s", "eval_s"):
        assert resumed.final[phase] > before[phase], phase
    assert resumed.final["train_seconds"] > before["train_s"]
    second_setup = resumed.final["setup_s"] - before["setup_s"]
    last = resumed.history[-1]["elapsed_s"]
    assert resumed.final["wall_seconds"] >= last >= before["elapsed_s"] + second_setup - 0.01
    # Resumed at its last step, it only writes its outputs: its setup counts all the same.
    end = tmp_path / "ckpts" / "step-8"
    again_cfg = _config(tmp_path, model_dir, method, output_dir=str(tmp_path / "again"), **extra)
    again = run_trial(again_cfg, resume_from=str(end))
    assert again.final["setup_s"] > torch.load(end / STATE_FILE)["progress"]["seconds"]["setup_s"]


def test_a_resume_may_turn_on_activation_checkpointing_and_change_what_only_evaluates(
    tmp_path: Path,
) -> None:
    """The usual fix for a run out of memory is activation checkpointing; evals every other
    step or generation settings change no training step. Resumed with those changed, the run
    takes the uninterrupted one's steps (dropout's RNG survives the recomputation)."""
    from raysft.train.resume_checks import check_resumable

    model_dir = _model_dir(tmp_path, "llama")
    extra = {"train.max_steps": 6, "train.eval_every": 3, "train.exact_match": False}
    keep = _KeepAll(tmp_path / "ckpts")
    whole = run_trial(_config(tmp_path, model_dir, "lora", **extra), report=keep)
    changed = {
        **extra,
        "train.gradient_checkpointing": True,
        "train.eval_every": 2,
        "train.max_new_tokens": 4,
        "eval.samples": 2,
    }
    resumed_cfg = _config(tmp_path, model_dir, "lora", output_dir=str(tmp_path / "re"), **changed)
    check_resumable(tmp_path / "ckpts" / "step-3", resumed_cfg)  # not refused
    resumed = run_trial(resumed_cfg, resume_from=str(tmp_path / "ckpts" / "step-3"))
    steps = [h for h in resumed.history if h["step"] > 3]
    assert [h["step"] for h in steps] == [4, 5, 6]
    for a, b in zip(whole.history[3:], steps, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-6), a["step"]
        assert (b["lr"], b["tokens"]) == (a["lr"], a["tokens"])
    assert resumed.final["eval_loss"] == pytest.approx(whole.final["eval_loss"], abs=1e-6)


def test_every_reported_number_is_a_registry_metric(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = []
    cfg = _config(tmp_path, _model_dir(tmp_path, "llama"), "lora")
    run_trial(cfg, report=lambda m, _: records.append(m))
    assert records, "no eval was reported"
    steps = []
    for record in records:
        # The steps since the last report ride along with it, for MLflow's per-step curves.
        for earlier in record.get(REPLAYED, []):
            assert set(earlier) - {"step"} <= set(METRICS), earlier
            steps.append(earlier["step"])
        assert set(record) - {"step", REPLAYED} <= set(METRICS), record
        steps.append(record["step"])
    assert steps == list(range(1, cfg.train.max_steps + 1))  # every step, once, in order
    assert len(records) < len(steps)  # reported at evals only
    assert {"eval_loss", "perplexity", "train_loss", "lr", "tokens", "elapsed_s"} <= set(records[0])
    assert {"exact_match", "base_exact_match"} <= set(records[-1])


def test_local_checkpoints_keep_the_latest_and_resume(tmp_path: Path) -> None:
    cfg = _config(tmp_path, _model_dir(tmp_path, "llama"), "lora", **{"train.exact_match": False})
    ckpts = tmp_path / "out" / "checkpoints"
    run_trial(cfg, report=LocalCheckpoints(ckpts))
    assert [p.name for p in ckpts.iterdir()] == ["step-000004"]
    assert (ckpts / "step-000004" / STATE_FILE).is_file()
    # Resuming from the last step trains nothing more and keeps the history.
    again = run_trial(cfg, resume_from=str(ckpts / "step-000004"))
    assert [h["step"] for h in again.history] == [1, 2, 3, 4]


def test_a_checkpoint_resumes_only_on_the_number_of_workers_that_wrote_it(tmp_path: Path) -> None:
    """Each data-parallel worker's share of the data and its RNG are in the checkpoint: on
    another number of workers the run would re-read some rows, skip others and halve its steps
    (seen by review), so it is refused, with the number to resume on."""
    from raysft.errors import ConfigError
    from raysft.train.state import load_state

    cfg = _config(tmp_path, _model_dir(tmp_path, "llama"), "lora", **{"train.exact_match": False})
    ckpts = tmp_path / "out" / "checkpoints"
    run_trial(cfg, report=LocalCheckpoints(ckpts))
    with pytest.raises(ConfigError) as err:  # refused before anything is loaded
        load_state(ckpts / "step-000004", model=None, optimizer=None, scheduler=None, world_size=2)
    assert err.value.problems == [
        f"{ckpts / 'step-000004'}: written by 1 data-parallel worker(s), resumed by 2: the data's "
        "split across workers and their random streams would differ, so the run would not "
        "continue exactly; resume with search.resources.workers: 1, or start over"
    ]


def test_resume_refuses_data_whose_bytes_changed_since_the_checkpoint(tmp_path: Path) -> None:
    from raysft.data.digest import DATA_FILE
    from raysft.errors import DataError

    cfg = _config(tmp_path, _model_dir(tmp_path, "llama"), "lora", **{"train.exact_match": False})
    ckpts = tmp_path / "out" / "checkpoints"
    run_trial(cfg, report=LocalCheckpoints(ckpts))
    ckpt = ckpts / "step-000004"
    rows = Path(str(cfg.data.train))
    original = rows.read_bytes()
    sha = hashlib.sha256(original).hexdigest()
    record = json.loads((ckpt / DATA_FILE).read_text())
    assert {k: record[k] for k in ("train", "eval")} == {"train": {str(rows): sha}, "eval": {}}
    # Same path, same number of rows, one answer edited: the stream's position would now
    # point into other rows.
    first, rest = original.split(b"\n", 1)
    row = json.loads(first)
    row["output"] = row["output"] + " (edited)"
    rows.write_bytes(json.dumps(row).encode() + b"\n" + rest)
    with pytest.raises(DataError) as err:
        run_trial(cfg, resume_from=str(ckpt))
    assert str(err.value).startswith(f"--resume-from {ckpt}: the data differs from what its run")
    assert f"data.train: {rows} changed since (sha256 {sha[:12]} then, " in str(err.value)
    rows.write_bytes(original)
    assert [h["step"] for h in run_trial(cfg, resume_from=str(ckpt)).history] == [1, 2, 3, 4]
    # A checkpoint from before raysft kept digests resumes unchecked.
    (ckpt / DATA_FILE).unlink()
    rows.write_bytes(json.dumps(row).encode() + b"\n" + rest)
    run_trial(cfg, resume_from=str(ckpt))


def test_resume_refuses_the_same_bytes_tokenized_to_other_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The chat template, the tokenizer's files or the libraries changed since the checkpoint:
    the same rows give other ids, which the remaining steps would train on at the old stream
    position. The checkpoint records what its rows tokenized to, and a resume compares."""
    from raysft.data import pipeline
    from raysft.data.digest import DATA_FILE, TOKENS, token_digests
    from raysft.data.tokens import Segment
    from raysft.errors import DataError
    from raysft.train.model import training_tokenizer

    cfg = _config(tmp_path, _model_dir(tmp_path, "llama"), "lora", **{"train.exact_match": False})
    ckpts = tmp_path / "out" / "checkpoints"
    first = run_trial(cfg, report=LocalCheckpoints(ckpts))
    ckpt = ckpts / "step-000004"
    record = json.loads((ckpt / DATA_FILE).read_text())
    prepared = pipeline.prepare_data(cfg.data, training_tokenizer(cfg), seed=cfg.train.seed)
    assert record[TOKENS] == token_digests(prepared)  # the rows it trained on, as read now
    assert first.history[-1]["step"] == 4

    render = pipeline.render

    def rendered_otherwise(conv: Any, **kwargs: Any) -> list[Segment]:
        # As a template fix would: the same conversation, one more character before it.
        segments = render(conv, **kwargs)
        return [Segment(" " + segments[0].text, segments[0].trained), *segments[1:]]

    monkeypatch.setattr(pipeline, "render", rendered_otherwise)
    with pytest.raises(DataError) as err:
        run_trial(cfg, resume_from=str(ckpt))
    message = str(err.value)
    assert message.startswith(f"--resume-from {ckpt}: the data tokenizes to other ids than its")
    assert "the chat template, the tokenizer's files or the raysft / transformers" in message
    then = record[TOKENS]["train"][:12]
    assert f"data.train: the same rows tokenize to other ids now (sha256 {then} then, " in message
    # A checkpoint written before raysft recorded its ids resumes, said so.
    record.pop(TOKENS)
    (ckpt / DATA_FILE).write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="raysft.train.state"):
        assert run_trial(cfg, resume_from=str(ckpt)).history[-1]["step"] == 4
    assert "written before raysft recorded the token ids its run trained on" in caplog.text


class _RunsCode:
    """Unpickled by plain pickle, it creates ``marker``: any call could be made the same way."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_holding_code_is_refused_unrun(tmp_path: Path) -> None:
    import torch

    from raysft.config import ConfigError

    cfg = _config(tmp_path, _model_dir(tmp_path, "llama"), "lora", **{"train.exact_match": False})
    ckpts = tmp_path / "out" / "checkpoints"
    run_trial(cfg, report=LocalCheckpoints(ckpts))
    path = ckpts / "step-000004" / STATE_FILE
    state = torch.load(path, weights_only=True)  # what raysft writes loads as plain data
    marker = tmp_path / "ran"
    state["progress"]["final"]["note"] = _RunsCode(marker)
    torch.save(state, path)
    with pytest.raises(ConfigError, match="holds objects other than tensors and plain data"):
        run_trial(cfg, resume_from=str(path.parent))
    assert not marker.exists()


def test_a_resumed_run_first_reports_its_checkpoints_record_again(tmp_path: Path) -> None:
    # A search's driver that died between a trial's report and hearing it: the restarted trial
    # says that record again; resumed at max_steps it says its final result, not nothing.
    cfg = _config(tmp_path, _model_dir(tmp_path, "llama"), "lora", **{"train.exact_match": False})
    first: list[dict[str, Any]] = []
    ckpts = tmp_path / "out" / "checkpoints"
    keep = LocalCheckpoints(ckpts)

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        first.append(dict(metrics))
        keep(metrics, checkpoint_dir)

    run_trial(cfg, report=report)
    again: list[tuple[dict[str, Any], str | None]] = []
    run_trial(
        cfg,
        report=lambda m, c: again.append((dict(m), c)),
        resume_from=str(ckpts / "step-000004"),
    )
    # The records before it ride along in the same report, for a driver that missed them too:
    # every step's, as the first run's reports carried them.
    steps = [r for m in first for r in [*m.get(REPLAYED, []), _own(m)]]
    assert len(first) >= 2 and len(steps) == cfg.train.max_steps
    assert again == [({**steps[-1], REPLAYED: steps[:-1]}, None)]


def _own(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k != REPLAYED}


def test_a_run_resumed_mid_way_reports_its_checkpoint_then_goes_on(tmp_path: Path) -> None:
    model_dir = _model_dir(tmp_path, "llama")
    extra = {"train.max_steps": 6, "train.eval_every": 3, "train.exact_match": False}
    cfg = _config(tmp_path, model_dir, "lora", **extra)
    keep = _KeepAll(tmp_path / "ckpts")
    run_trial(cfg, report=keep)
    seen: list[tuple[int, bool]] = []
    run_trial(
        cfg,
        report=lambda m, c: seen.append((m["step"], c is not None)),
        resume_from=str(tmp_path / "ckpts" / "step-3"),
    )
    assert seen == [(3, False), (6, True)]


def test_resume_from_a_directory_that_is_no_checkpoint_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: {name_or_path: 'embedded:tiny-base'}\n", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "raysft.train", str(cfg), "--resume-from", str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not a raysft checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_folder_given_as_the_checkpoint_is_said_to_be_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--resume-from RUN (its folder, not RUN/checkpoints/step-N): said as what it is, not as
    an output_dir that holds an unfinished run (which named another folder's checkpoint)."""
    from raysft.cli import run_cli
    from raysft.config import dump_config, load_config
    from raysft.train import __main__ as train_main

    run = tmp_path / "run"
    cfg = load_config(None, {"output_dir": str(run)})
    ckpt = run / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    (ckpt / "training_state.pt").write_bytes(b"")
    argv = ["raysft.train", str(ckpt / "config.yaml"), "--resume-from", str(run)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        run_cli(train_main._main)
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith(
        f"error: --resume-from: {run}: not a raysft checkpoint (no training_state.pt)"
    )


def test_a_checkpoint_carries_its_config_and_resume_refuses_another(tmp_path: Path) -> None:
    from raysft.config import ConfigError, load_config
    from raysft.train.resume_checks import check_resumable
    from raysft.train.state import CONFIG_FILE

    extra = {"train.exact_match": False, "data.template": "vicuna"}
    cfg = _config(tmp_path, _model_dir(tmp_path, "llama"), "lora", **extra)
    ckpts = tmp_path / "out" / "checkpoints"
    run_trial(cfg, report=LocalCheckpoints(ckpts))
    ckpt = ckpts / "step-000004"
    assert load_config(ckpt / CONFIG_FILE).data.template == "vicuna"  # raysft.evaluate reads it
    check_resumable(ckpt, cfg.model_copy(update={"output_dir": str(tmp_path / "elsewhere")}))
    changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 0.5})})
    with pytest.raises(ConfigError, match="train.learning_rate"):
        check_resumable(ckpt, changed)
    # Without its config.yaml nothing says the run is the same: refused, not taken on trust.
    (ckpt / CONFIG_FILE).rename(tmp_path / "kept.yaml")
    with pytest.raises(ConfigError, match=f"no {CONFIG_FILE} .every raysft checkpoint has one"):
        check_resumable(ckpt, changed)
    (tmp_path / "kept.yaml").rename(ckpt / CONFIG_FILE)
    state = ckpt / STATE_FILE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        check_resumable(ckpt, cfg)
    # A trial Ray restarts loads it without check_resumable: called corrupt there too.
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        run_trial(cfg, resume_from=str(ckpt))


def test_a_checkpoint_archive_is_read_for_its_checksums_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import zipfile

    import torch

    from raysft.config import ConfigError
    from raysft.train import state as st

    path = tmp_path / STATE_FILE
    torch.save({"progress": {"step": 1}, "w": torch.arange(4096.0)}, path)
    opened: list[Path] = []
    real = zipfile.ZipFile

    def counting(file, *a, **kw):  # type: ignore[no-untyped-def]
        opened.append(file)
        return real(file, *a, **kw)

    monkeypatch.setattr(zipfile, "ZipFile", counting)
    st._check_archive(path)
    st._check_archive(path)  # check_resumable, then load_state: one read
    assert len(opened) == 1
    data = bytearray(path.read_bytes())
    i = data.index(torch.arange(4096.0).numpy().tobytes()[8:16])  # inside the tensor's bytes
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, a later mtime: checked again, and caught
    with pytest.raises(ConfigError, match="fails its checksum"):
        st._check_archive(path)
    assert len(opened) == 2


def test_a_large_data_file_is_fingerprinted_by_size_and_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from raysft.data import digest

    monkeypatch.setattr(digest, "_WHOLE", 8 << 20)  # "large" from 8 MiB, for the test
    big = tmp_path / "big.bin"
    data = bytearray(b"x" * (40 << 20))
    big.write_bytes(data)
    first = digest.source_digest(str(big))
    data[-1:] = b"y"  # in the last sample
    big.write_bytes(data)
    assert digest.source_digest(str(big)) != first
    big.write_bytes(bytes(data) + b"z")  # appended
    assert digest.source_digest(str(big)) != first
    small = tmp_path / "small.bin"
    small.write_bytes(b"abc")
    assert digest.source_digest(str(small)) == hashlib.sha256(b"abc").hexdigest()


def test_a_data_json_of_another_shape_is_said_to_be_unreadable(tmp_path: Path) -> None:
    from raysft.config import ConfigError
    from raysft.data.digest import DATA_FILE
    from raysft.train.resume_checks import check_same_data

    (tmp_path / DATA_FILE).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no data digests: the checkpoint is truncated"):
        check_same_data(tmp_path, {"train": {}, "eval": {}})


def test_resume_from_a_path_that_is_not_there_or_a_file_says_so(tmp_path: Path) -> None:
    from raysft.config import ConfigError
    from raysft.train.resume_checks import check_resumable

    (tmp_path / "f").write_text("x")
    for path, what in ((tmp_path / "gone" / "step-20", "no such directory"),
                       (tmp_path / "f", "a file, not a checkpoint directory")):  # fmt: skip
        with pytest.raises(ConfigError) as err:
            check_resumable(str(path), None)
        assert str(err.value).startswith(f"--resume-from: {path}: {what}; "), err.value


def test_a_runs_outputs_and_checkpoints_are_readable_as_plainly_written_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors writes weights through a 0600 temp file and mkdtemp makes 0700 folders: a
    colleague or a serving user could not load the adapter. Checkpoints are written beside
    where they are kept, not in the system's temp folder."""
    import os
    import tempfile

    from raysft.config import load_config
    from raysft.train.recipe import run_trial
    from raysft.train.state import LocalCheckpoints

    before = os.umask(0o022)
    staged: list[str] = []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(
        tempfile, "mkdtemp", lambda *a, **k: staged.append(str(k.get("dir"))) or mkdtemp(*a, **k)
    )
    try:
        out = tmp_path / "out"
        cfg = load_config(
            None,
            {"output_dir": str(out), "train": {"max_steps": 2, "eval_every": 2,
             "exact_match": False}, "data": {"max_eval_samples": 4}},
        )  # fmt: skip
        run_trial(cfg, report=LocalCheckpoints(out / "checkpoints"))
    finally:
        os.umask(before)
    assert staged == [str(out / "checkpoints")]
    files = [p for p in out.rglob("*")]
    assert any(p.name == "adapter_model.safetensors" for p in files)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *files]}
    assert {m for m in modes.values()} <= {0o644, 0o755}, modes
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]


def test_a_run_stopped_before_its_first_checkpoint_leaves_nothing_in_the_way(
    tmp_path: Path,
) -> None:
    """Killed while writing its first checkpoint, a run leaves checkpoints/ with a hidden
    staging folder in it: the same command starts again, and the next checkpoint clears it."""
    from raysft.config import load_config
    from raysft.train.run_dir import check_output_dir
    from raysft.train.state import STAGING_PREFIX, LocalCheckpoints

    out = tmp_path / "out"
    stale = out / "checkpoints" / f"{STAGING_PREFIX}killed"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    check_output_dir(load_config(None, {"output_dir": str(out)}), "c.yaml", resuming=None)
    kept = LocalCheckpoints(out / "checkpoints")
    new = Path(kept.staging_dir) / f"{STAGING_PREFIX}new"
    new.mkdir()
    (new / "adapter_model.safetensors").write_bytes(b"w")
    kept({"step": 4}, str(new))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004"]


def test_a_resume_that_computes_in_other_dtypes_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `auto` dtypes resolve per device: a checkpoint of a bf16 host resumed on an fp32 one
    # goes on, but not as it would have; the checkpoint's record tells.
    import logging

    import torch

    cfg = _config(tmp_path, _model_dir(tmp_path, "llama"), "lora", **{"train.exact_match": False})
    ckpts = tmp_path / "out" / "checkpoints"
    first = run_trial(cfg, report=LocalCheckpoints(ckpts))
    own = first.final["numerics"]
    assert own == {"base_dtype": "float32", "autocast": "none"}  # lora on the CPU, fp32
    state_path = ckpts / "step-000004" / STATE_FILE
    with caplog.at_level(logging.WARNING, logger="raysft.train.precision"):
        run_trial(cfg, resume_from=str(state_path.parent))
    assert "other numerics" not in caplog.text  # same host, same dtypes: nothing said
    state = torch.load(state_path, weights_only=True)
    state["progress"]["final"]["numerics"] = {**own, "autocast": "bfloat16"}  # a bf16 host's
    torch.save(state, state_path)
    with caplog.at_level(logging.WARNING, logger="raysft.train.precision"):
        again = run_trial(cfg, resume_from=str(state_path.parent))
    assert "other numerics than it was trained with: autocast none (was bfloat16)" in caplog.text
    assert again.final["numerics"] == own  # what this run computed with


@pytest.mark.cuda
def test_a_rank_saves_and_restores_its_own_cuda_devices_rng() -> None:
    """One state, the current device's (a rank's), restored there; a checkpoint holding one per
    visible device (before 2026-12-07) restores the current device's entry."""
    import torch

    from raysft.train.state import _set_rng_states, rng_states

    saved = rng_states()
    assert isinstance(saved["cuda"], torch.Tensor)
    first = torch.rand(4, device="cuda")
    _set_rng_states(saved)
    assert torch.equal(torch.rand(4, device="cuda"), first)
    _set_rng_states({**saved, "cuda": [saved["cuda"]] * torch.cuda.device_count()})
    assert torch.equal(torch.rand(4, device="cuda"), first)


def test_a_resume_names_its_data_by_any_path_to_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'train.jsonl' in the checkpoint, './train.jsonl' or its absolute path now: the same
    file, read from where each run started (origin.json). Another file is still refused."""
    from raysft.config import ConfigError, dump_config, load_config
    from raysft.paths import ORIGIN_FILE
    from raysft.train.resume_checks import check_resumable
    from raysft.train.state import CONFIG_FILE, STATE_FILE

    (tmp_path / "train.jsonl").write_text("{}\n", encoding="utf-8")
    ckpt = tmp_path / "out" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    cfg = load_config(None, {"data.train": "train.jsonl", "output_dir": "out"})
    (ckpt / CONFIG_FILE).write_text(dump_config(cfg), encoding="utf-8")
    import torch

    torch.save({"progress": {"step": 2}}, ckpt / STATE_FILE)
    (ckpt / ORIGIN_FILE).write_text(json.dumps({"working_dir": str(tmp_path)}), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # resumed from another directory, naming the file absolutely
    for path in (str(tmp_path / "train.jsonl"), "../train.jsonl"):
        check_resumable(ckpt, cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"train": path})}))  # fmt: skip
    with pytest.raises(ConfigError, match="data.train: '.*/train.jsonl' in the checkpoint, '"):
        check_resumable(ckpt, cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"train": "train.jsonl"}  # elsewhere/train.jsonl: another file
        )}))  # fmt: skip


def test_a_checkpoint_of_one_optimizer_group_resumed_with_two_is_one_clear_error(
    tmp_path: Path,
) -> None:
    """Written before weight decay left norm gains out (every parameter in one AdamW group),
    resumed by a run with weight decay (two groups): one message, not torch's ValueError."""
    import torch

    from raysft.config import ConfigError, load_config
    from raysft.train.recipe import _build_optimizer
    from raysft.train.state import Progress, load_state, save_state

    cfg = load_config(None, {"train.weight_decay": 0.1, "method": "full"})
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    old = torch.optim.AdamW(list(model.parameters()), lr=1e-3, weight_decay=0.1)
    optimizer, scheduler = _build_optimizer(model, cfg)
    assert len(optimizer.param_groups) == 2
    save_state(tmp_path, progress=Progress(step=2), model=model, optimizer=old,
               scheduler=scheduler)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_state(tmp_path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert str(err.value).startswith(
        f"--resume-from: {tmp_path}: its optimizer state has 1 parameter group(s), this run's 2: "
        "it was written before raysft kept train.weight_decay off norm gains"
    )
