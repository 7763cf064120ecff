"""Row formats (Alpaca / ShareGPT / OpenAI messages), file types, row-level errors and the split."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from raysft.data.formats import (
    DataError,
    detect_format,
    is_trained,
    load_conversations,
    reads,
    to_conversation,
)
from raysft.data.split import split_train_eval

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ZH_INSTRUCTION = "Translate the following sentence into English"
ZH_INPUT = "今天天气真好"
ZH_OUTPUT = "The weather is really nice today."
GOOD_ALPACA = {"instruction": "Reverse the word", "input": "abc", "output": "cba"}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return path


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in pairs]


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"from": r, "value": v} for r, v in pairs]


# ---------------------------------------------------------------- rows -> conversations


def test_alpaca_with_input_joins_instruction_and_input() -> None:
    row = {"instruction": ZH_INSTRUCTION, "input": ZH_INPUT, "output": ZH_OUTPUT}
    assert to_conversation(row) == msgs(
        ("user", f"{ZH_INSTRUCTION}\n\n{ZH_INPUT}"), ("assistant", ZH_OUTPUT)
    )


@pytest.mark.parametrize("extra", [{}, {"input": ""}, {"input": "  "}, {"input": None}])
def test_alpaca_without_input_is_the_instruction_alone(extra: dict[str, Any]) -> None:
    row = {"instruction": "Say hi", "output": "hi", **extra}
    assert to_conversation(row) == msgs(("user", "Say hi"), ("assistant", "hi"))


def test_alpaca_optional_system() -> None:
    row = {"instruction": "Say hi", "output": "hi", "system": "Be brief."}
    assert to_conversation(row) == msgs(
        ("system", "Be brief."), ("user", "Say hi"), ("assistant", "hi")
    )


def test_sharegpt_human_gpt_roles() -> None:
    row = {"conversations": turns(("human", "a"), ("gpt", "b"), ("human", "c"), ("gpt", "d"))}
    assert to_conversation(row) == msgs(
        ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")
    )


def test_sharegpt_user_assistant_and_system_roles() -> None:
    row = {"conversations": turns(("system", "s"), ("user", "a"), ("assistant", "b"))}
    assert to_conversation(row) == msgs(("system", "s"), ("user", "a"), ("assistant", "b"))


def test_sharegpt_top_level_system_key() -> None:
    row = {"system": "Be brief.", "conversations": turns(("human", "a"), ("gpt", "b"))}
    assert to_conversation(row) == msgs(("system", "Be brief."), ("user", "a"), ("assistant", "b"))


def test_openai_messages() -> None:
    m = msgs(("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    assert to_conversation({"messages": m}) == m


def test_openai_messages_as_exporters_write_them() -> None:
    """A top-level system (as ShareGPT rows have), content as a list of text parts (OpenAI's
    own format), a system message of null content (no system prompt)."""
    m = msgs(("user", "2+2?"), ("assistant", "4"))
    assert to_conversation({"system": "Be brief.", "messages": m}) == [
        {"role": "system", "content": "Be brief."},
        *m,
    ]
    parts = [{"type": "text", "text": "2+"}, {"type": "text", "text": "2?"}]
    assert to_conversation({"messages": [{"role": "user", "content": parts}, m[1]]}) == m
    assert to_conversation({"messages": [{"role": "system", "content": None}, *m]}) == m


def test_alpaca_history_of_llama_factory_is_earlier_turns() -> None:
    row = {"instruction": "Q2", "input": "", "output": "A2", "history": [["Q1", "A1"]]}
    assert to_conversation(row) == msgs(("user", "Q1"), ("assistant", "A1"), ("user", "Q2"),
                                        ("assistant", "A2"))  # fmt: skip


def test_trl_prompt_completion_strings_are_a_user_turn_and_its_answer() -> None:
    row = {"prompt": "2+2?", "completion": "4"}
    assert to_conversation(row) == msgs(("user", "2+2?"), ("assistant", "4"))
    assert to_conversation(row, fmt="prompt_completion") == to_conversation(row)


def test_trl_conversational_prompt_completion_trains_the_completion_alone() -> None:
    prompt = msgs(("system", "s"), ("user", "q0"), ("assistant", "a0"), ("user", "q1"))
    row = {"prompt": prompt, "completion": msgs(("assistant", "a1"))}
    conv = to_conversation(row)
    assert [(m["role"], m["content"]) for m in conv] == [
        ("system", "s"), ("user", "q0"), ("assistant", "a0"), ("user", "q1"), ("assistant", "a1")
    ]  # fmt: skip
    # As in TRL, an answer in the prompt is context: only the completion is trained.
    assert [is_trained(m) for m in conv if m["role"] == "assistant"] == [False, True]


def weighted(*weights: Any) -> dict[str, Any]:
    """A messages row of one user/assistant pair per weight (None: the answer has no weight)."""
    m: list[dict[str, Any]] = []
    for i, w in enumerate(weights):
        m += msgs(("user", f"q{i}"), ("assistant", f"a{i}"))
        if w is not None:
            m[-1]["weight"] = w
    return {"messages": m}


def test_an_answer_of_weight_0_is_in_the_conversation_and_not_trained() -> None:
    conv = to_conversation(weighted(0, 1, None, 0.0, 1.0))
    assert [m["content"] for m in conv] == [f"{x}{i}" for i in range(5) for x in "qa"]
    answers = [m for m in conv if m["role"] == "assistant"]
    assert [is_trained(m) for m in answers] == [False, True, True, False, True]
    # A null weight is none (Parquet gives every message every key).
    assert all(map(is_trained, to_conversation(weighted(None, 1))))


def test_system_prompt_is_added_only_where_there_is_none() -> None:
    plain = {"instruction": "q", "output": "a"}
    with_system = {"instruction": "q", "output": "a", "system": "own"}
    assert to_conversation(plain, system_prompt="default")[0] == {
        "role": "system",
        "content": "default",
    }
    assert to_conversation(with_system, system_prompt="default")[0]["content"] == "own"


@pytest.mark.parametrize(
    "row",
    [
        {"instruction": "q", "output": "a", "system": " "},
        {"messages": msgs(("system", ""), ("user", "q"), ("assistant", "a"))},
        {"conversations": turns(("system", "\n"), ("human", "q"), ("gpt", "a"))},
        {"system": "", "conversations": turns(("system", " "), ("human", "q"), ("gpt", "a"))},
    ],
)
def test_a_blank_system_message_is_no_system_message(row: dict[str, Any]) -> None:
    # In every format alike: no empty system block rendered, and data.system_prompt applies.
    assert to_conversation(row) == msgs(("user", "q"), ("assistant", "a"))
    assert to_conversation(row, system_prompt="default")[0] == msgs(("system", "default"))[0]
    # A ShareGPT row's top-level system still applies over its blank system turn.
    shared = {"system": "own", "conversations": turns(("system", ""), ("human", "q"), ("gpt", "a"))}
    assert to_conversation(shared)[0] == msgs(("system", "own"))[0]


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"instruction": "q", "output": "a"}, "alpaca"),
        ({"conversations": []}, "sharegpt"),
        ({"messages": []}, "messages"),
        ({"prompt": "q", "completion": "a"}, "prompt_completion"),
        ({"prompt": []}, "prompt_completion"),
        ({"text": "A plain text."}, "text"),
    ],
)
def test_detect_format(row: dict[str, Any], fmt: str) -> None:
    assert detect_format(row) == fmt


def test_null_columns_count_as_absent() -> None:
    # Parquet / `datasets` rows carry every column of the file, null where a row has none.
    row = {
        "instruction": None,
        "output": None,
        "conversations": turns(("human", "q"), ("gpt", "a")),
    }
    assert to_conversation(row) == msgs(("user", "q"), ("assistant", "a"))


# ---------------------------------------------------------------- malformed rows

TOOL_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
}
BAD_ROWS = [
    (
        {"conversations": turns(("human", "a"), ("gpt", "b"), ("bot", "c"), ("gpt", "d"))},
        "conversations[2].from: unknown role 'bot'",
    ),
    ({"messages": msgs(("user", "a"), ("bot", "b"))}, "messages[1].role: unknown role 'bot'"),
    (
        {"messages": msgs(("user", "a"), ("tool", "b"))},
        "messages[1].role: a 'tool' turn: tool use is not supported: drop such rows or write "
        "the calls into the text",
    ),
    (  # OpenAI's assistant message calling a tool: no content, its calls beside
        {"messages": [*msgs(("user", "weather in Paris?")), TOOL_CALL]},
        "messages[1].tool_calls: tool use is not supported",
    ),
    (
        {"conversations": turns(("human", "a"), ("function_call", "{}"), ("observation", "x"))},
        "conversations[1].from: a 'function_call' turn: tool use is not supported",
    ),
    ({"instruction": "q"}, "output: missing"),
    ({"instruction": "q", "output": "  "}, "output: empty"),
    ({"instruction": " ", "output": "a"}, "instruction: empty"),
    ({"instruction": "q", "input": 3, "output": "a"}, "input: must be a string, got int"),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
        "messages[1].content: must be a string, got int",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]},
        "messages[1].content: missing",
    ),
    ({"conversations": []}, "conversations: must be a non-empty list"),
    ({"conversations": "hello"}, "conversations: must be a non-empty list"),
    ({"conversations": ["hello"]}, "conversations[0]: must be an object, got str"),
    (
        {"messages": msgs(("user", "a"), ("user", "b"))},
        "messages[1]: expected an assistant turn, got user",
    ),
    (
        {"messages": msgs(("user", "a"), ("assistant", "b"), ("system", "c"), ("assistant", "d"))},
        "messages[2]: expected a user turn, got system",
    ),
    (
        {"messages": msgs(("user", "a"), ("assistant", "b"), ("user", "c"))},
        "messages: must end with an assistant turn",
    ),
    ({"messages": msgs(("user", "a"), ("assistant", " "))}, "messages[1]: assistant content is"),
    (
        {"messages": msgs(("user", ""), ("assistant", "b"))},
        "messages[0]: user content is empty: nothing to answer",
    ),
    ({"messages": msgs(("system", "s"))}, "messages: has no user/assistant turns"),
    (  # the index is the turn's own in `conversations`, not shifted by the top-level system
        {"system": "S", "conversations": turns(("human", "a"), ("human", "b"))},
        "conversations[1]: expected an assistant turn, got user",
    ),
    (weighted(1, 2), "messages[3].weight: must be 0 (not trained) or 1 (trained), got 2"),
    (weighted("0"), "messages[1].weight: must be 0 (not trained) or 1 (trained), got '0'"),
    (weighted(True), "messages[1].weight: must be 0 (not trained) or 1 (trained), got True"),
    (
        {"messages": [{"role": "user", "content": "q", "weight": 1}, msgs(("assistant", "a"))[0]]},
        "messages[0].weight: only an assistant message has a weight, not a user message",
    ),
    (weighted(0, 0), "messages: every assistant message has weight 0: nothing to train"),
    ({"question": "q", "answer": "a"}, "cannot detect the format"),
    ({"prompt": "q"}, "completion: missing (a prompt-completion row has both)"),
    ({"completion": "a"}, "prompt: missing (a prompt-completion row has both)"),
    ({"prompt": " ", "completion": "a"}, "prompt: empty: nothing to answer"),
    ({"prompt": "q", "completion": ""}, "completion: empty: nothing to train"),
    ({"prompt": "q", "completion": ["a"]}, "completion: is a message list but prompt is str"),
    ({"prompt": msgs(("user", "q")), "completion": "a"}, "completion: is str but prompt is a"),
    ({"prompt": 3, "completion": "a"}, "prompt: must be a string, got int"),
    ({"text": " \n"}, "text: empty: nothing to train"),
    ({"text": ["a", "b"]}, "text: must be a string, got list"),
    (  # one message, not a list of them: said as JSON names it, not as raysft reads it
        {"prompt": "q", "completion": {"role": "assistant", "content": "a"}},
        "completion: must be a string, got object",
    ),
    ({"prompt": [], "completion": msgs(("assistant", "a"))}, "prompt: must be a non-empty list"),
    (  # indexes are each list's own
        {"prompt": msgs(("user", "q")), "completion": msgs(("assistant", "a"), ("assistant", "b"))},
        "completion[1]: expected a user turn, got assistant",
    ),
    (
        {"prompt": msgs(("user", "q"), ("tool", "t")), "completion": msgs(("assistant", "a"))},
        "prompt[1].role: a 'tool' turn: tool use is not supported",
    ),
    (
        {"prompt": msgs(("user", "q")), "completion": msgs(("assistant", "a"), ("user", "b"))},
        "completion: must end with an assistant turn",
    ),
    (["q", "a"], "row must be a JSON object, got list"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0]: a content part of type 'image_url': only text parts",
    ),
    (
        {"conversations": msgs(("user", "a"), ("assistant", "b"))},
        "conversations[0]: has role/content, not from/value: turns under `conversations` use "
        "from/value (rename the keys, or the list)",
    ),
    (
        {"messages": turns(("human", "a"), ("gpt", "b"))},
        "messages[0]: has from/value, not role/content: turns under `messages` use role/content",
    ),
    (
        {"instruction": "q", "output": "a", "history": [["x"]]},
        "history[0]: must be an [instruction, answer] pair",
    ),
]


@pytest.mark.parametrize(("row", "problem"), BAD_ROWS, ids=[p for _, p in BAD_ROWS])
def test_malformed_row_names_file_row_and_field(tmp_path: Path, row: Any, problem: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD_ALPACA, row])
    with pytest.raises(DataError) as info:
        load_conversations(str(path))  # strict is the default
    assert str(info.value).startswith(f"{path}: line 2: {problem}")


def test_undetectable_row_lists_its_keys(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="keys are answer, question"):
        load_conversations(str(path))


def test_explicit_format_names_the_missing_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_ALPACA])
    with pytest.raises(DataError) as info:
        load_conversations(str(path), fmt="sharegpt")
    assert f"{path}: line 1: conversations: missing (data.format is sharegpt)" in str(info.value)


def test_fixture_with_bad_role_is_strict_by_default() -> None:
    path = str(FIXTURES / "bad_role.jsonl")
    with pytest.raises(DataError) as info:
        load_conversations(path)
    assert str(info.value).startswith(
        f"{path}: line 3: conversations[2].from: unknown role 'bot' (expected one of "
    )
    assert "data.on_error=skip" in str(info.value)  # says how to get past it


def test_a_lone_surrogate_is_a_bad_row_not_a_crash(tmp_path: Path) -> None:
    """An emoji cut in half by an exporter ("\\ud83d"): JSON reads it, no tokenizer takes it
    (the tokenizer's TypeError stopped the run, data.on_error: skip or not)."""
    path = tmp_path / "cut.jsonl"
    path.write_text(
        '{"instruction": "Say hi \\ud83d", "output": "hi"}\n{"instruction": "x", "output": "y"}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as info:
        load_conversations(str(path))
    assert str(info.value) == (
        f"{path}: line 1: instruction: holds a lone UTF-16 surrogate (\\ud83d at character 7), "
        "half of a character: not text a tokenizer takes (data.on_error=skip drops and counts "
        "such rows)"
    )
    out = load_conversations(str(path), on_error="skip")
    assert len(out.conversations) == 1 and len(out.skipped) == 1


def test_skip_mode_drops_and_counts_every_bad_row(tmp_path: Path) -> None:
    rows = [GOOD_ALPACA]
    for bad, _ in BAD_ROWS:
        rows += [bad, GOOD_ALPACA]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    out = load_conversations(str(path), on_error="skip")
    assert out.n_rows == len(rows)
    assert len(out.conversations) == len(BAD_ROWS) + 1
    assert len(out.skipped) == len(BAD_ROWS)
    for i, (reason, (_, problem)) in enumerate(zip(out.skipped, BAD_ROWS, strict=True)):
        assert reason.startswith(f"{path}: line {2 * i + 2}: {problem}")
    assert out.n_rows == len(out.conversations) + len(out.skipped)  # nothing silently dropped


def test_unknown_keys_of_messages_are_reported_as_unread(tmp_path: Path) -> None:
    named = weighted(1)
    named["messages"][0]["name"] = "bob"
    rows = [
        named,
        named,
        {"conversations": [{"from": "human", "value": "q", "weight": 0}, turns(("gpt", "a"))[0]]},
        {"messages": [{"role": "user", "content": "q", "name": None}, *msgs(("assistant", "a"))]},
        {
            "prompt": [{"role": "user", "content": "q", "name": "bob"}],
            "completion": [{"role": "assistant", "content": "a", "weight": 0}],
            "id": 7,
        },
        {"prompt": "q", "completion": "a"},
    ]
    path = str(write_jsonl(tmp_path / "d.jsonl", rows))
    out = load_conversations(path)
    assert out.unread == {
        (path, "messages", "messages[].name"): 2,
        (path, "sharegpt", "conversations[].weight"): 1,
        (path, "prompt_completion", "prompt[].name"): 1,
        (path, "prompt_completion", "completion[].weight"): 1,
        (path, "prompt_completion", "id"): 1,
    }
    assert len(out.conversations) == 6  # reported, never a reason to drop the row
    assert reads("prompt_completion", "completion[].weight") == (
        "completion[].role",
        "completion[].content",
    )


def test_invalid_json_line_names_the_line() -> None:
    path = str(FIXTURES / "bad_json.jsonl")
    with pytest.raises(DataError) as info:
        load_conversations(path)
    assert str(info.value).startswith(f"{path}: line 3: not valid JSON")
    out = load_conversations(path, on_error="skip")
    assert len(out.conversations) == 3
    assert out.n_rows == 4
    assert len(out.skipped) == 1 and "line 3: not valid JSON" in out.skipped[0]


def test_invalid_json_says_the_column(tmp_path: Path) -> None:
    """json's message for a control character ends in "at": the column is said after it."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"instruction": "q", "output": "a"}\n{"instruction": "q\x01"}\n')
    out = load_conversations(str(path), on_error="skip")
    assert out.skipped == [
        f"{path}: line 2: not valid JSON: Invalid control character at column 19"
    ]


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b""])
def test_a_row_cut_short_is_said_at_its_last_column(tmp_path: Path, end: bytes) -> None:
    """Not "column 1" of a line after it: the row's newline is not part of it."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"instruction": "x", "output": "y"' + end)
    out = load_conversations(str(path), on_error="skip")
    assert out.skipped == [f"{path}: line 1: not valid JSON: Expecting ',' delimiter at column 35"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_row(tmp_path: Path, suffix: str) -> None:
    # Notepad, Excel and PowerShell start UTF-8 files with one.
    rows = [GOOD_ALPACA, {"instruction": "Q", "output": "A"}]
    body = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    out = load_conversations(str(path))
    assert (out.n_rows, len(out.conversations), out.skipped) == (2, 2, [])
    assert out.conversations[1] == msgs(("user", "Q"), ("assistant", "A"))


def test_blank_lines_are_not_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(GOOD_ALPACA) + "\n\n  \n" + json.dumps(GOOD_ALPACA) + "\n")
    out = load_conversations(str(path))
    assert (out.n_rows, len(out.conversations), out.skipped) == (2, 2, [])


# ---------------------------------------------------------------- sources


def test_fixture_jsonl_mixed_formats_and_chinese_round_trip(tok: Any) -> None:
    convs = load_conversations(str(FIXTURES / "chat_zh.jsonl")).conversations
    assert len(convs) == 6
    assert convs[0] == msgs(("user", f"{ZH_INSTRUCTION}\n\n{ZH_INPUT}"), ("assistant", ZH_OUTPUT))
    assert [m["role"] for m in convs[1]] == ["user", "assistant"] * 2
    assert convs[2] == msgs(("user", "把这句话翻译成中文\n\nGood morning"), ("assistant", "早上好"))
    assert convs[3][0] == {"role": "system", "content": "你是一个乐于助人的助手。"}
    assert convs[5][0] == {"role": "system", "content": "Be brief."}
    # Byte-level tokenizer: Chinese survives tokenize -> decode exactly.
    text = convs[0][0]["content"]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_json_list_and_data_key_and_json_lines_in_a_json_file(tmp_path: Path) -> None:
    rows = [GOOD_ALPACA, {"messages": msgs(("user", ZH_INPUT), ("assistant", ZH_OUTPUT))}]
    expected = load_conversations(str(write_jsonl(tmp_path / "a.jsonl", rows))).conversations
    (tmp_path / "list.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "data.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    write_jsonl(tmp_path / "lines.json", rows)
    for name in ("list.json", "data.json", "lines.json"):
        assert load_conversations(str(tmp_path / name)).conversations == expected, name
    assert expected[1][0]["content"] == ZH_INPUT


def test_invalid_json_file_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"},\n  {"instruction" "q"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON: .*line 3"):
        load_conversations(str(path))


def test_a_json_object_on_one_line_is_a_row_over_several_lines_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    one = tmp_path / "one.json"  # a JSON-lines file of one row
    one.write_text(json.dumps(GOOD_ALPACA))
    assert len(load_conversations(str(one)).conversations) == 1
    path = tmp_path / "obj.json"
    path.write_text(json.dumps(GOOD_ALPACA, indent=2))
    with pytest.raises(DataError) as err:
        load_conversations(str(path))
    assert str(err.value) == (
        f"{path}: expected a JSON list of rows, an object whose 'data' holds them, or JSON "
        "lines (one row per line), got a JSON object over several lines"
    )
    text = tmp_path / "str.json"
    text.write_text('"just text"')
    with pytest.raises(DataError, match=r"str\.json: expected .*, got a JSON string$"):
        load_conversations(str(text))
    # Rows under "data": other top-level keys are said to be unread.
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": "1", "data": [GOOD_ALPACA]}))
    with caplog.at_level("WARNING"):
        assert len(load_conversations(str(wrapped)).conversations) == 1
    assert "top-level keys not read (rows are under 'data'): version" in caplog.text


def _mixed_rows() -> list[dict[str, Any]]:
    """Alpaca and ShareGPT rows with every column present, as a columnar file stores them."""
    return [
        {
            "instruction": ZH_INSTRUCTION,
            "input": ZH_INPUT,
            "output": ZH_OUTPUT,
            "conversations": None,
        },
        {
            "instruction": None,
            "input": None,
            "output": None,
            "conversations": turns(("human", "你好"), ("gpt", "你好！")),
        },
    ]


EXPECTED_MIXED = [
    msgs(("user", f"{ZH_INSTRUCTION}\n\n{ZH_INPUT}"), ("assistant", ZH_OUTPUT)),
    msgs(("user", "你好"), ("assistant", "你好！")),
]


def test_parquet_with_mixed_formats(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist(_mixed_rows()), path)
    assert load_conversations(str(path)).conversations == EXPECTED_MIXED


def test_saved_datasets_dir_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_list(_mixed_rows())
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_conversations(str(tmp_path / "ds")).conversations == EXPECTED_MIXED
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert load_conversations(str(tmp_path / "dd")).conversations == EXPECTED_MIXED
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match=r"splits test: name the training one, as .*no_train:SPLIT"):
        load_conversations(str(tmp_path / "no_train"))
    # Held out: its one split, whatever its name, or the one named.
    assert load_conversations(str(tmp_path / "no_train"), role="eval").conversations
    assert load_conversations(f"{tmp_path / 'no_train'}:test").conversations == EXPECTED_MIXED


def test_a_held_out_set_is_never_a_training_split_by_default(tmp_path: Path) -> None:
    import datasets

    rows = datasets.Dataset.from_list([{"instruction": "train q", "output": "a"}])
    held = datasets.Dataset.from_list([{"instruction": "test q", "output": "b"}])
    both = tmp_path / "dd"
    datasets.DatasetDict({"train": rows, "test": held}).save_to_disk(str(both))
    with pytest.raises(DataError) as err:
        load_conversations(str(both), role="eval")
    assert str(err.value) == (
        f"data.eval: {both}: a DatasetDict of splits train, test: name the held-out one, "
        f"as {both}:SPLIT"
    )
    got = load_conversations(f"{both}:test", role="eval").conversations
    assert got[0][0]["content"] == "test q"
    assert load_conversations(str(both)).conversations[0][0]["content"] == "train q"
    with pytest.raises(DataError, match=r"no split 'dev' \(has train, test\)"):
        load_conversations(f"{both}:dev", role="eval")
    rows.save_to_disk(str(tmp_path / "one"))
    with pytest.raises(DataError, match="is one Dataset, not splits to pick from"):
        load_conversations(f"{tmp_path / 'one'}:test")
    # A hub dataset read as the held-out set names its split (offline: refused before loading).
    with pytest.raises(DataError, match=r"^data.eval: hf:org/set: name the held-out split"):
        load_conversations("hf:org/set", role="eval")


def test_the_split_of_a_saved_dataset_is_read_through_the_pipeline(tmp_path: Path) -> None:
    import datasets

    from raysft.config import load_config
    from raysft.data.digest import source_digest
    from raysft.data.pipeline import load_split

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(4)]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:3]),
            "test": datasets.Dataset.from_list(rows[3:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    cfg = load_config(
        None, {"data.train": str(tmp_path / "dd"), "data.eval": f"{tmp_path}/dd:test"}
    )
    train, held, _ = load_split(cfg.data, seed=0)
    assert [c[-1]["content"] for c in held] == ["a3"] and len(train) == 3
    assert source_digest(f"{tmp_path}/dd:test") == source_digest(str(tmp_path / "dd"))


def test_bad_row_in_parquet_names_row_and_field(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q", "output": ""}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as info:
        load_conversations(str(path))
    assert str(info.value).startswith(f"{path}: row 1: output: empty")


def test_several_sources_concatenate_in_order(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD_ALPACA])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "x", "output": "y"}])
    out = load_conversations([str(a), str(b)])
    assert [c[-1]["content"] for c in out.conversations] == ["cba", "y"]
    assert out.n_rows == 2


@pytest.mark.parametrize(
    ("name", "problem"),
    [("missing.jsonl", "file not found"), ("data.csv", "unsupported file type '.csv'")],
)
def test_unreadable_source_names_the_file(tmp_path: Path, name: str, problem: str) -> None:
    if name.endswith(".csv"):
        (tmp_path / name).write_text("instruction,output\nq,a\n")
    path = str(tmp_path / name)
    with pytest.raises(DataError) as info:
        load_conversations(path)
    assert str(info.value).startswith(f"data.train: {path}: {problem}")
    with pytest.raises(DataError) as info:
        load_conversations(path, role="eval")
    assert str(info.value).startswith(f"data.eval: {path}: {problem}")


# ---------------------------------------------------------------- seeded split


def _numbered(n: int) -> list[list[dict[str, str]]]:
    return [msgs(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(n)]


def _ids(convs: list[list[dict[str, str]]]) -> list[str]:
    return [c[0]["content"] for c in convs]


def test_split_is_seeded_disjoint_and_complete() -> None:
    convs = _numbered(50)
    train, evals = split_train_eval(convs, eval_fraction=0.2, seed=3)
    again = split_train_eval(convs, eval_fraction=0.2, seed=3)
    assert (_ids(train), _ids(evals)) == (_ids(again[0]), _ids(again[1]))
    assert len(evals) == 10 and len(train) == 40
    assert not set(_ids(train)) & set(_ids(evals))
    assert sorted(_ids(train) + _ids(evals)) == sorted(_ids(convs))
    other = split_train_eval(convs, eval_fraction=0.2, seed=4)
    assert set(_ids(other[1])) != set(_ids(evals))  # the seed matters


@pytest.mark.parametrize(("n", "fraction"), [(2, 0.01), (5, 0.01), (2, 0.99), (3, 0.9)])
def test_split_leaves_both_sides_non_empty(n: int, fraction: float) -> None:
    train, evals = split_train_eval(_numbered(n), eval_fraction=fraction, seed=0)
    assert train and evals
    assert len(train) + len(evals) == n


def test_split_keeps_copies_of_a_conversation_on_one_side() -> None:
    # Every conversation three times over: a held-out row must not also be a training row.
    convs = [c for c in _numbered(30) for _ in range(3)]
    for seed in range(5):
        train, evals = split_train_eval(convs, eval_fraction=0.1, seed=seed)
        assert evals and not set(_ids(train)) & set(_ids(evals))
        assert len(train) + len(evals) == 90
        assert len(evals) == 9  # three whole groups, the fraction's 9 rows


def test_split_without_copies_is_unchanged_by_grouping() -> None:
    # The first eval_fraction of the seeded shuffle, as before copies were grouped.
    convs = _numbered(40)
    order = list(range(40))
    random.Random(7).shuffle(order)
    _, evals = split_train_eval(convs, eval_fraction=0.25, seed=7)
    assert sorted(_ids(evals)) == sorted(f"q{i}" for i in order[:10])


def test_split_never_leaves_training_empty_for_a_big_group() -> None:
    convs = [*(_numbered(1) * 9), *_numbered(3)[1:]]  # q0 nine times, q1, q2
    for seed in range(10):
        train, evals = split_train_eval(convs, eval_fraction=0.5, seed=seed)
        assert train and evals
        assert not set(_ids(train)) & set(_ids(evals))


def test_split_holds_out_no_more_than_the_fraction_for_a_big_group() -> None:
    # 60 copies of one conversation and 40 others: 10%, not the 60 copies, is held out.
    convs = [*(_numbered(1) * 60), *_numbered(41)[1:]]
    for seed in range(10):
        train, evals = split_train_eval(convs, eval_fraction=0.1, seed=seed)
        assert len(evals) == 10 and "q0" not in _ids(evals)
    # Every conversation with more copies than the fraction: the one with fewest is held out.
    _, evals = split_train_eval([*(_numbered(1) * 5), *(_numbered(2)[1:] * 3)],
                                eval_fraction=0.1, seed=0)  # fmt: skip
    assert _ids(evals) == ["q1"] * 3


def test_split_of_copies_of_one_conversation_is_an_error() -> None:
    with pytest.raises(DataError, match="all 4 conversations are the same"):
        split_train_eval(_numbered(1) * 4, eval_fraction=0.5, seed=0)


def test_split_of_one_conversation_is_an_error() -> None:
    with pytest.raises(DataError, match="need at least 2 conversations"):
        split_train_eval(_numbered(1), eval_fraction=0.1, seed=0)


def test_a_plain_directory_is_named_as_the_data_setting_with_what_to_give(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "rows.txt").write_text("not a dataset", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_conversations(str(folder), role="eval")
    assert str(err.value).startswith(
        f"data.eval: {folder}: a directory, but not one `datasets` saved (a directory is read as "
        "a saved dataset; give a .jsonl, .json or .parquet file, or a list of them for shards): "
    ), err.value


def test_a_plain_text_row_is_one_text_message_without_a_system_prompt(tmp_path: Path) -> None:
    from raysft.data.formats import is_plain_text

    row = {"text": "### Human: hi ### Assistant: hello", "id": 7, "tests": "assert True"}
    conv = to_conversation(row, system_prompt="Be brief.")
    assert conv == [{"role": "text", "content": row["text"]}] and is_plain_text(conv)
    assert not is_plain_text(msgs(("user", "q"), ("assistant", "a")))
    # Its other fields are reported, as any format's: a text row has no answer to test.
    path = write_jsonl(tmp_path / "t.jsonl", [row, GOOD_ALPACA])
    loaded = load_conversations(str(path))
    assert loaded.unread == {(str(path), "text", "id"): 1, (str(path), "text", "tests"): 1}
    with pytest.raises(DataError, match=r"line 2: text: missing"):
        load_conversations(str(path), fmt="text")


@pytest.mark.parametrize(
    ("row", "problem"),
    [({"text": None}, "no field holds a value (text: null)"), ({}, "empty")],
)
def test_a_row_without_values_says_so(tmp_path: Path, row: dict[str, Any], problem: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD_ALPACA, row])
    with pytest.raises(DataError) as info:
        load_conversations(str(path))
    assert str(info.value).startswith(f"{path}: line 2: {problem} (data.on_error=skip drops")
