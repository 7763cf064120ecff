"""python -m raysft.bench --preset cpu|gpu [--contenders a,b] [--dry-run]

Runs each contender of the preset in its own subprocess, one after another, then prints the
table, writes the results JSON and appends a dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from raysft.bench import report
from raysft.bench.presets import PRESETS, Contender, Preset

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysft.bench", description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--contenders", help="comma-separated names (default: the preset's list)")
    p.add_argument("--steps", type=int, help="override the preset's optimizer steps")
    p.add_argument("--rows", type=int, help="override the preset's training rows")
    p.add_argument("--eval-rows", type=int, help="override the preset's held-out rows")
    p.add_argument("--threads", type=int, help="override the preset's torch threads")
    p.add_argument("--workdir", default="runs/bench", help="models, logs and per-contender output")
    p.add_argument(
        "--out", help="results JSON (benchmarks/bench-PRESET.json; WORKDIR/ with --no-record)"
    )
    p.add_argument("--results-md", default=str(DEFAULT_RESULTS), help="RESULTS.md to append to")
    p.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--note", default="", help="a line recorded with the results")
    p.add_argument("--timeout", type=int, default=900, help="seconds per contender")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every contender, each round after the first in a shuffled order and "
        "with the next training seed (same rows); a contender's row is its median run by real "
        "tok/s (this VM's speed drifts between runs), its held-out loss the mean over rounds",
    )
    p.add_argument("--list", action="store_true", help="list contenders and experiments")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan, build each model on meta"
    )
    return p


def _needs(c: Contender) -> list[str]:
    return ["trl", "datasets"] if c.family == "trl" else []


def plan_lines(preset: Preset, contenders: list[Contender]) -> list[str]:
    lines = [
        f"preset {preset.name} on {preset.device}: {preset.rows} rows ({preset.eval_rows} held "
        f"out), micro-batch {preset.batch_size}, max length {preset.max_len}, {preset.steps} "
        f"steps, threads {preset.threads or 'default'}"
    ]
    for c in contenders:
        o = c.options
        shape = f"model {o.get('model', 'base')}, method {o.get('method', 'full')}"
        extra = {
            k: o[k] for k in ("batch_size", "max_len", "steps") if k in o
        }  # a memory check's own shape
        lines.append(f"  {c.name:24s} [{c.family}] {shape} {extra or ''} {c.note}".rstrip())
    return lines


def _model_config(spec: Any) -> Any:
    from transformers import AutoConfig

    from raysft.assets import resolve

    if isinstance(spec, str):
        return AutoConfig.from_pretrained(resolve(spec))
    return AutoConfig.for_model(**spec)


def dry_run(preset: Preset, contenders: list[Contender]) -> list[dict[str, Any]]:
    """Build every contender's model (and adapter) on the meta device: shapes and counts, no
    weights, no quantization (4-bit counts are logical, as peft reports them)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from raysft.bench.contenders import _lora_config

    out = []
    for c in contenders:
        cfg = _model_config(preset.models[c.options.get("model", "base")])
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
            if c.options.get("method", "full") != "full":
                model = get_peft_model(model, _lora_config(c.options))
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if c.options.get("method", "full") != "full":
            trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        out.append(
            {
                "name": c.name,
                "layers": cfg.num_hidden_layers,
                "hidden": cfg.hidden_size,
                "vocab": cfg.vocab_size,
                "params": total,
                "trainable": trainable,
            }
        )
    return out


def _run_child(spec: dict[str, Any], workdir: Path, tag: str, timeout: int, threads: int | None):
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.out.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    out_path.unlink(missing_ok=True)
    # One inductor cache per benchmark run: torch.compile's step 1 is a cold compile.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "inductor-cache"))
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "raysft.bench.child", str(spec_path), str(out_path)]
    with (workdir / f"{tag}.log").open("w") as log:
        try:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"name": tag, "error": f"timed out after {timeout} s"}
    if not out_path.exists():
        return {"name": tag, "error": f"no output (see {workdir / (tag + '.log')})"}
    return json.loads(out_path.read_text(encoding="utf-8"))


def prepare_models(
    preset: Preset, contenders: list[Contender], workdir: Path, timeout: int
) -> dict[str, str]:
    """Model dirs by key: a copy of an embedded model (own chat template), or random weights
    of a config's shape written by a subprocess on the preset's device."""
    from raysft.assets import resolve
    from raysft.bench.data import copy_model_dir

    dirs: dict[str, str] = {}
    for key in sorted({c.options.get("model", "base") for c in contenders}):
        spec, target = preset.models[key], workdir / "models" / key
        if isinstance(spec, str):
            dirs[key] = str(copy_model_dir(Path(resolve(spec)), target))
            continue
        if not (target / "config.json").exists():
            job = {"config": spec, "dir": str(target), "device": preset.device, "seed": 0}
            res = _run_child({"write_model": job}, workdir, f"model-{key}", timeout, None)
            if "error" in res:
                raise RuntimeError(f"writing model {key}: {res['error']}")
        dirs[key] = str(target)
    return dirs


def _preset(args: argparse.Namespace) -> Preset:
    """The named preset with the command line's overrides (steps, rows, eval rows, threads)."""
    return PRESETS[args.preset].with_overrides(
        steps=args.steps, rows=args.rows, eval_rows=args.eval_rows, threads=args.threads
    )


def run(args: argparse.Namespace, argv: list[str], out: Path) -> dict[str, Any]:
    """Every contender in turn; the results JSON is rewritten after each (a cut-off run keeps
    what it measured)."""
    preset = _preset(args)
    names = args.contenders.split(",") if args.contenders else None
    contenders = preset.select(names)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for line in plan_lines(preset, contenders):
        print(line, flush=True)
    shutil.rmtree(workdir / "inductor-cache", ignore_errors=True)
    model_dirs = prepare_models(preset, contenders, workdir, args.timeout)
    given = (("steps", args.steps), ("rows", args.rows), ("eval_rows", args.eval_rows),
             ("threads", args.threads))  # fmt: skip
    overrides = {k: v for k, v in given if v is not None}
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
    shuffle = random.Random(0)
    for round_ in range(max(args.repeat, 1)):
        order = list(contenders)
        if round_:
            shuffle.shuffle(order)  # no contender always runs first, or after a given other one
        for c in order:
            seed = preset.seed + round_
            # Every run compiles cold: a cache left by an earlier round hides the compile.
            shutil.rmtree(workdir / "inductor-cache", ignore_errors=True)
            row = _run_contender(c, preset, workdir, model_dirs, overrides, args.timeout, seed)
            runs[c.name].append(row)
            status = row.get("error") or f"{row.get('tokens_per_s') or 0:,.0f} real tok/s"
            print(f"  done {c.name}: {status}", flush=True)
            rows = [median_run(runs[c.name]) for c in contenders if runs[c.name]]
            out.write_text(json.dumps(_result(args, argv, preset, rows), indent=2), "utf-8")
    rows = [median_run(runs[c.name]) for c in contenders]
    return _result(args, argv, preset, rows)


def _run_contender(
    c: Contender,
    preset: Preset,
    workdir: Path,
    model_dirs: dict[str, str],
    overrides: dict[str, Any],
    timeout: int,
    train_seed: int,
) -> dict[str, Any]:
    missing = [m for m in _needs(c) if importlib.util.find_spec(m) is None]
    if missing:
        row = {"name": c.name, "error": f"skipped: {', '.join(missing)} not installed"}
    else:
        t0 = time.perf_counter()
        spec = {"preset": preset.name, "contender": c.name, "overrides": overrides,
                "workdir": str(workdir), "model_dirs": model_dirs,
                "train_seed": train_seed}  # fmt: skip
        row = _run_child(spec, workdir, c.name, timeout, preset.threads)
        row["process_s"] = round(time.perf_counter() - t0, 1)
    row.setdefault("note", c.note)
    return row


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A contender's row over its runs (one per training seed): the median run by real tok/s
    (the lower middle one of an even count; its seed stays ``train_seed``) with every run's
    tok/s and seed (``runs_tokens_per_s``, ``train_seeds``, in round order), and the held-out
    and final train losses averaged over the runs; the first error when no run measured."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r.get("tokens_per_s") or 0)
    if not ok:
        return runs[0]
    row = dict(ok[(len(ok) - 1) // 2])
    if len(runs) > 1:
        row["runs_tokens_per_s"] = [r.get("tokens_per_s") for r in runs]
        row["train_seeds"] = [r.get("train_seed") for r in runs]  # train_seed: the median run's
        for key in ("eval_loss", "final_train_loss"):
            values = [r[key] for r in runs if "error" not in r and r.get(key) is not None]
            if values:
                row[f"runs_{key}"] = values
                row[key] = sum(values) / len(values)
        speeds = ", ".join(f"{r['tokens_per_s']:,.0f}" for r in ok)
        losses = ", ".join(f"{v:.4f}" for v in row.get("runs_eval_loss", []))
        failed = len(runs) - len(ok)
        row["note"] = (f"{row.get('note', '')} (median of {len(ok)} runs: {speeds} tok/s; "
                       f"held-out loss the mean of {losses}"
                       f"{f'; {failed} failed' if failed else ''})").strip()  # fmt: skip
    return row


def _result(args: Any, argv: list[str], preset: Preset, rows: list[dict[str, Any]]) -> dict:
    from raysft.bench.data import eval_examples, length_summary, train_eval_rows
    from raysft.bench.measure import WARMUP_STEPS, machine, versions

    report.add_ratios(rows)
    train_rows, _ = train_eval_rows(preset.rows, preset.eval_rows, seed=preset.seed)
    data: dict[str, Any] = {"rows": preset.rows, "eval_rows": preset.eval_rows}
    data["seed"] = preset.seed
    try:
        from transformers import AutoTokenizer

        from raysft.assets import resolve

        tok = AutoTokenizer.from_pretrained(resolve("embedded:tiny-base"))
        data.update(length_summary(eval_examples(train_rows, tok, max_len=preset.max_len)))
    except ImportError:
        pass
    return {
        "date": report.today(),
        "preset": preset.name,
        "command": "python -m raysft.bench " + " ".join(shlex.quote(a) for a in argv),
        "note": args.note,
        "machine": machine(),
        "versions": versions(),
        "settings": {
            "batch_size": preset.batch_size,
            "max_len": preset.max_len,
            "steps": preset.steps,
            "threads": preset.threads,
            "warmup_steps": min(WARMUP_STEPS, max(preset.steps // 4, 1)),  # as child.py
        },
        "data": data,
        "rows": rows,
        "goals": report.goals(preset.name, rows),
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    preset = PRESETS[args.preset]
    if args.list:
        for c in preset.all_contenders():
            kind = "default" if c in preset.contenders else "experiment"
            print(f"{c.name:24s} {kind:10s} [{c.family}] {c.note}")
        return 0
    if args.dry_run:
        preset = _preset(args)
        contenders = preset.select(args.contenders.split(",") if args.contenders else None)
        for line in plan_lines(preset, contenders):
            print(line)
        for m in dry_run(preset, contenders):
            print(
                f"  built on meta: {m['name']:24s} {m['layers']} layers, d={m['hidden']}, "
                f"vocab {m['vocab']}: {m['params']:,} params, {m['trainable']:,} trainable"
            )
        return 0
    # A recorded run's JSON sits beside RESULTS.md; a --no-record one stays in the workdir.
    default = Path(args.workdir) if args.no_record else DEFAULT_RESULTS.parent
    out = Path(args.out or default / f"bench-{preset.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = run(args, argv, out)
    print()
    print(report.table(result["rows"]))
    for line in report.section(result).splitlines()[-len(result["goals"]) - 1 :]:
        print(line)
    out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"results: {out}")
    if not args.no_record:
        report.append_results(Path(args.results_md), result)
        print(f"appended to {args.results_md}")
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
