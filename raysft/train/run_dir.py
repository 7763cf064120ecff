"""A training run's output directory: another run's outputs or files refused
(``check_output_dir``), a resume of a run folder that moved since followed
(``moved_run``), a finished run's last checkpoint told apart (``nothing_left``), the
lock held while the run writes (``hold_output_dir``), and what a run stopped by Ctrl-C leaves
(``interrupted_note``).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from raysft.config import Config, load_config
from raysft.errors import ConfigError


def interrupted_note(cfg: Config, kept: Path | None, *, resume_from: str | None) -> str:
    """What a run stopped by Ctrl-C leaves and how to continue it. The checkpoint's config.yaml
    is the run's resolved config (every --set in it), and its relative paths are read from
    the working directory, as the run read them: the command works from here."""
    if kept is None:
        from raysft.train.state import checkpoint_step

        again = f" (--resume-from {shlex.quote(resume_from)})" if resume_from else ""
        start = checkpoint_step(resume_from) if resume_from else 0
        every = cfg.train.eval_every
        first = min((start // every + 1) * every, cfg.train.max_steps)
        return (
            f"no checkpoint was written yet under {Path(cfg.output_dir) / 'checkpoints'} (the "
            f"first comes at step {first}); start again with the same command{again}"
        )
    ckpt = shlex.quote(str(kept))
    return (
        f"the newest checkpoint is {kept}; continue from it with: python -m raysft.train "
        f"{shlex.quote(str(kept / 'config.yaml'))} --resume-from {ckpt}"
    )


def nothing_left(cfg: Config, checkpoint: str) -> bool:
    """Whether ``checkpoint`` is its run's last (step train.max_steps): resuming it trains
    nothing and only writes the run's outputs, which a run stopped after its last checkpoint
    lacks. Refused where output_dir holds them already: they would be rewritten for nothing."""
    from raysft.train.state import checkpoint_step

    step = checkpoint_step(checkpoint)
    if step < cfg.train.max_steps:
        return False
    out = Path(cfg.output_dir)
    if (out / "metrics.json").exists():
        raise ConfigError(
            "--resume-from",
            [f"{checkpoint}: the run already finished at step {step} (train.max_steps) and "
             f"{out} holds its outputs: nothing is left to train. A longer run starts anew, "
             "since train.max_steps shapes the learning-rate schedule (--set output_dir=... "
             "--set train.max_steps=..., or train.epochs=... where the config gives epochs)"],
        )  # fmt: skip
    return True


def _last_step(cfg: Config, checkpoint: str) -> bool:
    from raysft.train.state import checkpoint_step

    return checkpoint_step(checkpoint) >= cfg.train.max_steps


def moved_run(cfg: Config, checkpoint: str) -> tuple[Path, Path] | None:
    """(the folder the run was in, the folder its checkpoint lies in now) for a resume of
    ``checkpoint`` (RUN/checkpoints/step-N) whose run folder moved or was copied since, or
    whose relative output_dir is read from another directory than the run's: its config.yaml,
    the printed command's, names the old output_dir, and the run goes on where the checkpoint
    is, not at the old path (gone, or another run's). None where output_dir is the checkpoint's
    run folder already, or was given anew (--set)."""
    from raysft.train.resume_checks import origin_dir
    from raysft.train.state import CONFIG_FILE

    ckpt = Path(checkpoint).resolve()
    saved = ckpt / CONFIG_FILE
    if ckpt.parent.name != "checkpoints" or not saved.is_file():
        return None  # check_resumable says what is wrong with it
    saved_out, run_dir = load_config(saved).output_dir, ckpt.parent.parent
    if Path(cfg.output_dir).resolve() == run_dir or cfg.output_dir != saved_out:
        return None  # there already, or output_dir given anew (--set)
    # A relative output_dir was the run's, from where it started (its origin.json), not ours:
    # resumed from another directory, the run is where it was (then == run_dir).
    return (Path(origin_dir(ckpt)) / saved_out).resolve(), run_dir


def check_output_dir(cfg: Config, source: str, *, resuming: str | None) -> None:
    """Refuse to train over a previous run's outputs or other files: a re-run would overwrite
    them (and collide with its checkpoint). ``--resume-from`` (``resuming``) continues a run in
    its own directory (OUTPUT_DIR/checkpoints/step-N), or into a new or empty one; another
    run's directory is refused as ever. Either way output_dir must be a directory, not a
    file."""
    from raysft.paths import dir_holder, writable_dir_problem

    out = Path(cfg.output_dir)
    unusable = writable_dir_problem(out)
    if unusable:
        raise ConfigError(source, [f"output_dir: {unusable}"])
    holder = dir_holder(out)
    if holder:  # said first: its checkpoints would read as a run to continue
        raise _in_use(source, out, holder)
    if resuming is not None and Path(resuming).resolve().parent.parent == out.resolve():
        if (out / "metrics.json").exists() and not _last_step(cfg, resuming):
            # Ended (diverged, most often) past this checkpoint: a resume there would write
            # over the record of how it ended. The last checkpoint is nothing_left's to judge.
            raise ConfigError(
                source,
                [
                    f"output_dir: {out.resolve()} holds a run that ended (its metrics.json): "
                    f"resuming {resuming} there would write over its record; resume into "
                    "another directory (--set output_dir=...)"
                ],
            )
        return
    kept = sorted((out / "checkpoints").glob("step-*"))
    if (out / "metrics.json").exists():
        # Written when a run ends (finished or diverged): its checkpoint has nothing to continue.
        raise ConfigError(
            source,
            [
                f"output_dir: {out.resolve()} already holds a training run that ended (its "
                "metrics.json); choose another (--set output_dir=...) or remove it"
            ],
        )
    if kept:
        from raysft.train.state import STATE_FILE

        # The newest a resume takes: one whose training state is gone (deleted, a copy cut
        # short) would only be refused in turn.
        whole = [k for k in kept if (k / STATE_FILE).is_file()]
        how = f"continue it: --resume-from {whole[-1]}, or" if whole else "none can be resumed:"
        broken = f" ({kept[-1].name} has no {STATE_FILE})" if kept[-1] not in whole else ""
        raise ConfigError(
            source,
            [
                f"output_dir: {out.resolve()} already holds an unfinished training run (a "
                f"checkpoint, no metrics.json){broken}; {how} choose another "
                "(--set output_dir=...) or remove it"
            ],
        )
    # Hidden files (.gitkeep, .DS_Store, .nfs*) and a volume root's lost+found are no one's run,
    # nor a checkpoints/ folder a run stopped in before its first checkpoint was in (only the
    # hidden staging folder of one, or nothing).
    ckpts = out / "checkpoints"
    unused = ckpts.is_dir() and all(p.name.startswith(".") for p in ckpts.iterdir())
    ignored = ("lost+found", "checkpoints") if unused else ("lost+found",)
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    others = [n for n in names if not n.startswith(".") and n not in ignored]
    if others:
        # The run writes config.yaml, README.md (peft's model card), the weights and the
        # tokenizer's files there, over any of the same names.
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        raise ConfigError(
            source,
            [
                f"output_dir: {out.resolve()} is not empty ({shown}); a run writes its model, "
                "tokenizer, config.yaml, metrics.json and README.md there, over files of the "
                "same names: choose a new or empty directory (--set output_dir=...)"
            ],
        )


def _in_use(source: str, out: Path, holder: str) -> ConfigError:
    return ConfigError(
        source,
        [
            f"output_dir: {out.resolve()} is in use by another training run ({holder}); wait "
            "for it to end, or choose another (--set output_dir=...)"
        ],
    )


def hold_output_dir(cfg: Config, source: str) -> Any:
    """An exclusive lock on output_dir while the run writes there: two runs started into one
    directory (or two resumes of one checkpoint) would both pass its checks and write over each
    other's checkpoints and outputs."""
    from raysft.paths import InUse, hold_dir

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return hold_dir(out, what="training run")
    except InUse as err:
        raise _in_use(source, out, err.holder) from None
