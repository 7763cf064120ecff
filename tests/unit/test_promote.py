"""The champion gate and its atomic export, against a real MLflow registry (SQLite in tmp).

Every decision path: first champion, better replaces, worse keeps, other eval data or metric
refuses, ``mode: max``, disabled, non-finite values, a champion whose stored value is NaN. Each
step of installing a champion fails once by injection (our own step functions, MLflow stays
real): the previous champion's alias and export must be exactly as they were.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from raysft.config import SearchSpec, load_config, validate_spec
from raysft.search import export as export_mod
from raysft.search import model_registry, promotion_lock
from raysft.search import promote as promote_mod
from raysft.search.export import CHAMPION_FILE, load_champion
from raysft.search.model_registry import TAG_VALUE
from raysft.search.promote import eval_fingerprint, promote

ROOT = Path(__file__).resolve().parents[2]
NAN = float("nan")
PROMPT = "Convert this word to uppercase: stone"


# ---------------------------------------------------------------- fixtures


class Registry:
    """A real MLflow tracking store and model registry in a temporary directory."""

    def __init__(self, root: Path):
        from raysft.search import tracking_store

        self.mlc = tracking_store.client(f"sqlite:///{root / 'mlflow.db'}")
        self.exp_id = self.mlc.create_experiment("t", artifact_location=str(root / "artifacts"))

    def run_id(self) -> str:
        return str(self.mlc.create_run(self.exp_id).info.run_id)

    def alias(self, name: str) -> str | None:
        champ = model_registry.current_champion(self.mlc, name, "champion")
        return None if champ is None else str(champ.version)

    def versions(self, name: str) -> int:
        return len(self.mlc.search_model_versions(f"name='{name}'"))


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    import mlflow

    before = mlflow.get_tracking_uri()
    yield Registry(tmp_path_factory.mktemp("mlflow"))
    mlflow.set_tracking_uri(before)  # tracking_store.client sets the process-wide URI


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Trial checkpoints as the recipe writes them (adapter, tokenizer, training state) for
    LoRA adapters on the embedded base: two healthy ones and one whose weights are all NaN;
    plus the logits the healthy ones give, to check what an export loads back."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from raysft.assets import resolve
    from raysft.config import LoraSection, ModelSection
    from raysft.train.lora import build_lora_config
    from raysft.train.model import load_tokenizer
    from raysft.train.saving import save_model

    root = tmp_path_factory.mktemp("checkpoints")
    tok = load_tokenizer(ModelSection())
    ids = tok(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out: dict[str, Any] = {"logits": {}}
    for seed, name in enumerate(("a", "b", "nan")):
        base = AutoModelForCausalLM.from_pretrained(resolve("embedded:tiny-base"))
        model = get_peft_model(base, build_lora_config(LoraSection()))
        torch.manual_seed(seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:  # B starts at zero: make the adapter change the model
                    p.normal_(0, 0.05) if name != "nan" else p.fill_(NAN)
            out["logits"][name] = model.eval()(input_ids=ids).logits
        save_model(model, tok, root / name, method="lora")
        (root / name / "training_state.pt").write_bytes(b"optimizer and RNG state")
        out[name] = root / name
    out["ids"] = ids
    return out


def spec(name: str, exp_dir: Path, **over: Any) -> SearchSpec:
    tree: dict[str, Any] = {
        "model": {"name_or_path": "embedded:tiny-base"},
        "train": {"max_steps": 10, "eval_every": 5},
        "search": {
            "params": {"lora.r": {"type": "choice", "values": [8, 16]}},
            "experiment_dir": str(exp_dir),
        },
        "promote": {"registered_model": name},
    }
    for dotted, value in over.items():
        section, key = dotted.split(".")
        tree.setdefault(section, {})[key] = value
    cfg = validate_spec(tree)
    from raysft.train.metrics import objective_mode

    cfg.search.mode = objective_mode(cfg.search.metric, cfg.search.mode)
    return cfg


def best(registry: Registry, ckpt: Path, value: float, trial_id: str = "t1") -> dict[str, Any]:
    return {
        "trial_id": trial_id,
        "status": "finished",
        "metric": value,
        "step": 10,
        "metrics": {"eval_loss": value, "step": 10},
        "sampled": {"lora.r": 16},
        "checkpoint": str(ckpt),
        "mlflow_run_id": registry.run_id(),
    }


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def leftovers(exp_dir: Path) -> list[str]:
    """Staged or set-aside exports left beside the target."""
    return sorted(p.name for p in exp_dir.iterdir() if p.name.startswith("."))


@pytest.fixture
def champion_v1(
    request: pytest.FixtureRequest, registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> tuple[SearchSpec, Path]:
    """A registered model (named after the test) whose champion v1 is checkpoint a at 0.5."""
    name = request.node.name.replace("[", "-").replace("]", "")
    exp_dir = tmp_path / "exp"
    cfg = spec(name, exp_dir)
    record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                     exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is True, record
    assert registry.alias(name) == "1"
    return cfg, exp_dir


# ---------------------------------------------------------------- decisions


def test_first_champion_is_registered_aliased_and_exported(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    import torch

    exp_dir = tmp_path / "exp"
    cfg = spec("first", exp_dir)
    row = best(registry, checkpoints["a"], 0.5)
    umask = os.umask(0o022)  # mkdtemp's 0700 would differ from the 0755 this umask gives
    try:
        record = promote(mlc=registry.mlc, cfg=cfg, best=row, exp_dir=exp_dir)
    finally:
        os.umask(umask)
    assert record["promoted"] is True and record["reason"] == "first champion"
    assert str(record["version"]) == registry.alias("first") == "1"
    champ = registry.mlc.get_model_version_by_alias("first", "champion")
    assert champ.run_id == row["mlflow_run_id"]
    assert champ.tags["raysft.metric"] == "eval_loss"
    assert float(champ.tags[TAG_VALUE]) == 0.5
    assert champ.tags["raysft.eval_fingerprint"] == record["eval_fingerprint"]
    assert "**eval_loss = 0.5** (lower is better)" in champ.description
    assert row["mlflow_run_id"] in champ.description

    export = exp_dir / "champion"
    assert Path(record["export_dir"]) == export.resolve()
    files = set(snapshot(export))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
    assert {"config.yaml", "metrics.json", "champion.json"} <= files
    assert "training_state.pt" not in files  # for resuming a trial, not for serving
    assert leftovers(exp_dir) == []
    assert export.stat().st_mode & 0o777 == 0o755  # readable by a serving user

    # It describes itself: the trial's own resolved config, its metrics, its registry identity.
    import yaml

    own = yaml.safe_load((export / "config.yaml").read_text())
    assert own["lora"]["r"] == 16  # the trial's sampled value, not the spec's default
    assert own["output_dir"] == str((exp_dir / "trials" / "t1").resolve())
    assert "search" not in own or own["search"] is None
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["objective"] == {"metric": "eval_loss", "value": 0.5}
    assert metrics["trial_id"] == "t1" and metrics["sampled"] == {"lora.r": 16}
    assert metrics["working_dir"] == os.getcwd()  # raysft.evaluate reads config.yaml's paths there
    assert json.loads((export / "champion.json").read_text())["version"] == "1"

    # The base is named portably, not as this install's path; the checkpoint had the path.
    checkpoint_base = json.loads((checkpoints["a"] / "adapter_config.json").read_text())
    assert Path(checkpoint_base["base_model_name_or_path"]).is_absolute()
    adapter = json.loads((export / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "embedded:tiny-base"
    # ... and loads back to the very model that was trained, by the path the README and the
    # version's description give.
    assert promote_mod.load_champion is load_champion
    model, tok = load_champion(export)
    with torch.no_grad():
        logits = model(input_ids=checkpoints["ids"]).logits
    assert torch.allclose(logits, checkpoints["logits"]["a"], atol=1e-6)
    assert not torch.allclose(logits, checkpoints["logits"]["b"], atol=1e-3)


def test_a_base_inside_a_jobs_working_dir_copy_travels_with_the_export(
    registry: Registry,
    checkpoints: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ray job's driver runs in Ray's copy of --working-dir, which Ray removes after the job:
    a base model given by a path inside it is copied into the export, which names it relatively
    and loads after the copy is gone."""

    import torch

    from raysft.assets import asset_path
    from raysft.search.model_registry import TAG_BASE
    from raysft.train.score_saved import adapter_base

    job = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    copy = tmp_path / "_ray_pkg_0123"
    shutil.copytree(asset_path("tiny-base"), copy / "base")
    monkeypatch.chdir(copy)
    exp_dir = tmp_path / "exp"
    cfg = spec("bundled", exp_dir, **{"model.name_or_path": "base"})
    record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                     exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is True, record
    assert record["base_bundled_from"] == str(copy / "base")
    champ = registry.mlc.get_model_version_by_alias("bundled", "champion")
    assert champ.tags[TAG_BASE] == f"base-model/ of this model (copied from {copy / 'base'})"

    shutil.rmtree(copy)  # what Ray does after the job
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    export = exp_dir / "champion"
    adapter = json.loads((export / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "base-model"
    assert (export / "base-model" / "config.json").is_file()
    assert adapter_base(export) == str((export / "base-model").resolve())  # raysft.evaluate's
    model, _ = load_champion(export)
    with torch.no_grad():
        logits = model(input_ids=checkpoints["ids"]).logits
    assert torch.allclose(logits, checkpoints["logits"]["a"], atol=1e-6)
    # The registry's copy, as a user fetches it, carries the base too.
    import mlflow

    fetched = mlflow.artifacts.download_artifacts(
        "models:/bundled@champion", dst_path=tmp_path / "f"
    )
    assert adapter_base(Path(fetched)) == str((Path(fetched) / "base-model").resolve())
    model, _ = load_champion(fetched)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=checkpoints["ids"]).logits, logits, atol=1e-6)


def test_a_best_trial_that_does_not_beat_the_base_model_is_never_promoted(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """A search whose trials all diverged or were stopped early can leave a "best" that is
    worse than no training at all: with the base model scored on the same rows, it stays out."""
    exp_dir = tmp_path / "exp"
    cfg = spec("worse-than-base", exp_dir)  # eval_loss, lower is better
    record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 9.18),
                     exp_dir=exp_dir, base_value=5.47)  # fmt: skip
    assert record["promoted"] is False and "failed" not in record
    assert record["reason"] == (
        "eval_loss 9.18 does not beat the base model's 5.47 on the same held-out rows"
    )
    assert record["base_value"] == 5.47
    assert registry.versions("worse-than-base") == 0 and not (exp_dir / "champion").exists()
    # Equal is not better; a base that was not scored (None, or NaN) gates nothing.
    equal = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 5.47),
                    exp_dir=exp_dir, base_value=5.47)  # fmt: skip
    assert equal["promoted"] is False
    for unknown in (None, NAN):  # the second meets the first as champion: a tie, not promoted
        kept = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 9.18),
                       exp_dir=exp_dir, base_value=unknown)  # fmt: skip
        assert "base_value" not in kept and "base model" not in kept["reason"], kept
    assert registry.versions("worse-than-base") == 1
    # The base's value as raysft.promote finds it in summary.json.
    from raysft.search.compare import base_value

    summary_cmp = {"base": {"metrics": {"eval_loss": 5.47, "exact_match": 0.0}}, "tuned": {}}
    assert base_value(summary_cmp, "eval_loss") == 5.47
    assert base_value(summary_cmp, "rougeL") is None
    assert base_value({"failed": True, "reason": "x"}, "eval_loss") is None
    assert base_value(None, "eval_loss") is None


def test_better_trial_replaces_the_champion_and_its_export(
    registry: Registry, checkpoints: dict[str, Any], champion_v1: tuple[SearchSpec, Path]
) -> None:
    cfg, exp_dir = champion_v1
    name = cfg.promote.registered_model
    row = best(registry, checkpoints["b"], 0.3, trial_id="t2")
    record = promote(mlc=registry.mlc, cfg=cfg, best=row, exp_dir=exp_dir)
    assert record["promoted"] is True and record["reason"] == "beats v1"
    assert record["previous"] == {"version": "1", "value": 0.5}
    assert registry.alias(name) == str(record["version"]) == "2"
    export = exp_dir / "champion"
    weights = (export / "adapter_model.safetensors").read_bytes()
    assert weights == (checkpoints["b"] / "adapter_model.safetensors").read_bytes()
    assert json.loads((export / "champion.json").read_text())["version"] == "2"
    assert leftovers(exp_dir) == []  # the old export was set aside, then deleted


def test_promoting_the_champions_own_trial_again_keeps_it(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """``python -m raysft.promote`` run twice on one search: the second run finds its best
    already champion (a tie with itself is no refusal), registers nothing, keeps the record."""
    exp_dir = tmp_path / "exp"
    cfg = spec("twice", exp_dir)
    row = best(registry, checkpoints["a"], 0.5)
    first = promote(mlc=registry.mlc, cfg=cfg, best=row, exp_dir=exp_dir)
    again = promote(mlc=registry.mlc, cfg=cfg, best=row, exp_dir=exp_dir)
    assert again["promoted"] is True and again["reason"] == "already champion v1"
    assert again["version"] == "1" and again["export_dir"] == first["export_dir"]
    assert registry.versions("twice") == 1 and registry.alias("twice") == "1"
    # Another trial with the same value is still refused: ties do not replace a champion.
    other = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.5),
                    exp_dir=exp_dir)  # fmt: skip
    assert other["promoted"] is False and "does not beat champion v1" in other["reason"]
    # The same run with another value is no longer the champion's own result: gated as any.
    better = {**row, "metric": 0.3, "checkpoint": str(checkpoints["b"])}
    record = promote(mlc=registry.mlc, cfg=cfg, best=better, exp_dir=exp_dir)
    assert record["promoted"] is True and record["reason"] == "beats v1"


def test_promoting_the_champion_again_rebuilds_its_deleted_export_from_the_registry(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """The champion's export deleted (or its checkpoints with it): promote run again puts the
    registry version back where the export was, as it was, and says so; nothing registered."""
    exp_dir = tmp_path / "exp"
    cfg = spec("rebuilt", exp_dir)
    row = best(registry, checkpoints["a"], 0.5)
    first = promote(mlc=registry.mlc, cfg=cfg, best=row, exp_dir=exp_dir)
    export = Path(first["export_dir"])
    files = snapshot(export)
    shutil.rmtree(export)
    again = promote(mlc=registry.mlc, cfg=cfg, best=row, exp_dir=exp_dir)
    assert again["promoted"] is True and again["reason"] == "already champion v1", again
    assert again["export_rebuilt"] is True and again["export_dir"] == str(export)
    rebuilt = snapshot(export)
    assert json.loads(rebuilt.pop(CHAMPION_FILE))["version"] == "1"
    files.pop(CHAMPION_FILE)
    assert rebuilt == files
    assert registry.versions("rebuilt") == 1 and leftovers(exp_dir) == []
    # Present and in place: left alone.
    third = promote(mlc=registry.mlc, cfg=cfg, best=row, exp_dir=exp_dir)
    assert "export_rebuilt" not in third and third["export_dir"] == str(export)


def test_an_export_that_cannot_be_rebuilt_fails_with_the_champion_kept(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    exp_dir = tmp_path / "exp"
    cfg = spec("unrebuildable", exp_dir)
    row = best(registry, checkpoints["a"], 0.5)
    first = promote(mlc=registry.mlc, cfg=cfg, best=row, exp_dir=exp_dir)
    shutil.rmtree(first["export_dir"])
    # The registry version's files are gone too.
    champ = model_registry.current_champion(registry.mlc, "unrebuildable", "champion")
    model_id = champ.source.removeprefix("models:/")
    shutil.rmtree(registry.mlc.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    again = promote(mlc=registry.mlc, cfg=cfg, best=row, exp_dir=exp_dir)
    assert again["failed"] is True and again["promoted"] is True and again["version"] == "1"
    assert again["reason"].startswith(
        f"already champion v1, but its export at {exp_dir / 'champion'} could not be rebuilt: "
    ), again["reason"]
    assert registry.alias("unrebuildable") == "1" and not (exp_dir / "champion").exists()
    assert leftovers(exp_dir) == []


def test_a_registry_that_cannot_be_read_promotes_nothing(
    registry: Registry,
    checkpoints: dict[str, Any],
    champion_v1: tuple[SearchSpec, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An outage is not "no champion": a worse trial must not take the alias through it."""
    from mlflow.exceptions import MlflowException

    cfg, exp_dir = champion_v1
    name = cfg.promote.registered_model
    before = snapshot(exp_dir / "champion")

    def outage(*args: Any, **kwargs: Any) -> Any:
        raise MlflowException("503 Service Unavailable", error_code="TEMPORARILY_UNAVAILABLE")

    with monkeypatch.context() as patch:
        patch.setattr(registry.mlc, "get_registered_model", outage)
        record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 9.0),
                         exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is False and record["failed"] is True
    assert record["reason"] == (
        "could not read the current champion, nothing changed: MlflowException: "
        "503 Service Unavailable"
    )
    assert registry.alias(name) == "1" and registry.versions(name) == 1
    assert snapshot(exp_dir / "champion") == before
    assert "out_of_reach" not in record  # the server answered (a 503 after MLflow's retries)


def test_a_registry_out_of_reach_is_said_and_the_gates_decide_without_it(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """A registry that does not answer marks the record ``out_of_reach`` (the finish then asks
    MLflow no more); a finish that already found it so asks nothing, but the gates that need no
    registry still decide."""
    from mlflowkit import OutOfReach

    from raysft.search.tracking_requests import not_tried

    exp_dir = tmp_path / "exp"
    cfg = spec("unreachable-registry", exp_dir)
    link = OutOfReach(registry.mlc)
    record = promote(mlc=link, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                     exp_dir=exp_dir)  # fmt: skip
    assert record["failed"] is True and record["out_of_reach"] is True, record
    assert record["reason"].startswith("could not read the current champion, nothing changed")

    link.calls = 0
    worse = promote(mlc=link, cfg=cfg, best=best(registry, checkpoints["a"], 9.18),
                    exp_dir=exp_dir, base_value=5.47, unreachable="MLflow: x")  # fmt: skip
    assert worse["promoted"] is False and "failed" not in worse, worse
    assert worse["reason"].startswith("eval_loss 9.18 does not beat the base model's 5.47")
    off = spec("unreachable-registry", exp_dir, **{"promote.enabled": False})
    skipped = promote(mlc=link, cfg=off, best=best(registry, checkpoints["a"], 0.5),
                      exp_dir=exp_dir, unreachable="MLflow: x")  # fmt: skip
    assert skipped == {"promoted": False, "reason": "promote.enabled is false"}
    untried = promote(mlc=link, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                      exp_dir=exp_dir, unreachable="MLflow: x")  # fmt: skip
    assert untried["failed"] is True and untried["reason"] == not_tried("MLflow: x"), untried
    assert link.calls == 0
    assert registry.versions("unreachable-registry") == 0 and not exp_dir.exists()


def test_a_staging_folder_that_refuses_chmod_is_said_and_promoted(
    registry: Registry,
    checkpoints: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A filesystem that refuses chmod (CIFS, some FUSE) keeps mkdtemp's 0700: said, and the
    promotion goes on."""
    exp_dir = tmp_path / "exp"
    cfg = spec("no-chmod", exp_dir)
    plain_chmod = Path.chmod

    def chmod(self: Path, mode: int, **kwargs: Any) -> None:
        if self.name.startswith(".champion.new-"):
            raise PermissionError(1, "Operation not permitted", str(self))
        plain_chmod(self, mode, **kwargs)

    monkeypatch.setattr(Path, "chmod", chmod)
    with caplog.at_level("WARNING", logger="raysft.paths"):
        record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                         exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is True, record
    assert "could not give" in caplog.text and "Operation not permitted" in caplog.text


def test_a_checkpoint_that_cannot_be_exported_is_named(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    import shutil

    exp_dir = tmp_path / "exp"
    cfg = spec("no-weights", exp_dir)
    bare = tmp_path / "bare"
    shutil.copytree(checkpoints["a"], bare)
    (bare / "adapter_model.safetensors").unlink()
    cases = {
        tmp_path / "gone": "the best trial's checkpoint is not there (no such directory)",
        bare: "no weights (adapter_model.safetensors or adapter_model.bin)",
    }
    for ckpt, problem in cases.items():
        record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, ckpt, 0.5),
                         exp_dir=exp_dir)  # fmt: skip
        assert record["promoted"] is False and record["failed"] is True
        assert record["reason"] == f"{ckpt}: {problem}"
    assert registry.alias("no-weights") is None and not exp_dir.exists()


def test_an_export_dir_that_holds_other_files_is_never_replaced(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    # Installing a champion swaps the export directory whole and deletes the old one: a user's
    # directory, or the experiment itself, must be refused, before the search and at promotion.
    from raysft.errors import SearchStateError
    from raysft.search.experiment import check_experiment_dir

    exp_dir = tmp_path / "exp"
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.txt").write_text("years of work", encoding="utf-8")
    cases = {
        str(mine): f"{mine} holds files that are no champion export (no champion.json)",
        str(exp_dir): f"{exp_dir} is or holds search.experiment_dir {exp_dir}",
        str(tmp_path): f"{tmp_path} is or holds search.experiment_dir {exp_dir}",
        str(mine / "thesis.txt"): f"{mine / 'thesis.txt'} is a file, not a directory",
    }
    before = snapshot(tmp_path)
    for target, problem in cases.items():
        cfg = spec("unsafe-export", exp_dir, **{"promote.export_dir": target})
        with pytest.raises(
            SearchStateError, match=re.escape(f"s.yaml: promote.export_dir: {problem}")
        ):
            check_experiment_dir("s.yaml", cfg, resume=False)
        record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                         exp_dir=exp_dir)  # fmt: skip
        assert record["promoted"] is False and record["failed"] is True
        assert record["reason"].startswith(f"promote.export_dir: {problem}")
    assert snapshot(tmp_path) == before and registry.alias("unsafe-export") is None
    # A new or empty directory is fine, and so is an earlier champion export.
    (tmp_path / "empty").mkdir()
    cfg = spec("unsafe-export", exp_dir, **{"promote.export_dir": str(tmp_path / "empty")})
    check_experiment_dir("s.yaml", cfg, resume=False)
    record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                     exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is True, record
    check_experiment_dir("s.yaml", cfg, resume=False)


def test_worse_trial_keeps_the_champion(
    registry: Registry, checkpoints: dict[str, Any], champion_v1: tuple[SearchSpec, Path]
) -> None:
    cfg, exp_dir = champion_v1
    before = snapshot(exp_dir / "champion")
    record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.7),
                     exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is False
    assert record["reason"] == "eval_loss 0.7 does not beat champion v1 (0.5)"
    assert registry.alias(cfg.promote.registered_model) == "1"
    assert registry.versions(cfg.promote.registered_model) == 1
    assert snapshot(exp_dir / "champion") == before


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"data.max_seq_len": 256}, "fingerprint"),
        ({"data.template": "vicuna"}, "fingerprint"),
        ({"search.metric": "perplexity"}, "metric perplexity"),
    ],
)
def test_other_eval_data_or_metric_refuses_with_the_reason(
    registry: Registry,
    checkpoints: dict[str, Any],
    champion_v1: tuple[SearchSpec, Path],
    change: dict[str, Any],
    what: str,
) -> None:
    cfg, exp_dir = champion_v1
    name = cfg.promote.registered_model
    other = spec(name, exp_dir, **change)
    record = promote(mlc=registry.mlc, cfg=other, best=best(registry, checkpoints["b"], 0.01),
                     exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is False
    assert record["reason"].startswith("champion v1 was scored on other eval data or metric")
    assert "eval_loss" in record["reason"]  # the champion's metric, named
    if what == "fingerprint":
        assert record["eval_fingerprint"] != eval_fingerprint(cfg)
    assert registry.alias(name) == "1"


def test_the_same_eval_data_tokenized_otherwise_refuses_with_the_reason(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """Same files and settings (the same fingerprint), other token ids (a chat template or
    tokenizer change between two searches): the scores are not comparable. Where a search
    recorded no token digest (one from before), the fingerprint alone decides, as before."""
    from raysft.data.digest import TOKENS
    from raysft.search.model_registry import TAG_EVAL_TOKENS

    exp_dir = tmp_path / "exp"
    cfg = spec("tokens", exp_dir)
    then = {"train": {}, "eval": {}, TOKENS: {"train": "a" * 64, "eval": "b" * 64}}
    first = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                    exp_dir=exp_dir, recorded=then)  # fmt: skip
    assert first["promoted"] is True and first["eval_tokens"] == "b" * 16
    champ = model_registry.current_champion(registry.mlc, "tokens", "champion")
    assert champ.tags[TAG_EVAL_TOKENS] == "b" * 16

    now = {**then, TOKENS: {"train": "a" * 64, "eval": "c" * 64}}
    refused = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.01),
                      exp_dir=exp_dir, recorded=now)  # fmt: skip
    assert refused["promoted"] is False and refused["eval_fingerprint"] == first["eval_fingerprint"]
    assert refused["reason"].startswith(
        f"champion v1 was scored on eval samples of other token ids (tokens {'b' * 16}, "
        f"now {'c' * 16}: the chat template"
    )
    assert registry.alias("tokens") == "1"
    # Not recorded on one side: the fingerprint decides, and the better trial wins.
    unknown = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.01),
                      exp_dir=exp_dir)  # fmt: skip
    assert unknown["promoted"] is True and unknown["eval_tokens"] is None, unknown
    assert registry.alias("tokens") == "2"


def test_mode_max_metric(registry: Registry, checkpoints: dict[str, Any], tmp_path: Path) -> None:
    exp_dir = tmp_path / "exp"
    cfg = spec("maxmode", exp_dir, **{"search.metric": "exact_match"})
    cfg.search.scheduler.type = "none"
    assert cfg.search.mode == "max"
    first = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                    exp_dir=exp_dir)  # fmt: skip
    assert first["promoted"] is True
    lower = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.4),
                    exp_dir=exp_dir)  # fmt: skip
    assert lower["reason"] == "exact_match 0.4 does not beat champion v1 (0.5)"
    higher = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.6),
                     exp_dir=exp_dir)  # fmt: skip
    assert higher["promoted"] is True and registry.alias("maxmode") == "2"


def test_a_champion_judged_the_other_way_is_not_replaced(
    registry: Registry, checkpoints: dict[str, Any], champion_v1: tuple[SearchSpec, Path]
) -> None:
    """v1 won eval_loss by min; a spec that sets mode max on the same metric would take a worse
    adapter for a better one."""
    cfg, exp_dir = champion_v1
    name = cfg.promote.registered_model
    champ = model_registry.current_champion(registry.mlc, name, "champion")
    assert champ.tags[model_registry.TAG_MODE] == "min"
    other = spec(name, exp_dir, **{"search.mode": "max"})
    record = promote(mlc=registry.mlc, cfg=other, best=best(registry, checkpoints["b"], 0.9),
                     exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is False, record
    assert record["reason"].startswith(
        "champion v1 was chosen with eval_loss judged by mode min, this search by mode max"
    )
    assert registry.alias(name) == "1"
    # A version promoted before raysft tagged the mode is judged by its metric's own mode.
    registry.mlc.delete_model_version_tag(name, "1", model_registry.TAG_MODE)
    again = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.3),
                    exp_dir=exp_dir)  # fmt: skip
    assert again["promoted"] is True, again


def test_the_fingerprint_is_of_the_data_the_trials_were_scored_on(
    tmp_path: Path, eval_file: str
) -> None:
    """Promoted later (python -m raysft.promote, --resume), an eval file edited since the
    search started must not give the champion the fingerprint of rows it was not scored on."""
    from raysft.data.digest import data_digests

    cfg = _fp_spec(tmp_path, eval=eval_file)
    recorded = data_digests(cfg.data)
    then = eval_fingerprint(cfg)
    Path(eval_file).write_text('{"instruction": "edited", "output": "x"}\n', encoding="utf-8")
    assert eval_fingerprint(cfg) != then  # the files as they are now
    assert eval_fingerprint(cfg, recorded) == then  # the data the search recorded at its start


def test_promotion_disabled(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    cfg = spec("disabled", tmp_path / "exp", **{"promote.enabled": False})
    record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                     exp_dir=tmp_path / "exp")  # fmt: skip
    assert record == {"promoted": False, "reason": "promote.enabled is false"}
    assert registry.versions("disabled") == 0
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("value", [NAN, float("inf"), None])
def test_a_non_finite_best_is_never_promoted(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path, value: float | None
) -> None:
    cfg = spec("nonfinite", tmp_path / "exp")
    row = best(registry, checkpoints["a"], value)  # type: ignore[arg-type]
    record = promote(mlc=registry.mlc, cfg=cfg, best=row, exp_dir=tmp_path / "exp")
    assert record == {
        "promoted": False,
        "reason": "no finished or stopped-early trial has a finite eval_loss and a checkpoint",
    }
    json.dumps(record, allow_nan=False)
    assert registry.versions("nonfinite") == 0
    no_trial = promote(mlc=registry.mlc, cfg=cfg, best=None, exp_dir=tmp_path / "exp")
    assert no_trial["promoted"] is False


@pytest.mark.parametrize(("stored", "metric"), [("nan", "eval_loss"), ("inf", "exact_match")])
def test_a_champion_with_a_non_finite_value_can_be_replaced(
    registry: Registry,
    checkpoints: dict[str, Any],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    stored: str,
    metric: str,
) -> None:
    """An older version promoted a diverged trial (its value tag reads nan or inf)."""
    name = f"stale-{stored}"
    exp_dir = tmp_path / "exp"
    cfg = spec(name, exp_dir, **{"search.metric": metric})
    cfg.search.scheduler.type = "none"
    assert promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                   exp_dir=exp_dir)["promoted"]  # fmt: skip
    registry.mlc.set_model_version_tag(name, "1", TAG_VALUE, stored)
    worse_than_before = 0.9 if metric == "eval_loss" else 0.1
    record = promote(
        mlc=registry.mlc,
        cfg=cfg,
        best=best(registry, checkpoints["b"], worse_than_before),
        exp_dir=exp_dir,
    )
    assert record["promoted"] is True, record
    assert record["previous"] == {"version": "1", "value": None}
    json.dumps(record, allow_nan=False)  # summary.json stays strict JSON
    assert registry.alias(name) == "2"


def test_an_export_that_does_not_generate_finite_logits_is_refused(
    registry: Registry, checkpoints: dict[str, Any], champion_v1: tuple[SearchSpec, Path]
) -> None:
    cfg, exp_dir = champion_v1
    before = snapshot(exp_dir / "champion")
    record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["nan"], 0.1),
                     exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is False
    assert "promotion failed, previous champion kept: ModelError" in record["reason"]
    assert "logits are not finite" in record["reason"]
    assert registry.alias(cfg.promote.registered_model) == "1"
    assert registry.versions(cfg.promote.registered_model) == 1  # checked before registering
    assert snapshot(exp_dir / "champion") == before
    assert leftovers(exp_dir) == []


# ---------------------------------------------------------------- atomic installation

# How each step fails: after doing its work (the staged files, the registered version exist),
# or instead of it (a rename, moving the alias: an error there means it did not happen). Each is
# patched in promote, where ``_install`` looks it up (it is defined in export or model_registry).
STEPS = {
    "stage_export": "after",
    "check_export": "after",
    "register_version": "after",
    "swap_in": "instead",
    "move_alias": "instead",
}


def _inject(monkeypatch: pytest.MonkeyPatch, step: str, when: str) -> None:
    real = getattr(promote_mod, step)

    def failing(*args: Any, **kwargs: Any) -> Any:
        if when == "after":
            real(*args, **kwargs)
        raise RuntimeError(f"injected failure in {step}")

    monkeypatch.setattr(promote_mod, step, failing)


@pytest.mark.parametrize("step", [*STEPS, "second_rename"])
def test_a_failure_at_any_step_leaves_the_previous_champion_intact(
    registry: Registry,
    checkpoints: dict[str, Any],
    champion_v1: tuple[SearchSpec, Path],
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    cfg, exp_dir = champion_v1
    name = cfg.promote.registered_model
    export = exp_dir / "champion"
    before = snapshot(export)
    with monkeypatch.context() as patch:
        if step == "second_rename":  # the old export is aside, the new one fails to move in
            real_rename, calls = export_mod._rename, []

            def rename(src: Path, dst: Path) -> None:
                calls.append(src)
                if len(calls) == 2:
                    raise OSError("injected failure in the second rename")
                real_rename(src, dst)

            patch.setattr(export_mod, "_rename", rename)  # swap_in's
        else:
            _inject(patch, step, STEPS[step])
        record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.3),
                         exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is False
    assert record["reason"].startswith("promotion failed, previous champion kept: ")
    assert "injected failure" in record["reason"]
    assert registry.alias(name) == "1"
    # A version registered before the failure is deleted again (with "register_version" itself
    # failing, the injection hides it): none is left tagged with a metric, never champion.
    assert registry.versions(name) == (1 if step != "register_version" else 2)
    assert snapshot(export) == before
    assert leftovers(exp_dir) == []
    json.dumps(record, allow_nan=False)
    if step != "move_alias":  # the step that leaves the most behind (a version, a swap undone)
        return
    # Nothing is left that blocks the next attempt.
    again = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.3),
                    exp_dir=exp_dir)  # fmt: skip
    assert again["promoted"] is True
    assert registry.alias(name) == str(again["version"])
    weights = (export / "adapter_model.safetensors").read_bytes()
    assert weights == (checkpoints["b"] / "adapter_model.safetensors").read_bytes()


def test_a_version_registered_whose_description_fails_is_deleted_again(
    registry: Registry,
    checkpoints: dict[str, Any],
    champion_v1: tuple[SearchSpec, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside register_version, after mlflow.register_model made the version: its caller never
    learns the number, so register_version itself deletes it."""
    cfg, exp_dir = champion_v1
    name = cfg.promote.registered_model

    def fails(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("injected failure in update_model_version")

    with monkeypatch.context() as patch:
        patch.setattr(registry.mlc, "update_model_version", fails)
        record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.3),
                         exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is False and "update_model_version" in record["reason"]
    assert registry.alias(name) == "1"
    assert registry.versions(name) == 1  # the one made is gone; v1 stays champion


@pytest.mark.parametrize("first", [False, True], ids=["over-v1", "first-champion"])
def test_an_alias_move_that_took_effect_but_failed_is_undone(
    registry: Registry,
    checkpoints: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    first: bool,
) -> None:
    """The registry moved the alias, the reply was lost: the alias goes back before the new
    version is deleted, so the registry is never left without its champion."""
    name = request.node.name.replace("[", "-").replace("]", "")
    exp_dir = tmp_path / "exp"
    cfg = spec(name, exp_dir)
    if not first:
        assert promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                       exp_dir=exp_dir)["promoted"]  # fmt: skip
    real = promote_mod.move_alias

    def lost_reply(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        raise ConnectionError("read timed out")

    with monkeypatch.context() as patch:
        patch.setattr(promote_mod, "move_alias", lost_reply)
        record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.3),
                         exp_dir=exp_dir)  # fmt: skip
    assert record["failed"] is True and "ConnectionError: read timed out" in record["reason"]
    assert registry.alias(name) == (None if first else "1")
    assert registry.versions(name) == (0 if first else 1)


def test_a_failure_after_the_alias_moved_keeps_the_new_champion(
    registry: Registry,
    checkpoints: dict[str, Any],
    champion_v1: tuple[SearchSpec, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dropping the old export comes after the commit point: the new champion stands."""
    cfg, exp_dir = champion_v1
    with monkeypatch.context() as patch:
        _inject(patch, "drop_old_export", "instead")
        record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.3),
                         exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is True and record["reason"] == "beats v1"
    assert registry.alias(cfg.promote.registered_model) == "2"
    assert json.loads((exp_dir / "champion" / "champion.json").read_text())["version"] == "2"
    assert len(leftovers(exp_dir)) == 1  # the old export, still aside
    # The next promotion tidies it away, even one the gate refuses.
    record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.9),
                     exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is False
    assert leftovers(exp_dir) == []


def test_an_export_swapped_in_but_never_aliased_is_swapped_back(
    registry: Registry, champion_v1: tuple[SearchSpec, Path], checkpoints: dict[str, Any]
) -> None:
    """The process died between the swap and the alias: the alias still holds v1."""
    import shutil

    _, exp_dir = champion_v1
    export = exp_dir / "champion"
    before = snapshot(export)
    export.rename(exp_dir / ".champion.old-dead0000")
    shutil.copytree(checkpoints["b"], export)
    (export / "champion.json").write_text(json.dumps({"version": "2"}))
    cfg, _ = champion_v1
    export_mod.recover_export(registry.mlc, cfg.promote, export, "1")
    assert snapshot(export) == before
    assert leftovers(exp_dir) == []


def test_a_version_registered_by_a_promotion_killed_before_its_alias_move_is_deleted(
    registry: Registry,
    checkpoints: dict[str, Any],
    champion_v1: tuple[SearchSpec, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed between the swap and the alias move: nothing of the process's own undoing ran.
    The next promotion puts v1's export back and deletes v2, registered but never champion."""
    cfg, exp_dir = champion_v1
    name = cfg.promote.registered_model
    before = snapshot(exp_dir / "champion")

    class Killed(BaseException):
        pass

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Killed

    with monkeypatch.context() as patch:  # a kill runs no except clause: none of the undoing
        patch.setattr(promote_mod, "move_alias", killed)
        patch.setattr(promote_mod, "swap_back", lambda *a, **k: None)
        patch.setattr(promote_mod, "forget_version", lambda *a, **k: None)
        with pytest.raises(Killed):
            promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.3),
                    exp_dir=exp_dir)  # fmt: skip
    assert registry.versions(name) == 2 and registry.alias(name) == "1"
    refused = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.9),
                      exp_dir=exp_dir)  # fmt: skip
    assert refused["promoted"] is False
    assert registry.versions(name) == 1 and registry.alias(name) == "1"
    assert snapshot(exp_dir / "champion") == before and leftovers(exp_dir) == []


# ---------------------------------------------------------------- the eval fingerprint


def _fp_spec(tmp_path: Path, **data: Any) -> SearchSpec:
    cfg = spec("fp", tmp_path / "exp")
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


@pytest.fixture
def eval_file(tmp_path: Path) -> str:
    rows = [{"instruction": f"Say w{i}", "output": f"w{i}"} for i in range(6)]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("max_eval_samples", "seed_matters"), [(3, True), (6, False), (10, False), (None, False)]
)
def test_fingerprint_covers_the_seed_exactly_when_it_picks_the_eval_rows(
    tmp_path: Path, eval_file: str, max_eval_samples: int | None, seed_matters: bool
) -> None:
    one = _fp_spec(tmp_path, eval=eval_file, max_eval_samples=max_eval_samples)
    other = one.model_copy(deep=True)
    other.train.seed = one.train.seed + 1
    assert (eval_fingerprint(one) != eval_fingerprint(other)) is seed_matters


def test_fingerprint_of_a_split_off_eval_set_covers_the_seed(tmp_path: Path) -> None:
    one = _fp_spec(tmp_path, eval=None)
    other = one.model_copy(deep=True)
    other.train.seed += 1
    assert eval_fingerprint(one) != eval_fingerprint(other)


def test_an_unset_eval_max_prompts_leaves_the_fingerprint_as_it_was() -> None:
    # Champions carry the fingerprint they were scored under: the eval settings it hashed before
    # eval.max_prompts existed are these, and an unset one must not add to them.
    from raysft.config import EvalSection
    from raysft.search.promote import _generation_settings

    before = {"samples", "temperature", "pass_k", "code_timeout_s", "code_memory_mb"}
    assert set(_generation_settings(EvalSection())) == before
    assert set(_generation_settings(EvalSection(max_prompts=5))) == before | {"max_prompts"}
    # The defaults' fingerprint as b3b7bce computed it (it also hashes the embedded eval file:
    # a change to that file changes every fingerprint, and this line with it).
    assert eval_fingerprint(load_config(None)) == "6e4f286c98af4d3d"


def test_fingerprint_covers_what_renders_and_scores_the_rows(
    tmp_path: Path, eval_file: str
) -> None:
    base = _fp_spec(tmp_path, eval=eval_file)
    fp = eval_fingerprint(base)
    changes = {
        "data.template": "llama2",
        "data.system_prompt": "Be brief.",
        "data.max_seq_len": 128,
        "data.max_eval_samples": 2,
        "data.format": "alpaca",
        "model.name_or_path": "/models/other",
        "train.max_new_tokens": 8,
        "eval.temperature": 0.7,
        "eval.max_prompts": 3,
    }
    for dotted, value in changes.items():
        other = base.model_copy(deep=True)
        section, key = dotted.split(".")
        setattr(getattr(other, section), key, value)
        assert eval_fingerprint(other) != fp, dotted
    Path(eval_file).write_text(
        Path(eval_file).read_text() + '{"instruction": "x", "output": "y"}\n'
    )
    assert eval_fingerprint(base) != fp, "the eval file's content"
    same = base.model_copy(deep=True)
    same.train.learning_rate, same.lora.r = 1e-3, 4  # what the search varies
    assert eval_fingerprint(same) == eval_fingerprint(base)


@pytest.mark.parametrize(
    "path",
    [
        "data.template",
        "data.max_seq_len",
        "data.max_eval_samples",
        "data.system_prompt",
        "data.format",
        "data.eval",
        "data.train",
        "model.name_or_path",
        "model.revision",
        "train.max_new_tokens",
        "train.exact_match",
        "eval.temperature",
        "train.max_steps",
        "train.eval_every",
    ],
)
def test_a_search_over_what_the_fingerprint_or_horizon_reads_is_refused(path: str) -> None:
    """Every trial of a search has the spec's fingerprint and horizon: nothing searched can
    change them."""
    from raysft.config import get_path
    from raysft.search.spec import validate_search

    cfg = spec("refused", Path("unused"))
    value = get_path(cfg, path)
    tree = cfg.model_dump(mode="json", exclude_none=True)
    tree["search"]["params"] = {path: {"type": "choice", "values": [value]}}
    problems = validate_search(tree, validate_spec(tree), source="spec.yaml")
    assert len(problems) == 1 and problems[0].startswith(
        f"search.params.{path}: {path} cannot be searched: it "
    ), problems


# ---------------------------------------------------------------- secrets

TOKEN = "hf_" + "Xy7" * 12  # shaped like a Hugging Face token: hf_ + 30 or more letters/digits
PASSWORD = "s3cretPassw0rd"


def test_no_secret_reaches_the_export_or_the_registry(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    exp_dir = tmp_path / "exp"
    cfg = spec(
        "secrets",
        exp_dir,
        **{
            "tracking.uri": f"https://bob:{PASSWORD}@mlflow.example:5000/",
            "data.system_prompt": f"You may use {TOKEN}.",
        },
    )
    record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["a"], 0.5),
                     exp_dir=exp_dir)  # fmt: skip
    assert record["promoted"] is True, record
    texts = {name: data.decode("latin-1") for name, data in snapshot(exp_dir / "champion").items()}
    texts["record"] = json.dumps(record)
    version = registry.mlc.get_model_version("secrets", record["version"])
    texts["version tags"] = json.dumps(version.tags)
    for name, text in texts.items():
        assert TOKEN not in text and PASSWORD not in text, name
    import yaml

    own = yaml.safe_load(texts["config.yaml"])
    assert own["tracking"]["uri"] == "https://bob:***@mlflow.example:5000/"
    assert own["data"]["system_prompt"] == "You may use ***."


# ---------------------------------------------------------------- the command


def _promote_cli(exp_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m raysft.promote EXP_DIR [ARGS]`` as a user runs it (its promotion lock in the
    test's dir, not the user's cache)."""
    import os

    return subprocess.run(
        [sys.executable, "-m", "raysft.promote", str(exp_dir), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "XDG_CACHE_HOME": str(exp_dir.parent / "cache")},
    )


def test_fingerprint_covers_the_split_of_a_saved_dataset_dict(tmp_path: Path) -> None:
    import datasets

    rows = datasets.Dataset.from_list([{"instruction": "q", "output": "a"}])
    datasets.DatasetDict({"test": rows, "validation": rows}).save_to_disk(str(tmp_path / "dd"))
    test = _fp_spec(tmp_path, eval=f"{tmp_path / 'dd'}:test")
    validation = _fp_spec(tmp_path, eval=f"{tmp_path / 'dd'}:validation")
    assert eval_fingerprint(test) != eval_fingerprint(validation)


def test_fingerprint_of_a_data_file_that_is_not_there_is_refused(tmp_path: Path) -> None:
    """Not hashed as a name: run from elsewhere, a relative path would give another
    fingerprint, and promotion would refuse the search's own champion as "other eval data"."""
    from raysft.errors import DataError

    cfg = _fp_spec(tmp_path, eval="d/eval.jsonl")
    with pytest.raises(DataError, match=r"^data: d/eval.jsonl: file not found \(a relative"):
        eval_fingerprint(cfg)


def _finished(tmp_path: Path, registry: Registry, ckpt: Path, **mlflow: Any) -> Path:
    """An experiment dir as a finished search leaves it, for the promote command."""
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    cfg = spec("cli", exp_dir)
    summary = {
        "resolved_spec": cfg.model_dump(mode="json"),
        "mlflow": {"tracking_uri": registry.mlc.tracking_uri, **mlflow},
        "best": best(registry, ckpt, 0.5),
        "promotion": {"promoted": False, "reason": "earlier record"},
    }
    (exp_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return exp_dir


def test_promote_cli_exits_2_when_it_cannot_promote(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """A failed promotion is an error, not a JSON record with exit 0; the summary keeps the
    record the failed retry would have replaced."""
    exp_dir = _finished(tmp_path, registry, tmp_path / "gone")
    before = (exp_dir / "summary.json").read_text()
    proc = _promote_cli(exp_dir)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: {exp_dir}: promotion failed: {tmp_path / 'gone'}: the best trial's checkpoint "
        "is not there (no such directory)"
    ]
    assert (exp_dir / "summary.json").read_text() == before


def test_promote_cli_on_a_best_record_without_its_trial_exits_2(
    registry: Registry, tmp_path: Path
) -> None:
    exp_dir = _finished(tmp_path, registry, tmp_path / "gone")
    summary = json.loads((exp_dir / "summary.json").read_text())
    del summary["best"]["trial_id"]  # edited by hand
    (exp_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    proc = _promote_cli(exp_dir)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: {exp_dir / 'summary.json'}: best: not a trial's record (no trial_id)"
    ]


def test_promote_cli_on_a_best_checkpoint_that_is_no_path_exits_2(
    registry: Registry, tmp_path: Path
) -> None:
    exp_dir = _finished(tmp_path, registry, tmp_path / "gone")
    summary = json.loads((exp_dir / "summary.json").read_text())
    summary["best"]["checkpoint"] = 5  # edited by hand
    (exp_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    proc = _promote_cli(exp_dir)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: {exp_dir / 'summary.json'}: best.checkpoint: not a path (a string)"
    ]


def test_promote_cli_on_no_directory_or_a_file_says_which(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for name, what in (("nope", "no such directory"), ("afile", "a file")):
        proc = _promote_cli(tmp_path / name)
        assert proc.returncode == 2 and proc.stderr.splitlines() == [
            f"error: {tmp_path / name}: {what}; give a finished search's experiment dir"
        ]


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("sqlite:////nonexistent-raysft/mlflow.db", "no such database file"),
        ("sqlite:////nonexistent-raysft/mlflow.db?timeout=5", "no such database file"),
        ("https://bob:***@mlflow.example/", "its password was redacted when saved; pass"),
    ],
)
def test_promote_cli_refuses_a_registry_it_cannot_use(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path, uri: str, problem: str
) -> None:
    exp_dir = _finished(tmp_path, registry, checkpoints["a"], tracking_uri=uri)
    proc = _promote_cli(exp_dir)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"error: {exp_dir / 'summary.json'}: mlflow.tracking_uri: {uri}: "
                           f"{problem}"), line  # fmt: skip
    assert not Path("/nonexistent-raysft").exists()


def test_promote_cli_on_a_server_out_of_reach_asks_once_and_hides_the_password(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """--tracking-uri holds the password summary.json hid: the refusal names the server
    without it (MLflow's own message carries the request's whole address), and comes after one
    request, not MLflow's 7 retries with backoff (over 4 minutes, measured)."""
    import time

    exp_dir = _finished(tmp_path, registry, checkpoints["a"])
    t0 = time.monotonic()
    proc = _promote_cli(exp_dir, "--tracking-uri", "http://alice:s3cretpw@127.0.0.1:9")
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - t0 < 60
    (line,) = proc.stderr.splitlines()
    assert line.startswith(
        "error: --tracking-uri: http://alice:***@127.0.0.1:9: cannot reach the model registry ("
    ), line
    assert "s3cretpw" not in proc.stderr + proc.stdout


def test_promote_cli_without_a_summary_exits_2_with_one_message(tmp_path: Path) -> None:
    proc = _promote_cli(tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path / 'summary.json'}: not found (is {tmp_path} a finished search's "
        "experiment dir?)"
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"best": nul', "not valid JSON: "),
        ('{"best": null}', "not a raysft summary (no resolved_spec and mlflow sections)"),
        ("[1]", "not a raysft summary (not a JSON object)"),
        # Only what is missing or wrong is named, not every section the summary needs.
        ('{"resolved_spec": {}}', "not a raysft summary (no mlflow section)"),
        ('{"mlflow": [], "resolved_spec": {}}', "not a raysft summary (mlflow is not a JSON"),
        (b"\xff\xfe{", "not valid JSON: 'utf-8' codec can't decode byte 0xff"),  # not text
    ],
)
def test_promote_cli_on_a_broken_summary_exits_2_with_one_message(
    tmp_path: Path, text: str | bytes, problem: str
) -> None:
    path = tmp_path / "summary.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    proc = _promote_cli(tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"error: {tmp_path / 'summary.json'}: {problem}"), line


def test_promote_cli_reads_relative_paths_from_where_the_search_ran(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """Run from elsewhere (here: the repository root), a relative data.eval would be another
    file, or none; summary.json's working_dir says where the search read it."""
    ran_in = tmp_path / "project"
    (ran_in / "data").mkdir(parents=True)
    (ran_in / "data" / "heldout.jsonl").write_text(
        '{"instruction": "q", "output": "a"}\n', encoding="utf-8"
    )
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    cfg = spec("cli-working-dir", exp_dir, **{"data.eval": "data/heldout.jsonl"})
    summary = {
        "resolved_spec": cfg.model_dump(mode="json"),
        "mlflow": {"tracking_uri": registry.mlc.tracking_uri},
        "best": best(registry, checkpoints["a"], 0.5),
        "working_dir": str(ran_in),
    }
    (exp_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    proc = _promote_cli(exp_dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["promoted"] is True
    assert registry.alias("cli-working-dir") == "1"


def test_promote_cli_gates_on_the_base_and_clears_the_failure_it_retried(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """raysft.promote reads the base model's score from summary.json's base_vs_tuned (the
    search's gate), and a retry that promotes drops the promotion failure from failed_steps."""
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    cfg = spec("cli-retry", exp_dir)
    summary = {
        "resolved_spec": cfg.model_dump(mode="json"),
        "mlflow": {"tracking_uri": registry.mlc.tracking_uri},
        "best": best(registry, checkpoints["a"], 0.5),
        "promotion": {"promoted": False, "failed": True, "reason": "registry out of reach"},
        "failed_steps": ["promotion: registry out of reach", "plots: OSError: disk full"],
        "base_vs_tuned": {"base": {"metrics": {"eval_loss": 0.4}}, "tuned": {"metrics": {}}},
    }
    path = exp_dir / "summary.json"
    path.write_text(json.dumps(summary), encoding="utf-8")
    proc = _promote_cli(exp_dir)  # the base (0.4) beats the best trial (0.5): not promoted
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["promoted"] is False and "does not beat the base model's 0.4" in record["reason"]
    assert registry.versions("cli-retry") == 0

    summary["base_vs_tuned"]["base"]["metrics"]["eval_loss"] = 2.0
    path.write_text(json.dumps(summary), encoding="utf-8")
    proc = _promote_cli(exp_dir)
    assert proc.returncode == 0, proc.stderr
    after = json.loads(path.read_text())
    assert after["promotion"]["promoted"] is True
    assert after["failed_steps"] == ["plots: OSError: disk full"]


def test_a_promote_retry_that_succeeds_says_so_on_the_parent_run_too(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """The finish's promotion failed and said so on the parent run (tag, description, logged
    summary.json); raysft.promote promotes: the parent run says what summary.json now says."""
    from raysft.search import notes, tracking

    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    cfg = spec("cli-parent", exp_dir)
    parent = registry.run_id()
    failed = {"promoted": False, "failed": True, "reason": "registry out of reach"}
    registry.mlc.set_tag(parent, tracking.PROMOTION_TAG, json.dumps(failed))
    registry.mlc.set_tag(parent, notes.NOTE_TAG, "Promotion: **not promoted**: out of reach.")
    summary = {
        "resolved_spec": cfg.model_dump(mode="json"),
        "metric": "eval_loss",
        "mode": "min",
        "mlflow": {"tracking_uri": registry.mlc.tracking_uri, "parent_run_id": parent},
        "best": {**best(registry, checkpoints["a"], 0.5), "max_steps": 10},
        "counts": {"finished": 1},
        "promotion": failed,
        "failed_steps": [
            "promotion: registry out of reach",
            "MLflow: the promotion tag: not tried (the tracking server was out of reach at: "
            "promotion)",
            "plots: OSError: disk full",
        ],
    }
    path = exp_dir / "summary.json"
    path.write_text(json.dumps(summary), encoding="utf-8")
    proc = _promote_cli(exp_dir)
    assert proc.returncode == 0, proc.stderr
    after = json.loads(path.read_text())
    assert after["promotion"]["promoted"] is True
    assert after["failed_steps"] == ["plots: OSError: disk full"]
    tags = registry.mlc.get_run(parent).data.tags
    assert json.loads(tags[tracking.PROMOTION_TAG]) == after["promotion"]
    assert "Promotion: **promoted** as `cli-parent` v1 (alias `champion`)" in tags[notes.NOTE_TAG]
    logged = Path(registry.mlc.download_artifacts(parent, "summary.json", str(tmp_path)))
    assert json.loads(logged.read_text()) == after


def test_a_promote_whose_parent_run_cannot_be_told_exits_3(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    """Promoted, but the parent run's tag, description and summary.json could not be written
    (here: the run is gone): the parent run still says the old outcome, so the command does not
    exit 0; summary.json holds the promotion and the failed steps."""
    exp_dir = _finished(tmp_path, registry, checkpoints["a"], parent_run_id="0" * 32)
    proc = _promote_cli(exp_dir)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[-1] == (
        "error: promoted, but the parent run still says what the search's finish left; "
        f"{exp_dir / 'summary.json'} holds this outcome (run this command again to retry)"
    )
    assert any(line.startswith("error: MLflow: the promotion tag: ") for line in lines)
    after = json.loads((exp_dir / "summary.json").read_text())
    assert after["promotion"]["promoted"] is True
    assert any(f.startswith("MLflow: the promotion tag: ") for f in after["failed_steps"])


def test_promotions_of_one_model_queue_behind_each_other(
    registry: Registry,
    checkpoints: dict[str, Any],
    champion_v1: tuple[SearchSpec, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another promotion of the same registered model (here: a process holding its lock) runs
    between this one's gate and its alias move no more: this one waits, and says so when it
    gives up, with nothing changed."""
    import time

    cfg, exp_dir = champion_v1
    name = cfg.promote.registered_model
    lock = promotion_lock._lock_path(registry.mlc, name)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(float(sys.argv[2]))", str(lock), "2"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(promotion_lock, "_LOCK_WAIT_S", 0.5)
        record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.3),
                         exp_dir=exp_dir)  # fmt: skip
        assert record["promoted"] is False and record["failed"] is True
        assert record["reason"] == (
            f"nothing changed: LockTimeout: another promotion of {name} held {lock} for 0 s"
        )
        assert registry.alias(name) == "1" and registry.versions(name) == 1
        monkeypatch.setattr(promotion_lock, "_LOCK_WAIT_S", 60.0)
        t0 = time.monotonic()
        record = promote(mlc=registry.mlc, cfg=cfg, best=best(registry, checkpoints["b"], 0.3),
                         exp_dir=exp_dir)  # fmt: skip
        assert record["promoted"] is True and holder.poll() is not None  # waited for it
        assert registry.alias(name) == "2" and time.monotonic() - t0 > 0.5
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    "same",
    [
        ("http://alice:pw1@mlflow.corp:5000", "http://bob:pw2@MLFLOW.corp:5000/",
         "http://mlflow.corp:5000"),
        ("sqlite:///mlflow.db", "sqlite:///./mlflow.db?timeout=30", "sqlite:///{cwd}/mlflow.db"),
        ("file:///{cwd}/mlruns", "./mlruns", "mlruns"),
    ],
)  # fmt: skip
def test_one_registry_written_several_ways_has_one_promotion_lock(same: tuple[str, ...]) -> None:
    """Two searches promoting into one registered model must queue behind one lock, whoever's
    credentials, whatever the spelling of the host or of a local store's path."""
    import os
    from types import SimpleNamespace

    keys = {
        promotion_lock._lock_path(SimpleNamespace(tracking_uri=u.format(cwd=os.getcwd())), "m")
        for u in same
    }
    assert len(keys) == 1, keys
    other = SimpleNamespace(tracking_uri="http://mlflow.corp:5001")
    assert promotion_lock._lock_path(other, "m") not in keys


def test_registries_mlflow_names_without_a_port_number_each_get_a_lock() -> None:
    # databricks://PROFILE:PREFIX is no host:port (urlsplit's port raises on it).
    keys = {promotion_lock.registry_key(u) for u in ("databricks://s:p", "databricks://s:q")}
    assert len(keys) == 2
    assert promotion_lock.registry_key("http://h:99999") == "http://h:99999"


def test_a_refusal_the_parent_run_cannot_be_told_of_exits_3_and_says_not_promoted(
    registry: Registry, checkpoints: dict[str, Any], tmp_path: Path
) -> None:
    exp_dir = _finished(tmp_path, registry, checkpoints["a"], parent_run_id="0" * 32)
    summary = json.loads((exp_dir / "summary.json").read_text())
    summary["base_vs_tuned"] = {"base": {"metrics": {"eval_loss": 0.1}}, "tuned": {"metrics": {}}}
    (exp_dir / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    proc = _promote_cli(exp_dir)
    assert proc.returncode == 3, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("error: not promoted (") and "base model" in last, last
    assert json.loads((exp_dir / "summary.json").read_text())["promotion"]["promoted"] is False
