"""An experiment dir's raysft_state.json read and written safely, and a refused search that leaves
no directory it created behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from raysft.config import validate_spec
from raysft.errors import ConfigError, SearchStateError
from raysft.search import driver, experiment

ROOT = Path(__file__).resolve().parents[2]


def _spec(exp_dir: Path) -> tuple[dict[str, Any], Any]:
    tree = yaml.safe_load((ROOT / "search_spaces" / "lora.yaml").read_text(encoding="utf-8"))
    tree["search"]["experiment_dir"] = str(exp_dir)
    return tree, validate_spec(tree, source="s.yaml")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"parent_run_id": "ab', "not JSON: JSONDecodeError: Unterminated string"),
        ("[1]", "not a record with the search's parent run"),
        ('{"spec": {}}', "not a record with the search's parent run"),
    ],
)
def test_a_damaged_state_file_is_one_message_on_resume(tmp_path: Path, text: str, why: str) -> None:
    exp = tmp_path / "exp"
    (exp / "tune").mkdir(parents=True)
    (exp / experiment.STATE_FILE).write_text(text, encoding="utf-8")
    _, cfg = _spec(exp)
    with pytest.raises(SearchStateError) as err:
        experiment.open_experiment("s.yaml", cfg, resume=True)
    message = str(err.value)
    assert message.startswith(f"s.yaml: {exp / experiment.STATE_FILE} is damaged ({why}"), message
    assert message.endswith(
        "this search cannot be continued; start it anew in another search.experiment_dir "
        f"(the trials' own results stay under {exp / 'tune'})"
    )
    assert (exp / experiment.STATE_FILE).read_text(encoding="utf-8") == text  # left as it was


def test_the_state_is_replaced_whole(tmp_path: Path) -> None:
    experiment.write_state(tmp_path, {"parent_run_id": "a", "spec": None})
    experiment.write_state(tmp_path, {"parent_run_id": "b", "spec": None})
    assert experiment.read_state("s.yaml", tmp_path)["parent_run_id"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == [experiment.STATE_FILE]
    assert experiment.read_state("s.yaml", tmp_path / "none") == {}


def test_a_refused_search_removes_the_parents_it_created_and_only_those(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*args: Any, **kwargs: Any) -> None:
        raise ConfigError("s.yaml", ["tracking.uri: foo://bar: cannot use this MLflow store"])

    monkeypatch.setattr(driver, "_search", refused)
    tree, cfg = _spec(tmp_path / "a" / "b" / "exp")
    with pytest.raises(ConfigError):
        driver.run_search("s.yaml", tree, cfg, resume=False)
    assert list(tmp_path.iterdir()) == []

    # A parent that existed before, or that another search filled meanwhile, stays.
    (tmp_path / "a").mkdir()
    with pytest.raises(ConfigError):
        driver.run_search("s.yaml", tree, cfg, resume=False)
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and list((tmp_path / "a").iterdir()) == []

    def filled_meanwhile(*args: Any, **kwargs: Any) -> None:
        (tmp_path / "a" / "b" / "other").write_text(json.dumps({"another": "search"}))
        refused()

    monkeypatch.setattr(driver, "_search", filled_meanwhile)
    with pytest.raises(ConfigError):
        driver.run_search("s.yaml", tree, cfg, resume=False)
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["other"]
