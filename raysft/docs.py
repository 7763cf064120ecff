"""Configuration reference generated from the pydantic schema.

``python -m raysft.docs`` prints the Markdown that README.md carries between the
``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->`` markers;
``python -m raysft.docs --write README.md`` replaces it in place. A test keeps them equal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from raysft.config import Config, SearchParam
from raysft.train.metrics import METRICS

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def _type_name(ann: Any) -> str:
    text = re.sub(r"raysft\.config\.\w+\.", "", str(ann).replace("typing.", ""))
    text = text.replace("<class '", "").replace("'>", "")
    return text.replace("|", "\\|")


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    return "`" + json.dumps(value, ensure_ascii=False) + "`"


def _sections(model: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel]]]:
    out = [(prefix, model)]
    for name, field in model.model_fields.items():
        for arg in get_args(field.annotation) or (field.annotation,):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                path = f"{prefix}.{name}" if prefix else name
                if name == "params":  # dict of SearchParam
                    path += ".<dotted.path>"
                out += _sections(arg, path)
    return out


def reference() -> str:
    """The metric registry's table, then one table per config section (field types, defaults,
    descriptions)."""

    lines: list[str] = [metrics_table().rstrip("\n"), ""]
    seen = set()
    models = _sections(Config, "") + [("search.params.<dotted.path>", SearchParam)]
    for path, model in models:
        if (path, model) in seen:
            continue
        seen.add((path, model))
        fields = [
            (n, f)
            for n, f in model.model_fields.items()
            if not any(
                isinstance(a, type) and issubclass(a, BaseModel)
                for a in (get_args(f.annotation) or (f.annotation,))
            )
        ]
        if not fields:
            continue
        lines += [
            f"### `{path or 'top level'}`",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for name, field in fields:
            key = f"{path}.{name}" if path else name
            desc = (field.description or "").replace("|", "\\|")
            lines.append(
                f"| `{key}` | {_type_name(field.annotation)} | {_default(field)} | {desc} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def metrics_table() -> str:
    """The metric registry as a table: what ``search.metric`` can name, and when it is computed."""

    when = {
        "step": "each step (reported at evals, with the steps since the last)",
        "eval": "every eval",
        "final": "last eval only",
    }
    lines = [
        "### Metrics (`search.metric`)",
        "",
        "Every number a trial reports, from the metric registry (`raysft/train/metrics.py`). "
        "A metric with a mode can be `search.metric`; ASHA needs one computed at every eval. "
        "The metrics that generate answer the held-out rows whose prompts fit "
        "`data.max_seq_len`, the first `eval.max_prompts` of them where it is set; the loss "
        "scores every held-out row (`data.max_eval_samples`).",
        "",
        "| metric | mode | computed | generates | meaning |",
        "|---|---|---|---|---|",
    ]
    for m in METRICS.values():
        desc = m.description.replace("|", "\\|")
        lines.append(
            f"| `{m.name}` | {m.mode or '-'} | {when[m.cadence]} | "
            f"{'yes' if m.generates else 'no'} | {desc} |"
        )
    return "\n".join(lines) + "\n\n"


def splice(readme: str, body: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README has no {START} ... {END} markers")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m raysft.docs", description=__doc__)
    parser.add_argument("--write", metavar="README", help="replace the reference in this file")
    args = parser.parse_args()
    body = reference()
    if args.write:
        path = Path(args.write)
        path.write_text(splice(path.read_text(encoding="utf-8"), body), encoding="utf-8")
    else:
        sys.stdout.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
