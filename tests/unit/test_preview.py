"""``--preview`` reads the training rows only: a one-row dataset previews (no eval split needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysft.config import load_config
from raysft.train.__main__ import _preview


def test_preview_of_a_one_row_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = tmp_path / "one.jsonl"
    rows.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    cfg = load_config(None, {"data.train": str(rows), "data.eval": None})
    assert _preview(cfg, 3, True) == 0
    (line,) = capsys.readouterr().out.splitlines()
    shown = json.loads(line)
    assert shown["trained"] and "hi" in shown["text"]
