"""Alpaca / ShareGPT / OpenAI-messages rows -> one canonical message list.

A conversation is ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``: an optional
system message, then user/assistant turns alternating, ending with the assistant. Every malformed
row is either an error naming file, row and field (strict) or skipped and counted (skip).

Any row may carry ``tests`` (a string of Python statements, e.g. asserts): a code task's tests for
pass@k. They ride on the final assistant message as its ``tests`` key (``code_tests``).

An OpenAI-messages assistant message may carry ``"weight": 0`` (in the conversation, not
trained) or ``1`` (trained, as without it); a 0 rides on the message as its ``UNTRAINED`` key
(``is_trained``).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from raysft.data.sources import JsonObject, Role, Unparsable, iter_rows
from raysft.errors import DataError, RaysftError

Message = dict[str, str]
Conversation = list[Message]

_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
_MESSAGE_ROLES = {"system", "user", "assistant"}


class _RowError(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)


@dataclass
class LoadedData:
    conversations: list[Conversation] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one "source: row i: field: why" per row
    n_rows: int = 0
    origins: list[str] = field(default_factory=list)  # "source: row i" of each conversation
    # (source, format, field) -> rows of that source holding a field its format does not read
    unread: dict[tuple[str, str, str], int] = field(default_factory=dict)


# The fields each format reads; any other field of a row is reported (a typo, or a column the
# data carries for something else), never used. So is any other key of a message in its list,
# named as "messages[].name".
READS = {
    "alpaca": ("instruction", "input", "output", "system", "tests"),
    "sharegpt": ("conversations", "system", "tests"),
    "messages": ("messages", "tests"),
}
MESSAGE_READS = {"sharegpt": ("from", "value"), "messages": ("role", "content", "weight")}

# The key marking an assistant message a row gave ``"weight": 0`` (OpenAI fine-tuning data):
# the model reads it as context and is not trained to write it.
UNTRAINED = "untrained"


def is_trained(msg: Message) -> bool:
    """Whether an assistant message is trained: all are, but one its row gave weight 0."""
    return UNTRAINED not in msg


# ---------------------------------------------------------------- row -> conversation


def detect_format(row: dict[str, Any]) -> Literal["alpaca", "sharegpt", "messages"]:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    raise _RowError(
        "",
        "cannot detect the format: expected instruction/output (alpaca), "
        "conversations (sharegpt) or messages (openai); keys are " + ", ".join(sorted(row)),
    )


def _text(row: dict[str, Any], key: str, *, required: bool, where: str | None = None) -> str:
    where = where or key
    value = row.get(key)
    if value is None:
        if required:
            raise _RowError(where, "missing")
        return ""
    if not isinstance(value, str):
        raise _RowError(where, f"must be a string, got {type(value).__name__}")
    return value


def _from_alpaca(row: dict[str, Any]) -> Conversation:
    instruction = _text(row, "instruction", required=True)
    if not instruction.strip():
        raise _RowError("instruction", "empty")
    extra = _text(row, "input", required=False)
    output = _text(row, "output", required=True)
    if not output.strip():
        raise _RowError("output", "empty: nothing to train")
    system = _text(row, "system", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    conv: Conversation = [{"role": "system", "content": system}] if system.strip() else []
    return conv + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _turns(
    items: Any,
    *,
    key: str,
    role_key: str,
    content_key: str,
    roles: dict[str, str],
    weighted: bool = False,
) -> Conversation:
    """``weighted``: assistant messages may carry OpenAI's ``weight`` (0: not trained)."""
    if not isinstance(items, list) or not items:
        raise _RowError(key, "must be a non-empty list")
    conv: Conversation = []
    for i, turn in enumerate(items):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise _RowError(where, f"must be an object, got {type(turn).__name__}")
        raw_role = turn.get(role_key)
        if raw_role not in roles:
            raise _RowError(
                f"{where}.{role_key}",
                f"unknown role {raw_role!r} (expected one of {', '.join(sorted(roles))})",
            )
        content = _text(turn, content_key, required=True, where=f"{where}.{content_key}")
        conv.append({"role": roles[raw_role], "content": content})
        if weighted and _weight(turn, role=roles[raw_role], where=f"{where}.weight") == 0:
            conv[-1][UNTRAINED] = "weight 0"
    return conv


def _weight(turn: dict[str, Any], *, role: str, where: str) -> int:
    """An OpenAI message's ``weight``: 0 (not trained) or 1 (trained, as when absent or null:
    Parquet gives every message every key)."""
    weight = turn.get("weight")
    if weight is None:
        return 1
    if role != "assistant":
        raise _RowError(where, f"only an assistant message has a weight, not a {role} message")
    # bool is an int to Python, not to JSON; "0" is a string: neither is a weight.
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight not in (0, 1):
        raise _RowError(where, f"must be 0 (not trained) or 1 (trained), got {weight!r}")
    return int(weight)


def _from_sharegpt(row: dict[str, Any]) -> Conversation:
    return _turns(
        row.get("conversations"),
        key="conversations",
        role_key="from",
        content_key="value",
        roles=_SHAREGPT_ROLES,
    )


def _with_sharegpt_system(conv: Conversation, row: dict[str, Any]) -> Conversation:
    """A ShareGPT row's top-level ``system``, unless its turns open with their own. Added after
    the shape check, so a bad turn's index is its index in ``conversations``."""
    system = _text(row, "system", required=False)
    if system.strip() and conv[0]["role"] != "system":
        return [{"role": "system", "content": system}, *conv]
    return conv


def _from_messages(row: dict[str, Any]) -> Conversation:
    roles = {r: r for r in _MESSAGE_ROLES}
    return _turns(
        row.get("messages"),
        key="messages",
        role_key="role",
        content_key="content",
        roles=roles,
        weighted=True,
    )


def _check_shape(conv: Conversation, *, key: str) -> None:
    """System first (optional), then user/assistant alternating, ending on the assistant."""
    start = 1 if conv and conv[0]["role"] == "system" else 0
    turns = conv[start:]
    if not turns:
        raise _RowError(key, "has no user/assistant turns")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise _RowError(
                f"{key}[{i + start}]",
                f"expected {'an' if expected == 'assistant' else 'a'} {expected} turn, "
                f"got {msg['role']} "
                "(turns must alternate user/assistant after an optional system message)",
            )
        if expected == "assistant" and not msg["content"].strip():
            raise _RowError(f"{key}[{i + start}]", "assistant content is empty: nothing to train")
        if expected == "user" and not msg["content"].strip():
            # As an alpaca row's empty instruction: an answer to nothing.
            raise _RowError(f"{key}[{i + start}]", "user content is empty: nothing to answer")
    if turns[-1]["role"] != "assistant":
        raise _RowError(key, "must end with an assistant turn")
    if not any(is_trained(msg) for msg in turns if msg["role"] == "assistant"):
        raise _RowError(key, "every assistant message has weight 0: nothing to train")


_CONVERTERS = {"alpaca": _from_alpaca, "sharegpt": _from_sharegpt, "messages": _from_messages}
_SHAPE_KEY = {"alpaca": "output", "sharegpt": "conversations", "messages": "messages"}


def to_conversation(
    row: Any, *, fmt: str = "auto", system_prompt: str | None = None
) -> Conversation:
    """Convert one row; raises ``_RowError`` (field + problem) on malformed input."""
    return _convert(row, fmt=fmt, system_prompt=system_prompt)[0]


def _convert(
    row: Any, *, fmt: str, system_prompt: str | None
) -> tuple[Conversation, tuple[str, list[str]]]:
    """``to_conversation``, and (the row's format, its fields that format does not read)."""
    if not isinstance(row, dict):
        raise _RowError("", f"row must be a JSON object, got {type(row).__name__}")
    # Parquet and `datasets` give every row every column, null where a row has none: a file
    # mixing alpaca and sharegpt rows must read like the same rows in JSONL.
    row = {k: v for k, v in row.items() if v is not None}
    kind = detect_format(row) if fmt == "auto" else fmt
    if kind not in _CONVERTERS:
        raise _RowError("", f"unknown format {kind!r}")
    if fmt != "auto" and _SHAPE_KEY[kind] not in row and kind != "alpaca":
        raise _RowError(_SHAPE_KEY[kind], f"missing (data.format is {fmt})")
    conv = _CONVERTERS[kind](row)
    _check_shape(conv, key=_SHAPE_KEY[kind])
    if conv[0]["role"] == "system" and not conv[0]["content"].strip():
        conv = conv[1:]  # a blank system turn is no system prompt, as a blank `system` field is
    if kind == "sharegpt":
        conv = _with_sharegpt_system(conv, row)
    if "tests" in row:
        conv[-1]["tests"] = _tests(row["tests"])
    if system_prompt and conv[0]["role"] != "system":
        conv.insert(0, {"role": "system", "content": system_prompt})
    return conv, (kind, _unread(row, kind))


def reads(kind: str, field: str) -> tuple[str, ...]:
    """What a row of format ``kind`` reads beside its unread ``field``: its fields, or for a
    key of its messages ("messages[].name"), their keys."""
    key = _SHAPE_KEY[kind]
    if kind in MESSAGE_READS and field.startswith(f"{key}[]."):
        return tuple(f"{key}[].{name}" for name in MESSAGE_READS[kind])
    return READS[kind]


def _unread(row: dict[str, Any], kind: str) -> list[str]:
    """The fields of a (well-formed) row its format does not read, and the keys of its messages
    (as "messages[].name"); a null one is absent, as a null column is."""
    unread = row.keys() - set(READS[kind])
    if kind in MESSAGE_READS:
        key = _SHAPE_KEY[kind]
        unread |= {
            f"{key}[].{name}"
            for msg in row[key]
            for name, value in msg.items()
            if value is not None and name not in MESSAGE_READS[kind]
        }
    return sorted(unread)


def _tests(value: Any) -> str:
    """A code row's ``tests``: Python statements (asserts) that run after the answer's code; the
    answer passes when they raise nothing (pass@k). Carried on the final assistant message."""
    if not isinstance(value, str):
        kind = type(value).__name__
        raise _RowError("tests", f"must be a string of Python statements, got {kind}")
    if not value.strip():
        raise _RowError("tests", "empty (leave the field out for a row without tests)")
    try:
        compile(value, "<tests>", "exec")
    except SyntaxError as err:
        raise _RowError("tests", f"not valid Python: line {err.lineno}: {err.msg}") from None
    return value


def scored_part(conv: Conversation) -> Conversation:
    """What generation metrics score of a held-out conversation: up to its last trained answer,
    whose prompt is everything before it. A final answer of weight 0 is context the model is
    not trained to write, so it is no reference either (its tests go with it)."""
    last = max(
        (i for i, m in enumerate(conv) if m["role"] == "assistant" and is_trained(m)), default=None
    )
    return conv if last is None else conv[: last + 1]


def code_tests(conv: Conversation) -> str | None:
    """The tests a row carried (``to_conversation`` puts them on its final answer), or None."""
    return conv[-1].get("tests") if conv else None


@functools.lru_cache(maxsize=16)
def _sources_have_tests(sources: tuple[str, ...], role: Role) -> bool:
    for source in sources:
        for _, row in iter_rows(source, role):
            if isinstance(row, dict) and row.get("tests") is not None:
                return True
    return False


def sources_have_tests(sources: str | list[str], role: Role = "train") -> bool:
    """Whether any row of ``sources`` has a ``tests`` field (read once per process); False when
    a source cannot be read (loading the data reports that)."""
    try:
        many = (sources,) if isinstance(sources, str) else tuple(sources)
        return _sources_have_tests(many, role)
    except (RaysftError, OSError):
        return False


def load_conversations(
    sources: str | list[str],
    *,
    role: Role = "train",
    fmt: str = "auto",
    on_error: str = "strict",
    system_prompt: str | None = None,
) -> LoadedData:
    """Read every source; strict raises on the first bad row, skip records each one."""
    out = LoadedData()
    for source in [sources] if isinstance(sources, str) else sources:
        for index, row in iter_rows(source, role):
            out.n_rows += 1
            try:
                if isinstance(row, Unparsable):
                    raise _RowError("", row.why)
                if isinstance(row, JsonObject) and row.duplicate is not None:
                    raise _RowError(
                        "", f"key {row.duplicate!r} given twice in one object; which is meant?"
                    )
                conv, (kind, unread) = _convert(row, fmt=fmt, system_prompt=system_prompt)
                out.conversations.append(conv)
                out.origins.append(f"{source}: {index}")
                for key in unread:
                    out.unread[source, kind, key] = out.unread.get((source, kind, key), 0) + 1
            except _RowError as err:
                where = f"{source}: {index}: {err}"
                if on_error == "strict":
                    raise DataError(
                        where + " (data.on_error=skip drops and counts such rows)"
                    ) from None
                out.skipped.append(where)
    return out


def split_train_eval(
    conversations: list[Conversation], *, eval_fraction: float, seed: int
) -> tuple[list[Conversation], list[Conversation]]:
    """Seeded split; each side gets at least one conversation. Copies of one conversation (the
    same roles and texts) go to the same side, so no held-out row is also a training row, and
    the held-out side is at most ``eval_fraction`` (a conversation with more copies than that
    stays in training; the one with fewest copies where all have more). With no copies the
    split is the first ``eval_fraction`` of a seeded shuffle."""
    if len(conversations) < 2:
        raise DataError(
            f"data.eval is null: need at least 2 conversations to split off an eval set, "
            f"have {len(conversations)}"
        )
    copies: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for i, conv in enumerate(conversations):
        copies.setdefault(_content(conv), []).append(i)
    if len(copies) < 2:
        raise DataError(
            f"data.eval is null: all {len(conversations)} conversations are the same, so none "
            f"can be held out without also being trained on"
        )
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    # Both sides non-empty, whatever the fraction.
    n_eval = min(len(order) - 1, max(1, round(len(order) * eval_fraction)))
    held: set[int] = set()
    for i in order:
        if len(held) >= n_eval:
            break
        group = copies[_content(conversations[i])]
        if i in held or len(held) + len(group) > n_eval:
            continue  # taken with an earlier copy, or more copies than the fraction has room for
        held.update(group)
    if not held:  # every conversation has more copies than the fraction: the fewest, then
        fewest = min(copies.values(), key=lambda ids: (len(ids), order.index(ids[0])))
        held.update(fewest)
    train = [c for i, c in enumerate(conversations) if i not in held]
    evals = [c for i, c in enumerate(conversations) if i in held]
    return train, evals


def _content(conv: Conversation) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in conv)
