"""``--preview`` shows the rows a run trains on (a split of data.train leaves the held-out ones
out), as the pipeline handles them; a one-row dataset previews, with a note that a run would
refuse it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from raysft.config import load_config
from raysft.train.__main__ import _preview


def test_preview_of_a_one_row_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = tmp_path / "one.jsonl"
    rows.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    cfg = load_config(None, {"data.train": str(rows), "data.eval": None})
    assert _preview(cfg, 3, True) == 0
    out, err = capsys.readouterr()
    (line,) = out.splitlines()
    shown = json.loads(line)
    assert shown["trained"] and "hi" in shown["text"]
    assert err == (
        "--- note: a run would refuse this data: data.eval is null: need at least 2 "
        "conversations to split off an eval set, have 1\n"
    )


@pytest.mark.parametrize(
    ("on_error", "what"), [("strict", "refuses it"), ("skip", "drops and counts it")]
)
def test_preview_says_which_rows_a_run_would_not_train_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], on_error: str, what: str
) -> None:
    rows = tmp_path / "rows.jsonl"
    long_prompt = {"instruction": "word " * 200, "output": "hi"}
    rows.write_text(
        json.dumps(long_prompt) + "\n" + json.dumps({"instruction": "q", "output": "a"}) + "\n"
    )
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    cfg = load_config(
        None,
        {
            "data.train": str(rows),
            "data.eval": str(held),
            "data.max_seq_len": 32,
            "data.on_error": on_error,
        },
    )
    assert _preview(cfg, 2, False) == 0
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--- ")]
    assert heads[0] == (
        f"--- example 0: 32 tokens, 0 trained (truncated, nothing left to train: a run {what})"
    )
    assert "truncated" not in heads[1]


def test_template_tokenizer_without_a_chat_template_is_said_once_of_the_model() -> None:
    from raysft.assets.tokenizer import build_tokenizer
    from raysft.data.pipeline import check_template
    from raysft.errors import TemplateError

    plain = build_tokenizer()
    plain.chat_template = None
    cfg = load_config(None, {"data.template": "tokenizer"})
    with pytest.raises(TemplateError) as err:
        check_template(cfg.data, plain)
    assert str(err.value) == (
        "data.template: tokenizer, but the model's tokenizer has no chat_template (a base model "
        "often has none): choose llama2, chatml or vicuna"
    )
    check_template(load_config(None, {"data.template": "chatml"}).data, plain)  # not read


@pytest.mark.parametrize("as_json", [False, True])
def test_preview_says_how_many_rows_were_skipped_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"instruction": "q", "output": "a"}) + "\n{not json\n", encoding="utf-8"
    )
    cfg = load_config(None, {"data.train": str(rows), "data.eval": None, "data.on_error": "skip"})
    assert _preview(cfg, 1, as_json) == 0
    out, err = capsys.readouterr()
    said = [line for line in (err if as_json else out).splitlines() if "skipped" in line]
    assert said == [
        f"--- 1 rows skipped (data.on_error=skip), e.g. {rows}: line 2: not valid JSON: "
        "Expecting property name enclosed in double quotes at column 2"
    ]
    if as_json:  # stdout stays one JSON object per line
        assert [json.loads(line)["trained"] for line in out.splitlines()] == [["a<|im_end|>"]]


def test_a_dry_run_says_when_the_run_would_be_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from raysft.train.__main__ import _dry_run

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x", encoding="utf-8")
    assert _dry_run(load_config(None, {"output_dir": str(mine)}), "c.yaml") == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"note: the run would be refused: output_dir: {mine} is not empty")
    assert _dry_run(load_config(None, {"output_dir": str(tmp_path / "new")}), "c.yaml") == 0
    assert "note:" not in capsys.readouterr().out


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_preview_shows_only_the_rows_a_split_run_trains_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from raysft.data.pipeline import load_split

    rows = _jsonl(
        tmp_path / "t.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(9)]
    )
    cfg = load_config(None, {"data.train": str(rows), "data.eval": None, "data.eval_fraction": 0.5})
    assert _preview(cfg, 1000, True) == 0
    shown = [json.loads(line)["trained"][0] for line in capsys.readouterr().out.splitlines()]
    train, held, _ = load_split(cfg.data, seed=cfg.train.seed)
    assert len(shown) == len(train) == 5 and len(held) == 4
    assert shown == [f"{c[-1]['content']}<|im_end|>" for c in train]


@pytest.mark.parametrize("as_json", [False, True])
def test_preview_skips_or_names_a_row_the_template_refuses(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tok: Any,
    as_json: bool,
) -> None:
    import copy

    from raysft.errors import DataError

    bad = copy.deepcopy(tok)  # refuses system messages, as Gemma's template does
    bad.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + tok.chat_template
    )
    monkeypatch.setattr("raysft.train.__main__.load_tokenizer", lambda _: bad)
    system_row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]}  # fmt: skip
    plain = [{"messages": system_row["messages"][1:]}]
    rows = _jsonl(tmp_path / "t.jsonl", plain + [system_row] + plain)
    held = _jsonl(tmp_path / "e.jsonl", plain)
    settings = {"data.train": str(rows), "data.eval": str(held), "data.template": "tokenizer"}
    with pytest.raises(DataError) as err:
        _preview(load_config(None, settings), 5, as_json)
    assert str(err.value).startswith(f"{rows}: line 2: data.template=tokenizer: ")
    assert "System role not supported" in str(err.value)
    capsys.readouterr()
    assert _preview(load_config(None, {**settings, "data.on_error": "skip"}), 5, as_json) == 0
    out, notes = capsys.readouterr()
    heads = [line for line in out.splitlines() if line.startswith(("--- example", "{"))]
    assert len(heads) == 2
    said = [line for line in (notes if as_json else out).splitlines() if "skipped" in line]
    assert said == [
        f"--- 1 rows skipped (data.on_error=skip), e.g. {rows}: line 2: data.template=tokenizer: "
        "the tokenizer's chat_template failed: System role not supported"
    ]
