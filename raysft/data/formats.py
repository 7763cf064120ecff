"""Alpaca / ShareGPT / OpenAI-messages / TRL prompt-completion / plain-text rows -> one canonical
message list.

A conversation is ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``: an optional
system message, then user/assistant turns alternating, ending with the assistant. Every malformed
row is either an error naming file, row and field (strict) or skipped and counted (skip).

Any row may carry ``tests`` (a string of Python statements, e.g. asserts): a code task's tests for
pass@k. They ride on the final assistant message as its ``tests`` key (``references.code_tests``).

A TRL prompt-completion row is either two strings (read as one user turn and its answer, rendered
with ``data.template`` like any other row: TRL instead joins the two texts without a template) or
two message lists (the prompt's messages, then the completion's, as TRL's conversational form);
as in TRL, only the completion is trained: an assistant message in the prompt is context.

A plain-text row (``{"text": ...}``, TRL's language-modeling rows) is one message of role
``text`` (``is_plain_text``): no template renders it, every token of it is trained, with the
tokenizer's EOS after it, and it has no answer for the generation metrics to score.

An OpenAI-messages assistant message may carry ``"weight": 0`` (in the conversation, not
trained) or ``1`` (trained, as without it); a 0 rides on the message as its ``UNTRAINED`` key
(``is_trained``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from raysft.data.sources import JsonObject, Role, Unparsable, iter_rows
from raysft.errors import DataError

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
# Turns of tool use: OpenAI's and Llama 3's roles, and ShareGPT's (LLaMA-Factory, glaive).
# Refused by name: none of the templates has a rendering for them (README: Not in raysft).
_TOOL_ROLES = {"tool", "function", "ipython", "function_call", "observation"}
_TOOL_KEYS = ("tool_calls", "function_call")
_NO_TOOLS = "tool use is not supported: drop such rows or write the calls into the text"


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
    "alpaca": ("instruction", "input", "output", "system", "history", "tests"),
    "sharegpt": ("conversations", "system", "tests"),
    "messages": ("messages", "system", "tests"),
    "prompt_completion": ("prompt", "completion", "tests"),
    "text": ("text",),
}
MESSAGE_READS = {
    "sharegpt": ("from", "value"),
    "messages": ("role", "content", "weight"),
    "prompt_completion": ("role", "content"),
}
# The fields of a row that hold its message lists, and those it must have.
_MESSAGE_LISTS = {
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}

# The key marking an assistant message a row gave ``"weight": 0`` (OpenAI fine-tuning data):
# the model reads it as context and is not trained to write it.
UNTRAINED = "untrained"


def is_trained(msg: Message) -> bool:
    """Whether an assistant message is trained: all are, but one its row gave weight 0."""
    return UNTRAINED not in msg


# The role of a plain-text row's one message.
TEXT = "text"


def is_plain_text(conv: Conversation) -> bool:
    """Whether ``conv`` is a plain-text row (one message of role ``text``), not a conversation."""
    return len(conv) == 1 and conv[0]["role"] == TEXT


# ---------------------------------------------------------------- row -> conversation


def detect_format(
    row: dict[str, Any],
) -> Literal["alpaca", "sharegpt", "messages", "prompt_completion", "text"]:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"  # a missing one of the two is named by the converter
    if "text" in row:
        return "text"
    raise _RowError(
        "",
        "cannot detect the format: expected instruction/output (alpaca), "
        "conversations (sharegpt), messages (openai), prompt/completion (trl) or text (plain "
        "text); keys are " + ", ".join(sorted(row)),
    )


def _text(row: dict[str, Any], key: str, *, required: bool, where: str | None = None) -> str:
    where = where or key
    value = row.get(key)
    if value is None:
        if required:
            raise _RowError(where, "missing")
        return ""
    if not isinstance(value, str):
        raise _RowError(where, f"must be a string, got {_kind(value)}")
    return _encodable(value, where)


def _encodable(value: str, where: str) -> str:
    """``value``, refused where it holds a lone UTF-16 surrogate (JSON's ``"\\ud83d"``, an
    emoji cut in half by the exporter), which JSON reads but no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _RowError(
            where,
            f"holds a lone UTF-16 surrogate (\\u{ord(value[err.start]):04x} at character "
            f"{err.start}), half of a character: not text a tokenizer takes",
        ) from None
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
    conv += _alpaca_history(row.get("history"))
    return conv + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _alpaca_history(history: Any) -> Conversation:
    """LLaMA-Factory's ``history`` of an alpaca row: earlier [instruction, answer] pairs, turns
    before the row's own (each answer trained, as every turn of a conversation is)."""
    if history is None:
        return []
    if not isinstance(history, list):
        kind = _kind(history)
        raise _RowError("history", f"must be a list of [instruction, answer] pairs, got {kind}")
    turns: Conversation = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _RowError(f"history[{i}]", "must be an [instruction, answer] pair")
        for j, role in enumerate(("user", "assistant")):
            where = f"history[{i}][{j}]"
            if not isinstance(pair[j], str):
                raise _RowError(where, f"must be a string, got {_kind(pair[j])}")
            turns.append({"role": role, "content": _encodable(pair[j], where)})
    return turns


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
            raise _RowError(where, f"must be an object, got {_kind(turn)}")
        raw_role = turn.get(role_key)
        if raw_role in _TOOL_ROLES:
            raise _RowError(f"{where}.{role_key}", f"a {raw_role!r} turn: {_NO_TOOLS}")
        pair = _TURN_KEYS[1 - _TURN_KEYS.index((role_key, content_key))]
        if raw_role is None and pair[0] in turn:  # the other format's keys, under this list
            raise _RowError(
                where,
                f"has {pair[0]}/{pair[1]}, not {role_key}/{content_key}: turns under `{key}` "
                f"use {role_key}/{content_key} (rename the keys, or the list)",
            )
        if raw_role not in roles:
            raise _RowError(
                f"{where}.{role_key}",
                f"unknown role {raw_role!r} (expected one of {', '.join(sorted(roles))})",
            )
        for tool_key in _TOOL_KEYS:
            if turn.get(tool_key):  # null or [] where Parquet gives every message every key
                raise _RowError(f"{where}.{tool_key}", _NO_TOOLS)
        role = roles[raw_role]
        content = _content(turn, content_key, where=f"{where}.{content_key}", role=role)
        conv.append({"role": role, "content": content})
        if weighted and _weight(turn, role=roles[raw_role], where=f"{where}.weight") == 0:
            conv[-1][UNTRAINED] = "weight 0"
    return conv


# A turn's (role, content) keys: ShareGPT's and OpenAI's.
_TURN_KEYS = (("from", "value"), ("role", "content"))


def _content(turn: dict[str, Any], key: str, *, where: str, role: str) -> str:
    """A message's text: a string; OpenAI's list of content parts where every part is text
    (joined, as OpenAI reads them); null for a system message: none, as a blank one is."""
    value = turn.get(key)
    if value is None and role == "system":
        return ""
    if not isinstance(value, list):
        return _text(turn, key, required=True, where=where)
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            got = f"type {kind!r}" if isinstance(part, dict) else _kind(part)
            raise _RowError(
                f"{where}[{i}]",
                f'a content part of {got}: only text parts ({{"type": "text", "text": ...}}) '
                "are read; images and audio are not supported",
            )
        texts.append(_encodable(part["text"], f"{where}[{i}].text"))
    if not texts:
        raise _RowError(where, "an empty list of content parts")
    return "".join(texts)


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


def _with_row_system(conv: Conversation, row: dict[str, Any]) -> Conversation:
    """A ShareGPT or messages row's top-level ``system``, unless its turns open with their own.
    Added after the shape check, so a bad turn's index is its index in its list."""
    system = _text(row, "system", required=False)
    if system.strip() and conv[0]["role"] != "system":
        return [{"role": "system", "content": system}, *conv]
    return conv


def _from_prompt_completion(row: dict[str, Any]) -> Conversation:
    """TRL's prompt-completion row: two strings, or two message lists (only the completion's
    messages trained)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    for key, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            raise _RowError(key, "missing (a prompt-completion row has both)")
    if isinstance(prompt, list) != isinstance(completion, list):
        kinds = {k: "a message list" if isinstance(v, list) else _kind(v)
                 for k, v in (("prompt", prompt), ("completion", completion))}  # fmt: skip
        raise _RowError(
            "completion",
            f"is {kinds['completion']} but prompt is {kinds['prompt']}: give both as strings "
            "or both as message lists",
        )
    if not isinstance(prompt, list):
        user = _text(row, "prompt", required=True)
        answer = _text(row, "completion", required=True)
        if not user.strip():
            raise _RowError("prompt", "empty: nothing to answer")
        if not answer.strip():
            raise _RowError("completion", "empty: nothing to train")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    roles = {r: r for r in _MESSAGE_ROLES}
    head, tail = (
        _turns(items, key=key, role_key="role", content_key="content", roles=roles)
        for key, items in (("prompt", prompt), ("completion", completion))
    )
    for msg in head:
        if msg["role"] == "assistant":
            msg[UNTRAINED] = "in the prompt"  # context, as TRL trains the completion alone
    return head + tail


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


def _check_shape(conv: Conversation, *, key: str, names: list[str] | None = None) -> None:
    """System first (optional), then user/assistant alternating, ending on the assistant.
    ``names``: the field of each message (default ``key[i]``)."""
    names = names or [f"{key}[{i}]" for i in range(len(conv))]
    start = 1 if conv and conv[0]["role"] == "system" else 0
    turns = conv[start:]
    if not turns:
        raise _RowError(key, "has no user/assistant turns")
    for i, msg in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise _RowError(
                names[i + start],
                f"expected {'an' if expected == 'assistant' else 'a'} {expected} turn, "
                f"got {msg['role']} "
                "(turns must alternate user/assistant after an optional system message)",
            )
        if expected == "assistant" and not msg["content"].strip():
            raise _RowError(names[i + start], "assistant content is empty: nothing to train")
        if expected == "user" and not msg["content"].strip():
            # As an alpaca row's empty instruction: an answer to nothing.
            raise _RowError(names[i + start], "user content is empty: nothing to answer")
    if turns[-1]["role"] != "assistant":
        raise _RowError(key, "must end with an assistant turn")
    if not any(is_trained(msg) for msg in turns if msg["role"] == "assistant"):
        raise _RowError(key, "every assistant message has weight 0: nothing to train")


def _from_text(row: dict[str, Any]) -> Conversation:
    text = _text(row, "text", required=True)
    if not text.strip():
        raise _RowError("text", "empty: nothing to train")
    return [{"role": TEXT, "content": text}]


_CONVERTERS = {
    "alpaca": _from_alpaca,
    "sharegpt": _from_sharegpt,
    "messages": _from_messages,
    "prompt_completion": _from_prompt_completion,
    "text": _from_text,
}
_SHAPE_KEY = {
    "alpaca": "output",
    "sharegpt": "conversations",
    "messages": "messages",
    "prompt_completion": "completion",
}


def _message_names(kind: str, row: dict[str, Any], conv: Conversation) -> list[str] | None:
    """The field of each message of a prompt-completion row's conversation (its prompt's, then
    its completion's); None for the other formats (their one list's ``key[i]``)."""
    if kind != "prompt_completion":
        return None
    if not isinstance(row["prompt"], list):
        return ["prompt", "completion"]
    n = len(row["prompt"])
    return [f"prompt[{i}]" if i < n else f"completion[{i - n}]" for i in range(len(conv))]


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
        raise _RowError("", f"row must be a JSON object, got {_kind(row)}")
    # Parquet and `datasets` give every row every column, null where a row has none: a file
    # mixing alpaca and sharegpt rows must read like the same rows in JSONL.
    given = sorted(row)
    row = {k: v for k, v in row.items() if v is not None}
    if not row:
        empty = f"no field holds a value ({', '.join(given)}: null)" if given else "empty"
        raise _RowError("", empty)
    kind = detect_format(row) if fmt == "auto" else fmt
    if kind not in _CONVERTERS:
        raise _RowError("", f"unknown format {kind!r}")
    for key in _MESSAGE_LISTS.get(kind, ()) if fmt != "auto" else ():
        if key not in row:
            raise _RowError(key, f"missing (data.format is {fmt})")
    conv = _CONVERTERS[kind](row)
    if kind == "text":  # no turns, no system prompt, no answer to test
        return conv, (kind, _unread(row, kind))
    _check_shape(conv, key=_SHAPE_KEY[kind], names=_message_names(kind, row, conv))
    if conv[0]["role"] == "system" and not conv[0]["content"].strip():
        conv = conv[1:]  # a blank system turn is no system prompt, as a blank `system` field is
    if kind in ("sharegpt", "messages"):
        conv = _with_row_system(conv, row)
    if "tests" in row:
        conv[-1]["tests"] = _tests(row["tests"])
    if system_prompt and conv[0]["role"] != "system":
        conv.insert(0, {"role": "system", "content": system_prompt})
    return conv, (kind, _unread(row, kind))


def reads(kind: str, field: str) -> tuple[str, ...]:
    """What a row of format ``kind`` reads beside its unread ``field``: its fields, or for a
    key of its messages ("messages[].name"), their keys."""
    for key in _MESSAGE_LISTS.get(kind, ()):
        if field.startswith(f"{key}[]."):
            return tuple(f"{key}[].{name}" for name in MESSAGE_READS[kind])
    return READS[kind]


def _unread(row: dict[str, Any], kind: str) -> list[str]:
    """The fields of a (well-formed) row its format does not read, and the keys of its messages
    (as "messages[].name"); a null one is absent, as a null column is."""
    unread = row.keys() - set(READS[kind])
    for key in _MESSAGE_LISTS.get(kind, ()):
        if isinstance(row[key], list):  # a prompt-completion row's may be strings
            unread |= {
                f"{key}[].{name}"
                for msg in row[key]
                for name, value in msg.items()
                if value is not None and name not in MESSAGE_READS[kind]
            }
    return sorted(unread)


def _kind(value: Any) -> str:
    """What a row's value is, as a message says it: Python's name, but "object" for a JSON
    object (read as ``sources.JsonObject``, an internal name)."""
    return "object" if isinstance(value, dict) else type(value).__name__


def _tests(value: Any) -> str:
    """A code row's ``tests``: Python statements (asserts) that run after the answer's code; the
    answer passes when they raise nothing (pass@k). Carried on the final assistant message."""
    if not isinstance(value, str):
        kind = _kind(value)
        raise _RowError("tests", f"must be a string of Python statements, got {kind}")
    if not value.strip():
        raise _RowError("tests", "empty (leave the field out for a row without tests)")
    try:
        compile(value, "<tests>", "exec")
    except SyntaxError as err:
        raise _RowError("tests", f"not valid Python: line {err.lineno}: {err.msg}") from None
    return value


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
