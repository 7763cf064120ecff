"""Held-out effects on the embedded default: champion vs base values, NEFTune, packing.

    python benchmarks/heldout_effects.py                  # all of it (the estimate first)
    python benchmarks/heldout_effects.py --champion-from runs/lora-search/summary.json
    python benchmarks/heldout_effects.py --estimate-only

Every arm is trained ``--seeds`` times (train.seed = the spec's seed + 0, 1, 2) in this process
(``run_trial``, no Ray) and scored on the held-out rows; each arm reports held-out exact match and
eval loss as mean ± std over its seeds:

(a) **base values vs champion**: the spec as written (its search section ignored) against the
    champion of its search. The champion is the best finished trial of the spec's own search
    (TPE + ASHA, ``search.num_samples`` trials, ``search.seed``, run in-process as in
    ``search_strategies.py``) or, with ``--champion-from``, the ``best`` of a finished
    ``raysft.tune`` search's summary.json. Also the base model's exact match (no training).
(b) **NEFTune on vs off**: the champion with ``train.neftune_alpha`` 0 and ``--neftune-alpha``.
(c) **packing on vs off**: the champion packed, and padded at the same samples per optimizer step
    (batch_size scaled by the samples a packed row holds), so both see the same rows in the same
    number of steps; ``--naive-padding`` adds padding at the spec's batch_size (fewer rows/step);
    and grouped by length (``data.group_by_length``) at the packed micro-batch's token budget.

A difference is called beyond noise when it exceeds twice its standard error,
sqrt(std_a^2/n + std_b^2/n). Each finished run is appended to ``OUT/runs.jsonl`` and skipped on a
rerun (``OUT/search-trials.jsonl`` caches the search's trials), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

import inprocess as ip  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "heldout_effects"
DEFAULT_SEC_PER_RUN = 40.0  # one 150-step lora.yaml run with its generation, quiet 2-core machine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(ip.LORA_SPEC))
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial (0: torch's)")
    p.add_argument("--champion-from", type=Path, default=None, help="a search's summary.json")
    p.add_argument("--neftune-alpha", type=float, default=5.0)
    p.add_argument("--naive-padding", action="store_true")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--estimate-only", action="store_true")
    return p.parse_args(argv)


# ---------------------------------------------------------------- pure: arms and statistics


def arms(champion: dict[str, Any], *, neftune_alpha: float, naive: bool) -> dict[str, dict]:
    """Arm name -> the sampled values it sets on the spec (``None``: the base values).
    Arms with equal settings are one arm trained once (e.g. the champion already has NEFTune
    off); the packing arms' padded batch size is filled in once the data is known."""
    champ = dict(champion)
    neft = champ.get("train.neftune_alpha") or 0
    out: dict[str, dict] = {
        "base values": {},
        "champion": champ,
        "champion, NEFTune off": {**champ, "train.neftune_alpha": 0},
        f"champion, NEFTune {neftune_alpha:g}": {**champ, "train.neftune_alpha": neftune_alpha},
        "champion, padding (same rows/step)": {**champ, "data.packing": False},
        "champion, grouped by length": {
            **champ,
            "data.packing": False,
            "data.group_by_length": True,
        },
    }
    if naive:
        out["champion, padding (same batch_size)"] = {**champ, "data.packing": False, "naive": 1}
    if not neft:
        out["champion, NEFTune off"] = champ
    elif neft == neftune_alpha:
        out[f"champion, NEFTune {neftune_alpha:g}"] = champ
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def effect(a: list[float], b: list[float]) -> dict[str, Any]:
    """mean(b) - mean(a), its standard error, and whether it is beyond noise (> 2 SE)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa**2 / max(1, len(a)) + sb**2 / max(1, len(b)))
    diff = mb - ma
    return {"diff": diff, "se": se, "beyond_noise": bool(abs(diff) > max(2 * se, 1e-9))}


def padded_batch_size(batch_size: int, data: dict[str, Any]) -> int:
    """Padded rows per step that hold as many samples as ``batch_size`` packed rows."""
    per_row = data["train_examples"] / max(1, data["packed_rows"])
    return max(1, round(batch_size * per_row))


def champion_from_summary(path: Path) -> dict[str, Any]:
    summary = json.loads(path.read_text(encoding="utf-8"))
    best = summary.get("best")
    if not best:
        raise SystemExit(f"{path}: no best trial in this search's summary")
    return dict(best["sampled"])


# ---------------------------------------------------------------- running


def _key(tree: dict[str, Any], sampled: dict[str, Any], seed: int) -> str:
    blob = json.dumps([ip.spec_hash(tree), sorted(sampled.items()), seed], default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _done(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    return {r["key"]: r for r in rows}


def train_once(tree: dict[str, Any], sampled: dict[str, Any], seed: int) -> dict[str, Any]:
    """One full run with generation; its final metrics and data report."""
    import tempfile

    from raysft.search.space import trial_config
    from raysft.train.recipe import run_trial

    values = {k: v for k, v in sampled.items() if k != "naive"}
    values["train.seed"] = seed
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raysft-effects-") as tmp:
        result = run_trial(trial_config(tree, values, output_dir=tmp))
    keep = ("exact_match", "base_exact_match", "eval_loss", "train_loss", "train_seconds")
    return {
        "final": {k: result.final[k] for k in keep if k in result.final},
        "data": {k: result.data.get(k) for k in ("train_examples", "packed_rows")},
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def score_base(tree: dict[str, Any]) -> dict[str, Any]:
    """The untrained base model on the same held-out rows (trials never score it)."""
    from raysft.config import validate_tree
    from raysft.train.score_saved import score_model

    cfg = validate_tree({k: v for k, v in tree.items() if k != "search"}, source="<base>")
    t0 = time.perf_counter()
    scored = score_model(cfg.model.name_or_path, cfg, metrics=["exact_match", "eval_loss"])
    return {"final": dict(scored.scores), "wall_s": round(time.perf_counter() - t0, 1)}


def find_champion(tree: dict[str, Any], spec: Any, out: Path) -> dict[str, Any]:
    """The spec's own search, in-process: TPE + ASHA, num_samples trials, best finished."""
    from raysft.search.space import build_sampler
    from raysft.train.metrics import objective_mode

    s, t = spec.search, spec.train
    mode = objective_mode(s.metric, s.mode)
    asha = None
    if s.scheduler.type == "asha":
        asha = ip.Asha(
            max_t=t.max_steps,
            reduction_factor=s.scheduler.reduction_factor,
            grace_period=min(s.scheduler.grace_period * t.eval_every, t.max_steps),
            mode=mode,
        )
    sampler = build_sampler(s, concurrent=1)  # raysft's own; one trial at a time here
    proposals = ip.optuna_proposals(tree, spec, sampler, direction=f"{mode}imize")
    search = ip.budgeted(
        "search",
        s.seed,
        itertools.islice(proposals, s.num_samples),
        tree=tree,
        metric=s.metric,
        asha=asha,
        budget=ip.UNBOUNDED,
        cache=ip.TrialCache(out / "search-trials.jsonl"),
    )
    best = ip.best_finished(search.trials, mode)
    if best is None:
        raise SystemExit("the search finished no trial: no champion")
    print(f"champion: {best.sampled} ({s.metric} {best.value:.4f})", flush=True)
    return best.sampled


def _arm_values(sampled: dict[str, Any], tree: dict[str, Any], packed: dict | None) -> dict:
    """The values an arm's runs set, the padded arm's batch size filled in."""
    values = dict(sampled)
    grouped = values.get("data.group_by_length")  # its own token budget: batch_size x max_seq_len
    if values.get("data.packing") is False and "naive" not in values and not grouped:
        if packed is None:
            raise RuntimeError("the padded arm needs a packed run's data report first")
        values["train.batch_size"] = padded_batch_size(tree["train"]["batch_size"], packed)
    return values


def run_effects(args: argparse.Namespace) -> dict[str, Any]:
    # The champion search scores eval loss only; every arm's run also generates and scores.
    tree, spec = ip.load(args.spec, args.set, threads=args.threads)
    scored, _ = ip.load(args.spec, ["train.exact_match=true", *args.set], threads=args.threads)
    runs_path = args.out / "runs.jsonl"
    done = _done(runs_path)
    seeds = [spec.train.seed + i for i in range(args.seeds)]
    walls = sorted(r["wall_s"] for r in done.values())
    per_run = walls[len(walls) // 2] if walls else DEFAULT_SEC_PER_RUN
    n_arms = 6 + args.naive_padding - 1  # the champion's own NEFTune setting is one of the arms
    search_s = (
        0
        if args.champion_from
        else (spec.search.num_samples * spec.train.max_steps * per_run / spec.train.max_steps)
    )
    todo = max(0, n_arms * len(seeds) - len(done))
    print(
        f"arms: {n_arms} x seeds {seeds}; {len(done)} runs done, ~{todo} to go at ~{per_run:.0f} "
        f"s each{'' if args.champion_from else ', plus the champion search'}\n"
        f"estimate: ~{(todo * per_run + search_s) / 60:.0f} min "
        f"({'measured here' if walls else 'assumed, quiet 2-core machine'}; cached runs are free)",
        flush=True,
    )
    if args.estimate_only:
        return {}
    ip.quiet_logs()
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    champion = (
        champion_from_summary(args.champion_from)
        if args.champion_from
        else find_champion(tree, spec, args.out)
    )
    plan = arms(champion, neftune_alpha=args.neftune_alpha, naive=args.naive_padding)
    base_key = _key(scored, {"base model": True}, 0)
    if base_key not in done:
        done[base_key] = {"key": base_key, "arm": "base model", **score_base(scored)}
        with runs_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(done[base_key]) + "\n")
    print(f"base model (untrained): {done[base_key]['final']}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {"base model": [done[base_key]]}
    packed: dict | None = None
    for name, sampled in plan.items():
        results[name] = []
        for seed in seeds:
            values = _arm_values(sampled, scored, packed)
            key = _key(scored, values, seed)
            if key not in done:
                print(f"{name}, seed {seed}: training {values}", flush=True)
                done[key] = {
                    "key": key,
                    "arm": name,
                    "seed": seed,
                    "values": values,
                    **train_once(scored, values, seed),
                }
                with runs_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(done[key]) + "\n")
            row = done[key]
            print(f"  {name}, seed {seed}: {row['final']}", flush=True)
            results[name].append(row)
            if name == "champion" and packed is None:
                packed = row["data"]
    return {
        "spec": args.spec,
        "overrides": args.set,
        "seeds": seeds,
        "champion": champion,
        "champion_from": str(args.champion_from) if args.champion_from else "in-process search",
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "arms": results,
    }


def _em(rows: list[dict[str, Any]]) -> list[float]:
    return [100 * r["final"]["exact_match"] for r in rows]


def _loss(rows: list[dict[str, Any]]) -> list[float]:
    return [r["final"]["eval_loss"] for r in rows]


def report(result: dict[str, Any]) -> str:
    """The arms' table and the three effects, in Markdown."""
    arms_ = result["arms"]
    lines = [
        "| arm | exact match % (mean ± std) | per seed | eval loss (mean ± std) |",
        "|---|---|---|---|",
    ]
    seen: dict[tuple, str] = {}
    for name, rows in arms_.items():
        runs = tuple(r.get("key", id(r)) for r in rows)
        if runs in seen:  # e.g. NEFTune off when the champion has it off: trained once
            lines.append(f"| {name} | the {seen[runs]} runs | | |")
            continue
        seen[runs] = name
        (m, s), (lm, ls) = mean_std(_em(rows)), mean_std(_loss(rows))
        per_seed = ", ".join(f"{v:.0f}" for v in _em(rows))
        lines.append(f"| {name} | {m:.1f} ± {s:.1f} | {per_seed} | {lm:.4f} ± {ls:.4f} |")
    base_model = _em(arms_["base model"])
    neft = [n for n in arms_ if n.startswith("champion, NEFTune") and n != "champion, NEFTune off"]
    pairs = [
        ("champion vs base values", "base values", "champion"),
        ("NEFTune on vs off", "champion, NEFTune off", neft[0] if neft else "champion"),
        ("padding vs packing (same rows/step)", "champion", "champion, padding (same rows/step)"),
    ]
    if "champion, grouped by length" in arms_:  # runs from before the arm existed lack it
        pairs.append(("grouped vs packing (same tokens/step)", "champion",
                      "champion, grouped by length"))  # fmt: skip
    if "champion, padding (same batch_size)" in arms_:
        pairs.append(
            (
                "padding vs packing (same batch_size)",
                "champion",
                "champion, padding (same batch_size)",
            )
        )
    lines += [
        "",
        "| effect (b - a) | exact match points | eval loss | beyond noise (> 2 SE) |",
        "|---|---|---|---|",
    ]
    effects = {}
    for label, a, b in pairs:
        e, le = effect(_em(arms_[a]), _em(arms_[b])), effect(_loss(arms_[a]), _loss(arms_[b]))
        effects[label] = {"exact_match": e, "eval_loss": le}
        lines.append(
            f"| {label} | {e['diff']:+.1f} ± {e['se']:.1f} | {le['diff']:+.4f} ± {le['se']:.4f} "
            f"| {'yes' if e['beyond_noise'] else 'no'} (EM), "
            f"{'yes' if le['beyond_noise'] else 'no'} (loss) |"
        )
    champ_em = mean_std(_em(arms_["champion"]))[0]
    bm = mean_std(base_model)[0]
    vs_base = effects["champion vs base values"]["exact_match"]
    beats = vs_base["diff"] > 0 and vs_base["beyond_noise"]
    lines += [
        "",
        f"Base model (untrained): {bm:.1f}% exact match; champion {champ_em:.1f}% "
        f"(lift {champ_em - bm:+.1f} points). Champion: `{result['champion']}` "
        f"({result['champion_from']}). Seeds: {result['seeds']}.",
        "",
        f"Goals (issue 8 point 7): champion >= 40 points over the base model: "
        f"**{'met' if champ_em - bm >= 40 else 'not met'}**; champion beats the spec's base "
        f"values by more than seed-to-seed noise: **{'met' if beats else 'not met'}**.",
    ]
    result["effects"] = effects
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run_effects(args)
    if not result:
        return 0
    text = report(result)
    (args.out / "results.md").write_text(text, encoding="utf-8")
    (args.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    print(text)
    print(f"wrote {args.out}/results.md, summary.json, runs.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
