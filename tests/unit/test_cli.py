"""``python -m raysft.train`` as a user runs it: exit codes, messages, --dry-run and --preview.

Every subprocess run is declared in ``_jobs``; tests/unit/conftest.py starts them right after
collection and runs the tests that check them last, so their seconds of importing torch and peft
overlap with the other tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from evalkit import LONG_HISTORY
from stopkit import STOPS, exit_code_of_a_stop, stopped_by

from raysft.config import load_config, saved_tree
from raysft.errors import DataError
from raysft.paths import LOCK_FILE

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
BAD_ROLE = str(FIXTURES / "bad_role.jsonl")
IM_END = "<|im_end|>"
A1 = "Hello! I am an AI assistant; I can help you answer questions, write, code and more."
A2 = "Of course! Tell me what functionality you need and I will do my best to help."
PARAMS_LINE = re.compile(
    r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: (\d+\.\d{4})"
)
THREE_ERRORS = "train:\n  learning_rate: -1\n  max_stepz: 10\nlora:\n  r: 0\n"

# `python -m raysft.train ARGS1 [--then ARGS2 ...]`: the CLI run once per argument group in one
# interpreter (imports paid once), each run followed by "=== exit CODE" on stdout. The first run
# is exactly a fresh `python -m raysft.train ARGS1`. `--save-tokenizer DIR` first saves the
# byte-level tokenizer there (a preview needs no weights). At exit it reports whether anything
# imported ray.
SEQUENCE = """
import atexit, runpy, sys
atexit.register(lambda: print("ray imported:", "ray" in sys.modules, file=sys.stderr))
args = sys.argv[1:]
if args[0] == "--save-tokenizer":
    from raysft.assets.tokenizer import build_tokenizer
    build_tokenizer().save_pretrained(args[1])
    args = args[2:]
codes = []
while args:
    n = args.index("--then") if "--then" in args else len(args)
    sys.argv, args = ["raysft.train", *args[:n]], args[n + 1 :]
    try:
        runpy.run_module("raysft.train", run_name="__main__")
    except SystemExit as e:
        codes.append(e.code)
    print("=== exit", codes[-1], flush=True)
sys.exit(max(codes))
"""
# What pyproject's console script `raysft-train = raysft.train.__main__:main` does.
ENTRY_POINT = "from raysft.train.__main__ import main\nmain()\n"

Run = tuple[subprocess.CompletedProcess, float]  # the process and its wall seconds


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def preview_config(path: Path, tokenizer_dir: Path, **data: Any) -> str:
    tree = {
        "model": {"name_or_path": str(tokenizer_dir)},
        "data": {
            "train": str(FIXTURES / "chat_zh.jsonl"),
            "eval": str(FIXTURES / "eval_zh.jsonl"),
            **data,
        },
    }
    return write(path, yaml.safe_dump(tree, allow_unicode=True))


def DIVERGES(tmp: Path) -> dict[str, Any]:  # noqa: N802  (a constant, given its folder)
    """A run whose first update overflows float32: a loss turns NaN within a few steps (before
    the first eval, at step 3, or at it), and the run stops there."""
    return {
        "method": "full",
        "data": {"max_eval_samples": 4},
        "train": {
            "learning_rate": 1e20,
            "warmup_ratio": 0.0,
            "max_steps": 6,
            "eval_every": 3,
            "exact_match": False,
        },
        "output_dir": str(tmp / "diverged"),
    }


def _jobs(tmp: Path) -> dict[str, tuple[list[str], str | None]]:
    """name -> (arguments, ``-c`` code or None for ``python -m raysft.train``)."""
    ok = write(tmp / "ok.yaml", "{}\n")
    default = write(tmp / "default.yaml", "# defaults only\n")
    bad_data = write(tmp / "bad_data.yaml", yaml.safe_dump({"data": {"train": BAD_ROLE}}))
    tok_dir = tmp / "tokenizer"
    chatml = preview_config(tmp / "chatml.yaml", tok_dir)
    vicuna = preview_config(tmp / "vicuna.yaml", tok_dir, template="vicuna")
    overrides = [
        "--set",
        "lora.target_modules=[q_proj,v_proj]",
        "--set",
        "train.learning_rate=1e-4",
    ]
    return {
        # The slow ones first: they import torch (and peft).
        "dry_run": ([default, "--dry-run", "--then", ok, "--dry-run", *overrides], SEQUENCE),
        "preview": (
            ["--save-tokenizer", str(tok_dir), chatml, "--preview", "2", "--json"]
            + ["--then", vicuna, "--preview", "1"],
            SEQUENCE,
        ),
        "three_errors": ([write(tmp / "three.yaml", THREE_ERRORS), "--dry-run"], None),
        "yaml_syntax": ([write(tmp / "broken.yaml", "train: [1,\n"), "--dry-run"], None),
        "bad_set": ([ok, "--set", "train.max_steps", "--dry-run"], None),
        # A malformed --set and the file's own problems, in one run.
        "bad_set_and_file": (
            [write(tmp / "three2.yaml", THREE_ERRORS), "--set", "noequals", "--dry-run"],
            None,
        ),
        "bad_row": ([bad_data, "--preview", "1"], None),
        "entry_point": ([write(tmp / "r0.yaml", "lora:\n  r: 0\n")], ENTRY_POINT),
        "json_without_preview": ([ok, "--json"], None),
        "diverges": ([write(tmp / "diverges.yaml", yaml.safe_dump(DIVERGES(tmp)))], None),
        "held_output_dir": ([_held_output_dir(tmp)], None),
        # --resume-from a checkpoint of another run, into the held run's directory
        "resume_into_another_run": (
            [_held_output_dir(tmp), "--resume-from", _other_runs_checkpoint(tmp)],
            None,
        ),
        "foreign_output_dir": ([_foreign_output_dir(tmp)], None),
        "output_dir_a_file": (
            [write(tmp / "to_file.yaml", yaml.safe_dump({"output_dir": str(tmp / "ok.yaml")}))],
            None,
        ),
        "output_dir_under_a_file": (
            [write(tmp / "under.yaml", yaml.safe_dump({"output_dir": str(tmp / "ok.yaml" / "o")}))],
            None,
        ),
        "negative_preview": ([ok, "--preview", "-1"], None),
        "two_modes": ([ok, "--dry-run", "--preview", "2"], None),
    }


def _held_output_dir(tmp: Path) -> str:
    """A config whose output_dir holds an earlier run (its metrics and a checkpoint)."""
    held = tmp / "held"
    (held / "checkpoints" / "step-000002").mkdir(parents=True, exist_ok=True)
    (held / "metrics.json").write_text("{}\n", encoding="utf-8")
    return write(tmp / "held.yaml", yaml.safe_dump({"output_dir": str(held)}))


def _other_runs_checkpoint(tmp: Path) -> str:
    """A checkpoint of another run (its training state is all the first check reads)."""
    ckpt = tmp / "other" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "training_state.pt").write_bytes(b"")
    return str(ckpt)


def _foreign_output_dir(tmp: Path) -> str:
    """A config whose output_dir holds a user's files, two of them of names a run writes."""
    mine = tmp / "mine"
    mine.mkdir()
    for name, text in (("README.md", "my notes\n"), ("config.yaml", "a: 1\n"), ("x.txt", "x\n")):
        (mine / name).write_text(text, encoding="utf-8")
    return write(tmp / "mine.yaml", yaml.safe_dump({"output_dir": str(mine)}))


_RUNS: dict[str, Future[Run]] = {}
_PROCS: list[subprocess.Popen] = []
_TMP: list[Path] = []


def _run(args: list[str], code: str | None) -> Run:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "raysft.train"]
    # No network, ever: fail fast instead. One thread per run: two run at once, beside the other
    # xdist worker's Ray trials, on 2 cores. With torch's default (a thread per core) the
    # diverging run, 13 s alone, once timed out after 180 s there; oversubscription is the
    # likely cause, not a proven one.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    _PROCS.append(proc)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()  # no-op once it has exited
    done = subprocess.CompletedProcess(proc.args, proc.wait(), out, err)
    return done, time.perf_counter() - t0


def start_cli_runs() -> dict[str, Future[Run]]:
    """Start every subprocess run of this module, once."""
    if not _RUNS:
        tmp = Path(tempfile.mkdtemp(prefix="raysft-test-cli-"))
        _TMP.append(tmp)
        jobs = _jobs(tmp)
        pool = ThreadPoolExecutor(2)  # two at a time: the pytest process needs a core too
        _RUNS.update({name: pool.submit(_run, *job) for name, job in jobs.items()})
        pool.shutdown(wait=False)  # the submitted runs go on; nothing else is accepted
    return _RUNS


def stop_cli_runs() -> None:
    """Cancel what has not started, kill what still runs, remove the files (session end)."""
    for future in _RUNS.values():
        future.cancel()
    for proc in _PROCS:
        proc.kill()
    for future in _RUNS.values():
        if not future.cancelled():
            future.exception()  # wait for the thread to collect its process
    for tmp in _TMP:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cli_runs() -> Iterator[dict[str, Future[Run]]]:
    yield start_cli_runs()
    stop_cli_runs()


def result(cli_runs: dict[str, Future[Run]], name: str) -> subprocess.CompletedProcess:
    return cli_runs[name].result()[0]


def user_error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """Exit 2, no traceback, nothing on stdout; returns the stderr lines."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    return proc.stderr.splitlines()


def outputs(proc: subprocess.CompletedProcess) -> list[str]:
    """The stdout of each run of a SEQUENCE process, each of which must have exited 0."""
    assert proc.returncode == 0, proc.stderr
    *runs, rest = proc.stdout.split("=== exit 0\n")
    assert rest == "", proc.stdout
    return runs


DATA_LINE = re.compile(
    r"data: ([\d,]+) training and ([\d,]+) eval examples, ([\d,]+) training tokens "
    r"\(([\d,]+) trained\)"
)


def parse_dry_run(stdout: str) -> tuple[dict[str, Any], int, int, float]:
    """(printed config, trainable, total, percent) from --dry-run output."""
    *config_lines, last, data = stdout.rstrip("\n").split("\n")
    m = PARAMS_LINE.fullmatch(last)
    assert m, last
    # The data read as the run reads it (the embedded default: 800 training rows, 100 eval).
    d = DATA_LINE.fullmatch(data)
    assert d, data
    assert int(d[2]) == 100 and 0 < int(d[4].replace(",", "")) < int(d[3].replace(",", ""))
    trainable, total = (int(g.replace(",", "")) for g in m.groups()[:2])
    return yaml.safe_load("\n".join(config_lines)), trainable, total, float(m[3])


# ---------------------------------------------------------------- user errors


def test_config_with_three_errors_prints_all_three(cli_runs: dict[str, Future[Run]]) -> None:
    path = _TMP[0] / "three.yaml"
    assert sorted(user_error_lines(result(cli_runs, "three_errors"))) == [
        f"error: {path}: lora.r: Input should be greater than 0",
        f"error: {path}: train.learning_rate: Input should be greater than 0",
        f"error: {path}: train.max_stepz: unknown key",
    ]


def test_yaml_syntax_error_is_one_line(cli_runs: dict[str, Future[Run]]) -> None:
    lines = user_error_lines(result(cli_runs, "yaml_syntax"))
    assert len(lines) == 1
    assert lines[0].startswith(
        f"error: {_TMP[0] / 'broken.yaml'}: line 2, column 1: not valid YAML"
    )


def test_bad_set_is_a_user_error(cli_runs: dict[str, Future[Run]]) -> None:
    assert user_error_lines(result(cli_runs, "bad_set")) == [
        f"error: {_TMP[0] / 'ok.yaml'}: --set 'train.max_steps': expected KEY=VALUE (e.g. "
        "train.max_steps=50)"
    ]


def test_a_malformed_set_of_evaluate_names_what_it_overrides(tmp_path: Path) -> None:
    from raysft.errors import ConfigError
    from raysft.evaluate import run

    with pytest.raises(ConfigError) as err:
        run([str(tmp_path), "--set", "foo"])
    assert str(err.value) == (
        f"{tmp_path}: --set 'foo': expected KEY=VALUE (e.g. train.max_steps=50)"
    )


def test_bad_set_does_not_hide_the_files_problems(cli_runs: dict[str, Future[Run]]) -> None:
    path = _TMP[0] / "three2.yaml"
    assert sorted(user_error_lines(result(cli_runs, "bad_set_and_file"))) == [
        f"error: {path}: --set 'noequals': expected KEY=VALUE (e.g. train.max_steps=50)",
        f"error: {path}: lora.r: Input should be greater than 0",
        f"error: {path}: train.learning_rate: Input should be greater than 0",
        f"error: {path}: train.max_stepz: unknown key",
    ]


def test_bad_data_row_exits_2_naming_file_row_and_field(cli_runs: dict[str, Future[Run]]) -> None:
    lines = user_error_lines(result(cli_runs, "bad_row"))
    assert len(lines) == 1
    assert lines[0].startswith(
        f"error: {BAD_ROLE}: line 3: conversations[2].from: unknown role 'bot' (expected one of "
    )


def test_a_diverging_run_stops_with_one_message_and_no_model(
    cli_runs: dict[str, Future[Run]],
) -> None:
    proc = result(cli_runs, "diverges")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    *_, last = proc.stderr.splitlines()
    out = re.fullmatch(
        r"error: training diverged at step (\d) \(train_loss nan, eval_loss nan\) and stopped: "
        r"lower train\.learning_rate \(now 1e\+20\) or raise train\.warmup_ratio \(now 0\)\. "
        r"(\S+) holds config\.yaml and metrics\.json, no model",
        last,
    )
    assert out, last
    step, out_dir = int(out.group(1)), Path(out.group(2))
    # No model; the hidden lock the run held output_dir with stays (as a search's does).
    assert sorted(p.name for p in out_dir.iterdir()) == [LOCK_FILE, "config.yaml", "metrics.json"]
    metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["final"]["diverged_at"] == step < 6
    assert [h["step"] for h in metrics["history"]] == list(range(1, step + 1))


def test_console_script_entry_point_also_hides_tracebacks(
    cli_runs: dict[str, Future[Run]],
) -> None:
    assert user_error_lines(result(cli_runs, "entry_point")) == [
        f"error: {_TMP[0] / 'r0.yaml'}: lora.r: Input should be greater than 0"
    ]


# A new run, and a --resume-from of another run's checkpoint (a resume continues a run in its
# own directory, or a new one, never over another run).
@pytest.mark.parametrize("job", ["held_output_dir", "resume_into_another_run"])
def test_a_run_into_a_held_output_dir_is_refused_before_anything_loads(
    cli_runs: dict[str, Future[Run]], job: str
) -> None:
    held = _TMP[0] / "held"
    assert user_error_lines(result(cli_runs, job)) == [
        f"error: {_TMP[0] / 'held.yaml'}: output_dir: {held} already holds a training run that "
        "ended (its metrics.json); choose another (--set output_dir=...) or remove it"
    ]
    assert sorted(p.name for p in held.iterdir()) == ["checkpoints", "metrics.json"]  # untouched


def test_a_run_into_a_folder_of_other_files_is_refused_and_overwrites_none(
    cli_runs: dict[str, Future[Run]],
) -> None:
    mine = _TMP[0] / "mine"
    assert user_error_lines(result(cli_runs, "foreign_output_dir")) == [
        f"error: {_TMP[0] / 'mine.yaml'}: output_dir: {mine} is not empty (README.md, "
        "config.yaml, x.txt); a run writes its model, tokenizer, config.yaml, metrics.json and "
        "README.md there, over files of the same names: choose a new or empty directory "
        "(--set output_dir=...)"
    ]
    assert (mine / "README.md").read_text(encoding="utf-8") == "my notes\n"
    assert sorted(p.name for p in mine.iterdir()) == ["README.md", "config.yaml", "x.txt"]


def test_an_output_dir_that_is_a_file_is_refused_before_training(
    cli_runs: dict[str, Future[Run]],
) -> None:
    assert user_error_lines(result(cli_runs, "output_dir_a_file")) == [
        f"error: {_TMP[0] / 'to_file.yaml'}: output_dir: {_TMP[0] / 'ok.yaml'} is a file, not a "
        "directory"
    ]


def test_an_output_dir_that_cannot_be_created_is_refused_before_training(
    cli_runs: dict[str, Future[Run]],
) -> None:
    # Not at the first checkpoint, after training up to it: before anything loads.
    proc = result(cli_runs, "output_dir_under_a_file")
    assert user_error_lines(proc) == [
        f"error: {_TMP[0] / 'under.yaml'}: output_dir: {_TMP[0] / 'ok.yaml' / 'o'} cannot be "
        f"created: {_TMP[0] / 'ok.yaml'} is a file"
    ]
    assert "step 1" not in proc.stderr


def test_two_modes_at_once_are_refused(cli_runs: dict[str, Future[Run]]) -> None:
    proc = result(cli_runs, "two_modes")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines()[-1] == (
        "python -m raysft.train: error: --dry-run and --preview do different things: give one"
    )


def test_a_negative_preview_count_is_refused(cli_runs: dict[str, Future[Run]]) -> None:
    proc = result(cli_runs, "negative_preview")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--preview N: N must be >= 0 (got -1)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_json_needs_preview(cli_runs: dict[str, Future[Run]]) -> None:
    proc = result(cli_runs, "json_without_preview")
    assert proc.returncode == 2
    assert "--json needs --preview N" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- --dry-run


def test_dry_run_prints_resolved_config_and_parameter_counts(
    cli_runs: dict[str, Future[Run]],
) -> None:
    proc, seconds = cli_runs["dry_run"].result()
    printed, trainable, total, share = parse_dry_run(outputs(proc)[0])
    # The resolved config as a run saves it: without the qlora section a lora run never reads.
    assert printed == saved_tree(load_config(None)) and "qlora" not in printed
    assert 0 < trainable < total
    assert share == pytest.approx(100 * trainable / total, abs=1e-4)
    assert "ray imported: False" in proc.stderr


def test_dry_run_reflects_set_overrides(cli_runs: dict[str, Future[Run]]) -> None:
    default, overridden = outputs(result(cli_runs, "dry_run"))
    _, default_trainable, default_total, _ = parse_dry_run(default)
    printed, trainable, total, _ = parse_dry_run(overridden)
    assert printed["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert printed["train"]["learning_rate"] == 1e-4
    # q, v instead of q, k, v, o: fewer adapter parameters on the same frozen base
    # ("all params" includes the adapter, as peft counts).
    assert 0 < trainable < default_trainable
    assert total - trainable == default_total - default_trainable


# ---------------------------------------------------------------- --preview


def test_preview_json_lines(cli_runs: dict[str, Future[Run]]) -> None:
    lines = outputs(result(cli_runs, "preview"))[0].splitlines()
    assert len(lines) == 2
    rows = [json.loads(line) for line in lines]
    assert all(set(r) == {"text", "trained", "n_tokens"} for r in rows)
    # The first two rows of chat_zh.jsonl: the seed's Alpaca and ShareGPT examples (chatml).
    assert rows[0]["trained"] == [f"The weather is really nice today.{IM_END}"]
    assert rows[1]["trained"] == [A1 + IM_END, A2 + IM_END]
    assert rows[0]["text"] == (
        "<|im_start|>user\nTranslate the following sentence into English\n\n今天天气真好"
        f"{IM_END}\n<|im_start|>assistant\nThe weather is really nice today.{IM_END}"
    )
    # Byte tokenizer: one token per UTF-8 byte of plain text, one per special token (4 here).
    plain = rows[0]["text"].replace("<|im_start|>", "").replace(IM_END, "")
    assert rows[0]["n_tokens"] == len(plain.encode("utf-8")) + 4


def test_preview_marks_trained_spans(cli_runs: dict[str, Future[Run]]) -> None:
    header, *body = outputs(result(cli_runs, "preview"))[1].rstrip("\n").split("\n")
    m = re.fullmatch(r"--- example 0: (\d+) tokens, (\d+) trained", header)
    assert m, header
    assert int(m[2]) == len("The weather is really nice today.") + 1  # + </s>
    assert "\n".join(body) == (
        "A chat between a curious user and an AI assistant.\n\n"
        "USER: Translate the following sentence into English\n\n今天天气真好\n"
        "ASSISTANT: «The weather is really nice today.</s>»"
    )


def test_an_output_dir_of_hidden_files_or_a_volume_root_counts_as_empty(tmp_path: Path) -> None:
    from raysft.train.run_dir import check_output_dir

    out = tmp_path / "out"
    (out / "lost+found").mkdir(parents=True)
    (out / ".gitkeep").write_text("", encoding="utf-8")
    check_output_dir(load_config(None, {"output_dir": str(out)}), "c.yaml", resuming=None)


def test_dry_run_counts_the_rows_and_samples_a_run_would_drop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from raysft.train.__main__ import _dry_run

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)]
    rows += [{"instruction": "x" * 300, "output": "y"}]  # its prompt fills max_seq_len
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = load_config(
        None,
        {"data.train": str(tmp_path / "t.jsonl"), "data.eval": None, "data.eval_fraction": 0.2,
         "data.on_error": "skip", "data.max_seq_len": 128, "train.seed": 0},
    )  # fmt: skip
    assert _dry_run(cfg, "c.yaml") == 0
    data, skipped, dropped = capsys.readouterr().out.rstrip("\n").split("\n")[-3:]
    assert data.endswith(", 1 rows skipped, 1 samples dropped (truncated to nothing to train)")
    assert skipped.startswith(f"  first skipped: {tmp_path / 't.jsonl'}: line 8: not valid JSON")
    assert dropped == (
        f"  first dropped: {tmp_path / 't.jsonl'}: line 7: its prompt fills all "
        "data.max_seq_len=128 tokens, nothing left to train"
    )


@pytest.mark.parametrize(
    ("checkpointed", "stop"),
    [(True, "SIGINT"), (False, "SIGINT"), (True, "SIGTERM"), (True, "SIGHUP")],
)
def test_ctrl_c_says_what_is_left_and_how_to_continue(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    checkpointed: bool,
    stop: str,
) -> None:
    """Ctrl-C, and kill / docker stop / Slurm (SIGTERM) or a closed terminal (SIGHUP) alike."""
    from raysft.config import dump_config
    from raysft.train import recipe
    from raysft.train.__main__ import _train
    from raysft.train.run_dir import check_output_dir

    out = tmp_path / "out"
    cfg = load_config(None, {"output_dir": str(out), "train.eval_every": 5})
    stopped = stopped_by(stop, "the run")

    def interrupted(cfg: Any, *, report: Any, resume_from: str | None, shared: Any) -> None:
        if checkpointed:  # the checkpoint of step 5, as the run hands it over
            written = tmp_path / "written"
            written.mkdir()
            (written / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
            report({"step": 5}, str(written))
        stopped()

    monkeypatch.setattr(recipe, "run_trial", interrupted)
    exit_code_of_a_stop(lambda: _train(cfg, None))
    said = capsys.readouterr().err
    if not checkpointed:
        assert said == (
            f"interrupted: no checkpoint was written yet under {out / 'checkpoints'} (the first "
            "comes at step 5); start again with the same command\n"
        )
        return
    kept = out / "checkpoints" / "step-000005"
    assert said == (
        f"interrupted: the newest checkpoint is {kept}; continue from it with: "
        f"python -m raysft.train {kept / 'config.yaml'} --resume-from {kept}\n"
    )
    # The command's config is the run's own, and its output_dir takes the resume.
    again = load_config(kept / "config.yaml", authored=True)
    assert again == cfg
    check_output_dir(again, str(kept / "config.yaml"), resuming=str(kept))


@pytest.mark.parametrize("stop", STOPS)
def test_a_stop_before_training_begins_is_said_and_leaves_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stop: str,
) -> None:
    """A kill while the model and data are checked, before the first step: said as Ctrl-C is,
    not a silent exit 143, and no output folder is left."""
    import raysft.train.__main__ as cli

    out = tmp_path / "out"
    monkeypatch.setattr(cli, "_check_model", stopped_by(stop, "the run"))
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {out}\n", encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["raysft.train", str(config)])
    exit_code_of_a_stop(cli._main)
    assert capsys.readouterr().err == "interrupted\n"
    assert not out.exists()


def _checkpoint_at(out: Path, step: int, cfg: Any) -> Path:
    """A checkpoint of ``cfg``'s run at ``step``: config.yaml and a training state holding its
    progress (all ``--resume-from``'s checks before the model loads read)."""
    import torch

    from raysft.config import dump_config

    ckpt = out / "checkpoints" / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / "config.yaml").write_text(dump_config(cfg), encoding="utf-8")
    torch.save({"progress": {"step": step}}, ckpt / "training_state.pt")
    return ckpt


def test_a_run_folder_moved_since_its_checkpoint_is_continued_where_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The printed command's config.yaml names the folder the run was in when the checkpoint
    was written; moved (or copied) since, the resume goes on where the checkpoint is, not at
    the old path (gone, or another run's). An output_dir given anew is kept."""
    from raysft.train.__main__ import _follow_a_moved_run
    from raysft.train.run_dir import check_output_dir

    old = tmp_path / "M1"
    cfg = load_config(None, {"output_dir": str(old)})
    ckpt = _checkpoint_at(tmp_path / "M2", 2, cfg)  # M1's checkpoint, in its new place
    resumed = _follow_a_moved_run(load_config(ckpt / "config.yaml"), str(ckpt))
    assert resumed.output_dir == str(tmp_path / "M2")
    assert capsys.readouterr().err == (
        f"note: {ckpt} was written by a run in {old}; it is continued where the checkpoint is, "
        f"in {tmp_path / 'M2'} (--set output_dir=... for another folder)\n"
    )
    check_output_dir(resumed, "c.yaml", resuming=str(ckpt))  # its own folder: taken
    elsewhere = load_config(ckpt / "config.yaml", {"output_dir": str(tmp_path / "new")})
    assert _follow_a_moved_run(elsewhere, str(ckpt)).output_dir == str(tmp_path / "new")
    in_place = _checkpoint_at(old, 2, cfg)  # not moved: nothing changes
    assert _follow_a_moved_run(load_config(in_place / "config.yaml"), str(in_place)) == cfg


@pytest.mark.parametrize(("step", "ended"), [(4, True), (4, False), (2, True)])
def test_resuming_a_finished_run_is_refused_and_rewrites_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    step: int,
    ended: bool,
) -> None:
    """``ended``: output_dir holds the run's metrics.json. A last checkpoint without it (a run
    stopped before it wrote its outputs) is resumed to write them, and says so. An earlier
    checkpoint of a run that ended (diverged after it) is refused there: resumed, it wrote over
    the record of how the run ended."""
    import logging

    from raysft.cli import run_cli
    from raysft.train import __main__ as train_main

    out = tmp_path / "out"
    cfg = load_config(None, {"output_dir": str(out), "train.max_steps": 4, "train.eval_every": 2})
    ckpt = _checkpoint_at(out, step, cfg)
    if ended:
        (out / "metrics.json").write_text("{}\n", encoding="utf-8")
    trained: list[str | None] = []
    monkeypatch.setattr(
        train_main, "_train", lambda cfg, resume, shared=None: trained.append(resume) or 0
    )
    argv = ["raysft.train", str(ckpt / "config.yaml"), "--resume-from", str(ckpt)]
    monkeypatch.setattr(sys, "argv", argv)
    with caplog.at_level(logging.INFO, logger="raysft.train"), pytest.raises(SystemExit) as done:
        run_cli(train_main._main)
    if step == 4 and ended:
        assert done.value.code == 2 and trained == []
        assert capsys.readouterr().err == (
            f"error: --resume-from: {ckpt}: the run already finished at step 4 (train.max_steps) "
            f"and {out} holds its outputs: nothing is left to train. A longer run starts anew, "
            "since train.max_steps shapes the learning-rate schedule (--set output_dir=... "
            "--set train.max_steps=..., or train.epochs=... where the config gives epochs)\n"
        )
        assert (out / "metrics.json").read_text(encoding="utf-8") == "{}\n"
        return
    if ended:
        assert done.value.code == 2 and trained == []
        assert capsys.readouterr().err == (
            f"error: {ckpt / 'config.yaml'}: output_dir: {out} holds a run that ended (its "
            f"metrics.json): resuming {ckpt} there would write over its record; resume into "
            "another directory (--set output_dir=...)\n"
        )
        assert (out / "metrics.json").read_text(encoding="utf-8") == "{}\n"
        return
    assert done.value.code == 0 and trained == [str(ckpt)]
    said = [r.getMessage() for r in caplog.records if "nothing is left" in r.getMessage()]
    assert said == (
        [f"{ckpt} is the run's last step (train.max_steps=4): nothing is left to train; writing "
         f"its outputs to {out}"]
        if step == 4
        else []
    )  # fmt: skip


@pytest.mark.parametrize("ended", [True, False])
def test_a_held_output_dir_is_said_to_be_ended_or_continuable(tmp_path: Path, ended: bool) -> None:
    from raysft.errors import ConfigError
    from raysft.train.run_dir import check_output_dir
    from raysft.train.state import STATE_FILE

    out = tmp_path / "out"
    kept = out / "checkpoints" / "step-000002"
    kept.mkdir(parents=True)
    (kept / STATE_FILE).write_bytes(b"state")
    if ended:
        (out / "metrics.json").write_text("{}\n", encoding="utf-8")
    cfg = load_config(None, {"output_dir": str(out)})
    with pytest.raises(ConfigError) as err:
        check_output_dir(cfg, "c.yaml", resuming=None)
    assert err.value.problems == [
        f"output_dir: {out} already holds a training run that ended (its metrics.json); choose "
        "another (--set output_dir=...) or remove it"
        if ended
        else f"output_dir: {out} already holds an unfinished training run (a checkpoint, no "
        f"metrics.json); continue it: --resume-from {kept}, or choose another "
        "(--set output_dir=...) or remove it"
    ]
    if ended:
        return
    # Its newest checkpoint's state gone: the one before is named, not one a resume refuses.
    newest = out / "checkpoints" / "step-000004"
    newest.mkdir()
    with pytest.raises(ConfigError) as err:
        check_output_dir(cfg, "c.yaml", resuming=None)
    assert err.value.problems == [
        f"output_dir: {out} already holds an unfinished training run (a checkpoint, no "
        f"metrics.json) (step-000004 has no {STATE_FILE}); continue it: --resume-from {kept}, "
        "or choose another (--set output_dir=...) or remove it"
    ]
    (kept / STATE_FILE).unlink()
    with pytest.raises(ConfigError) as err:
        check_output_dir(cfg, "c.yaml", resuming=None)
    assert err.value.problems == [
        f"output_dir: {out} already holds an unfinished training run (a checkpoint, no "
        f"metrics.json) (step-000004 has no {STATE_FILE}); none can be resumed: choose another "
        "(--set output_dir=...) or remove it"
    ]


def test_a_run_into_an_output_dir_another_run_holds_is_refused(tmp_path: Path) -> None:
    """Two runs into one output_dir (or two resumes of one checkpoint) would pass its checks
    and write over each other's checkpoints: the second is told the first holds it, before its
    checkpoints could read as a run to continue; once the first ends, the directory is free."""
    from lockkit import held_elsewhere

    from raysft.errors import ConfigError
    from raysft.train.run_dir import check_output_dir, hold_output_dir

    out = tmp_path / "out"
    out.mkdir()
    cfg = load_config(None, {"output_dir": str(out)})
    with held_elsewhere(out) as first:  # the first run
        (out / "checkpoints" / "step-000002").mkdir(parents=True)  # the first run's, so far
        for check in (
            lambda: check_output_dir(cfg, "c.yaml", resuming=None),
            lambda: hold_output_dir(cfg, "c.yaml"),
        ):
            with pytest.raises(ConfigError) as err:
                check()
            assert err.value.problems[0].startswith(
                f"output_dir: {out.resolve()} is in use by another training run (pid {first} "
            ), err.value.problems
    with hold_output_dir(cfg, "c.yaml"):  # free again
        pass


@pytest.mark.parametrize(
    "case", ["resumable", "other_config", "other_data", "other_tokens", "finished"]
)
def test_a_dry_run_checks_a_resume_as_it_would_start(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    """``--dry-run --resume-from``: the checkpoint, the config against it and the data's bytes
    are checked as the resume would (an error, exit 2), and nothing trains."""
    import json

    from raysft.cli import run_cli
    from raysft.data.digest import DATA_FILE, TOKENS, data_digests
    from raysft.train import __main__ as train_main

    out = tmp_path / "out"
    cfg = load_config(None, {"output_dir": str(out), "train.max_steps": 4, "train.eval_every": 2})
    ckpt = _checkpoint_at(out, 4 if case == "finished" else 2, cfg)
    digests = data_digests(cfg.data)
    if case == "other_data":
        source = next(iter(digests["train"]))
        digests["train"][source] = "0" * 64
    if case == "other_tokens":  # the same bytes, tokenized to other ids back then
        digests[TOKENS] = {"train": "1" * 64, "eval": "2" * 64}
    (ckpt / DATA_FILE).write_text(json.dumps(digests), encoding="utf-8")
    if case == "finished":
        (out / "metrics.json").write_text("{}\n", encoding="utf-8")
    monkeypatch.setattr(train_main, "_train", lambda *a: pytest.fail("a dry run trained"))
    argv = ["raysft.train", str(ckpt / "config.yaml"), "--dry-run", "--resume-from", str(ckpt)]
    if case == "other_config":
        argv += ["--set", "train.learning_rate=0.5"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        run_cli(train_main._main)
    printed = capsys.readouterr()
    if case == "other_config":
        assert done.value.code == 2 and "train.learning_rate" in printed.err
        return
    if case == "other_data":
        assert done.value.code == 2
        assert "the data differs from what its run trained on" in printed.err
        assert f"data.train: {source} changed since" in printed.err
        return
    if case == "other_tokens":
        assert done.value.code == 2
        assert "the data tokenizes to other ids than its run trained on" in printed.err
        assert "data.train: the same rows tokenize to other ids now (sha256 111111111111 then" in (
            printed.err
        )
        assert "data.eval: the same rows tokenize to other ids now (sha256 222222222222" in (
            printed.err
        )
        return
    assert done.value.code == 0, printed.err
    step = 4 if case == "finished" else 2
    assert f"resume: from step {step} of 4, in {out}\n" in printed.out
    refused = [line for line in printed.out.splitlines() if line.startswith("note:")]
    if case == "finished":
        assert len(refused) == 1 and "the run already finished at step 4" in refused[0]
    else:
        assert refused == []


def test_a_dry_run_gives_the_first_skipped_row_and_the_eval_rows_sampled_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Counts alone do not say what to fix, nor that data.max_eval_samples left rows out."""
    from raysft.train.__main__ import _dry_run

    rows = tmp_path / "rows.jsonl"
    good = [json.dumps({"instruction": f"Say {i}.", "output": str(i)}) for i in range(12)]
    rows.write_text("\n".join([*good[:3], "{oops", *good[3:]]) + "\n", encoding="utf-8")
    cfg = load_config(None, {
        "data.train": str(rows), "data.eval": None, "data.eval_fraction": 0.5,
        "data.on_error": "skip", "data.max_eval_samples": 2, "output_dir": str(tmp_path / "o"),
    })  # fmt: skip
    assert _dry_run(cfg, "c.yaml") == 0
    out = capsys.readouterr().out.splitlines()
    data = next(line for line in out if line.startswith("data: "))
    assert data.startswith(
        "data: 6 training and 2 eval examples (picked from 6 held-out rows: "
        "data.max_eval_samples), "
    ), data
    assert data.endswith(", 1 rows skipped")
    first = out[out.index(data) + 1]
    assert first == f"  first skipped: {rows}: line 4: not valid JSON: " + (
        "Expecting property name enclosed in double quotes at column 2"
    )


def test_a_dry_run_refuses_eval_prompts_that_all_fill_max_seq_len(tmp_path: Path) -> None:
    """The run's own check before its model loads: nothing for generation to score."""
    from raysft.train.__main__ import _dry_run

    evals = tmp_path / "long.jsonl"
    evals.write_text(json.dumps({"messages": LONG_HISTORY}) + "\n", encoding="utf-8")
    cfg = load_config(None, {"data.eval": str(evals), "data.max_seq_len": 96,
                             "output_dir": str(tmp_path / "o")})  # fmt: skip
    with pytest.raises(DataError, match=r"^c\.yaml: data\.eval: every one of the 1 eval rows"):
        _dry_run(cfg, "c.yaml")


def test_a_run_refused_for_its_data_leaves_no_output_dir_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The data is read once the run holds its output_dir: refused there, the directories the
    run made (and its lock file) went on existing, half-made."""
    from raysft.cli import run_cli
    from raysft.train import __main__ as train_main

    out = tmp_path / "new" / "run"
    missing = tmp_path / "nope.jsonl"
    argv = ["raysft.train", str(ROOT / "search_spaces" / "lora.yaml"),
            "--set", f"output_dir={out}", "--set", f"data.eval={missing}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        run_cli(train_main._main)
    assert done.value.code == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_resume_from_another_directory_continues_where_the_run_is_without_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run wrote output_dir 'out' from tmp/dwork; resumed from tmp, it goes on in
    tmp/dwork/out, where it is. The note said it had been written in tmp/out (moved)."""
    import json

    from raysft.paths import ORIGIN_FILE
    from raysft.train.__main__ import _follow_a_moved_run

    work = tmp_path / "dwork"
    ckpt = _checkpoint_at(work / "out", 2, load_config(None, {"output_dir": "out"}))
    (ckpt / ORIGIN_FILE).write_text(json.dumps({"working_dir": str(work)}), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    resumed = _follow_a_moved_run(load_config(ckpt / "config.yaml"), str(ckpt))
    assert resumed.output_dir == str(work / "out")
    assert capsys.readouterr().err == ""


def test_a_run_that_loses_the_race_for_a_new_output_dir_removes_nothing_of_the_winners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs into one new output_dir: the second finds it held once it tries to hold it.
    Refused, it must leave the first run's folder and lock file alone."""
    import contextlib

    from lockkit import held_elsewhere

    from raysft.cli import run_cli
    from raysft.paths import LOCK_FILE
    from raysft.train import __main__ as train_main
    from raysft.train import run_dir

    out = tmp_path / "new" / "run"
    real = run_dir.hold_output_dir
    with contextlib.ExitStack() as stack:

        def first_run_wins(cfg: Any, source: str) -> Any:
            out.mkdir(parents=True)
            stack.enter_context(held_elsewhere(out))
            return real(cfg, source)

        monkeypatch.setattr(train_main, "hold_output_dir", first_run_wins)
        argv = ["raysft.train", str(ROOT / "search_spaces" / "lora.yaml"), "--set",
                f"output_dir={out}"]  # fmt: skip
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as done:
            run_cli(train_main._main)
        assert done.value.code == 2
        assert (out / LOCK_FILE).is_file()


def test_a_commands_exit_skips_the_teardowns_cycle_search_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    """``run_command`` (every command's entry point) freezes the objects out of the garbage
    collector before Python's teardown; the exit code, the atexit handlers (logging's flush
    among them) and what is printed all stay as they were."""
    script = tmp_path / "command.py"
    script.write_text(
        "import atexit, gc, logging, sys\n"
        "from raysft.cli import run_command\n"
        f"logging.basicConfig(filename={str(tmp_path / 'log.txt')!r}, level=logging.INFO)\n"
        "atexit.register(lambda: print('at exit: frozen', gc.get_freeze_count() > 0))\n"
        "def main():\n"
        "    logging.getLogger('command').info('logged')\n"
        "    print('done', end='')  # no newline: flushed at exit\n"
        "    return 3\n"
        "run_command(main)\n",
        encoding="utf-8",
    )
    ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 3, ran.stderr
    assert ran.stdout == "doneat exit: frozen True\n", ran.stdout
    assert "logged" in (tmp_path / "log.txt").read_text(encoding="utf-8")
