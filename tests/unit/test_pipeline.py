"""Data section -> tokenized train/eval examples, and a report whose counts add up."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from raysft.config import DataSection
from raysft.data.pipeline import load_eval, load_split, prepare_data, warn_of_eval_in_train
from raysft.data.tokens import trained_spans
from raysft.errors import DataError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TRAIN = str(FIXTURES / "chat_zh.jsonl")  # 6 rows, one of them 2 assistant turns
EVAL = str(FIXTURES / "eval_zh.jsonl")  # 2 rows


def write_jsonl(path: Path, rows: list[Any]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return str(path)


def alpaca(instruction: str, output: str) -> dict[str, str]:
    return {"instruction": instruction, "output": output}


def section(**kw: Any) -> DataSection:
    return DataSection(**{"train": TRAIN, "eval": EVAL, "template": "chatml", **kw})


# Byte tokenizer, ChatML, single-turn alpaca row: the untrained prompt
# "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n" is this many tokens plus
# the instruction's bytes (each special token is one token); then answer + <|im_end|> is trained.
PROMPT_TOKENS = 1 + len("user\n") + 1 + len("\n") + 1 + len("assistant\n")


def prompt_len(instruction: str) -> int:
    return PROMPT_TOKENS + len(instruction.encode("utf-8"))


def test_with_eval_files_counts_are_right(tok: Any) -> None:
    data = prepare_data(section(), tok, seed=0)
    r = data.report
    assert (r.rows_read, r.rows_skipped, r.skipped) == (8, 0, [])
    assert (r.train_examples, r.eval_examples) == (6, 2)
    assert len(data.train) == 6 and len(data.eval) == 2
    assert (r.train_truncated, r.train_dropped_no_trained_tokens) == (0, 0)
    assert (r.eval_truncated, r.eval_dropped_no_trained_tokens) == (0, 0)
    assert r.train_tokens == sum(len(e.input_ids) for e in data.train)
    assert r.trained_tokens == sum(e.n_trained for e in data.train)
    assert 0 < r.trained_tokens < r.train_tokens
    # File order is kept and eval examples line up with their conversations.
    assert trained_spans(data.train[0], tok) == ["The weather is really nice today.<|im_end|>"]
    assert [c[-1]["content"] for c in data.eval_conversations] == [
        "zyx",
        "The weather is really nice today.",
    ]
    assert trained_spans(data.eval[0], tok) == ["zyx<|im_end|>"]


def test_a_long_tokenization_says_how_far_it_got(
    tok: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every PROGRESS_EVERY_S (here 0: at every row after the first), per split."""
    from raysft.data import pipeline

    monkeypatch.setattr(pipeline, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="raysft.data.pipeline"):
        prepare_data(section(), tok, seed=0)
    said = [m for m in caplog.messages if " conversations (" in m]
    assert [m.split(" (")[0] for m in said] == [
        *(f"data.train: tokenized {i} of 6 conversations" for i in range(1, 6)),
        "data.eval: tokenized 1 of 2 conversations",
    ]


def test_without_eval_a_seeded_split_of_train(tok: Any) -> None:
    cfg = section(eval=None, eval_fraction=0.34)
    data = prepare_data(cfg, tok, seed=1)
    again = prepare_data(cfg, tok, seed=1)
    assert data.report.rows_read == 6
    assert (data.report.train_examples, data.report.eval_examples) == (4, 2)
    assert [e.input_ids for e in data.eval] == [e.input_ids for e in again.eval]
    train_ids = {tuple(e.input_ids) for e in data.train}
    eval_ids = {tuple(e.input_ids) for e in data.eval}
    assert not train_ids & eval_ids
    assert len(train_ids | eval_ids) == 6


def test_skip_mode_reports_skipped_rows(tok: Any) -> None:
    bad_role = str(FIXTURES / "bad_role.jsonl")
    with pytest.raises(DataError, match="bad_role.jsonl: line 3: conversations"):
        prepare_data(section(train=bad_role), tok, seed=0)
    data = prepare_data(section(train=bad_role, on_error="skip"), tok, seed=0)
    r = data.report
    assert (r.rows_read, r.rows_skipped, r.train_examples) == (6, 1, 3)
    assert r.skipped[0].startswith(f"{bad_role}: line 3: conversations[2].from: unknown role")
    assert r.as_dict()["rows_skipped"] == 1


def test_system_prompt_and_template_come_from_the_section(tok: Any) -> None:
    data = prepare_data(section(template="llama2", system_prompt="Be brief."), tok, seed=0)
    text = tok.decode(data.train[0].input_ids, skip_special_tokens=False)
    assert text.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nTranslate")
    assert text.endswith("[/INST] The weather is really nice today. </s>")
    # A row with its own system message keeps it.
    assert "<<SYS>>\n你是一个乐于助人的助手。\n<</SYS>>" in tok.decode(
        data.train[3].input_ids, skip_special_tokens=False
    )


def test_truncation_drops_untrainable_and_counts_truncated(tmp_path: Path, tok: Any) -> None:
    max_len = 64
    fits = alpaca("short", "ok")
    cut = alpaca("q" * 40, "a" * 40)  # prompt fits, answer is cut: still trainable
    lost = alpaca("p" * 70, "answer")  # prompt alone is longer than max_seq_len
    assert prompt_len("q" * 40) < max_len < prompt_len("q" * 40) + 40
    assert prompt_len("p" * 70) > max_len
    train = write_jsonl(tmp_path / "t.jsonl", [fits, cut, lost, fits])
    held = write_jsonl(tmp_path / "e.jsonl", [fits, cut, lost])
    cfg = section(train=train, eval=held, max_seq_len=max_len, on_error="skip")
    data = prepare_data(cfg, tok, seed=0)
    r = data.report
    assert r.rows_read == 7
    assert (r.train_dropped_no_trained_tokens, r.eval_dropped_no_trained_tokens) == (1, 1)
    assert (r.train_truncated, r.eval_truncated) == (1, 1)
    assert (r.train_examples, r.eval_examples) == (3, 2)
    assert [c[0]["content"] for c in data.eval_conversations] == ["short", "q" * 40]
    assert [len(e.input_ids) for e in data.train] == [
        prompt_len("short") + len("ok") + 1,
        max_len,
        prompt_len("short") + len("ok") + 1,
    ]
    assert trained_spans(data.train[1], tok) == ["a" * (max_len - prompt_len("q" * 40))]


def test_truncation_is_counted_per_split(tmp_path: Path, tok: Any) -> None:
    fits, cut, lost = alpaca("short", "ok"), alpaca("q" * 40, "a" * 40), alpaca("p" * 70, "x")
    train = write_jsonl(tmp_path / "t.jsonl", [fits, fits])
    held = write_jsonl(tmp_path / "e.jsonl", [cut, cut, lost, fits])
    data = prepare_data(
        section(train=train, eval=held, max_seq_len=64, on_error="skip"), tok, seed=0
    )
    r = data.report
    assert (r.train_truncated, r.train_dropped_no_trained_tokens) == (0, 0)
    assert (r.eval_truncated, r.eval_dropped_no_trained_tokens) == (2, 1)
    assert sum(e.truncated for e in data.eval) == 2 and r.as_dict()["eval_truncated"] == 2
    # And the other way round: the training split's own.
    data = prepare_data(
        section(train=held, eval=train, max_seq_len=64, on_error="skip"), tok, seed=0
    )
    r = data.report
    assert (r.train_truncated, r.train_dropped_no_trained_tokens) == (2, 1)
    assert (r.eval_truncated, r.eval_dropped_no_trained_tokens) == (0, 0)


def test_when_truncation_leaves_no_training_example_it_is_an_error(
    tmp_path: Path, tok: Any
) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [alpaca("p" * 70, "a"), alpaca("r" * 80, "b")])
    with pytest.raises(DataError, match=r"data\.train: every sample lost .* data\.max_seq_len=32"):
        prepare_data(section(train=train, max_seq_len=32, on_error="skip"), tok, seed=0)


def test_when_truncation_leaves_no_eval_example_it_is_an_error(tmp_path: Path, tok: Any) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [alpaca("q", "a")])
    held = write_jsonl(tmp_path / "e.jsonl", [alpaca("p" * 70, "a")])
    with pytest.raises(DataError, match=r"data\.eval: every sample lost .* data\.max_seq_len=32"):
        prepare_data(section(train=train, eval=held, max_seq_len=32, on_error="skip"), tok, seed=0)


def test_an_empty_eval_split_is_told_with_its_own_rows_only(tmp_path: Path, tok: Any) -> None:
    """Rows skipped or truncated in data.train are neither counted nor quoted as data.eval's."""
    system_row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]}  # fmt: skip
    train = write_jsonl(
        tmp_path / "t.jsonl", [alpaca("q", "a"), {"foo": 1}, {"foo": 2}, alpaca("p" * 70, "a")]
    )
    held = write_jsonl(tmp_path / "e.jsonl", [system_row])
    cfg = section(train=train, eval=held, template="tokenizer", on_error="skip", max_seq_len=32)
    with pytest.raises(DataError) as err:
        prepare_data(cfg, _no_system_role(tok), seed=0)
    assert str(err.value).startswith(
        f"data.eval: no usable rows (1 skipped; the first: {held}: line 1: data.template="
    )
    truncated = write_jsonl(tmp_path / "e2.jsonl", [alpaca("p" * 70, "a")])
    with pytest.raises(DataError) as err:
        prepare_data(
            section(train=train, eval=truncated, on_error="skip", max_seq_len=32), tok, seed=0
        )
    assert str(err.value).endswith(
        f"(raise it or shorten the prompts; the first: {truncated}: line 1: its prompt fills "
        "all data.max_seq_len=32 tokens, nothing left to train)"
    )
    assert str(err.value).startswith("data.eval: every sample lost")


def test_an_eval_file_that_is_also_a_training_file_is_warned_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from raysft.assets import asset_path

    rows = write_jsonl(tmp_path / "rows.jsonl", [alpaca("q", "a"), alpaca("r", "b")])
    monkeypatch.chdir(tmp_path)
    # Two spellings of one file: compared by the path they resolve to.
    cfg = section(train=[TRAIN, "./rows.jsonl"], eval=rows)
    with caplog.at_level("WARNING", logger="raysft.data.pipeline"):
        load_split(cfg, seed=0)
    assert [r.getMessage() for r in caplog.records] == [
        f"data.eval: {rows} is also in data.train (as ./rows.jsonl): the eval rows are training "
        "rows, so the held-out scores say nothing of unseen data; use another file, or set "
        "data.eval: null for a seeded split (data.eval_fraction)"
    ]
    embedded = "embedded:tasks-alpaca.jsonl"
    same = section(train=embedded, eval=str(asset_path("tasks-alpaca.jsonl")))
    assert warn_of_eval_in_train(same) == [str(asset_path("tasks-alpaca.jsonl"))]
    assert warn_of_eval_in_train(section(train=embedded, eval="embedded:tasks-eval.jsonl")) == []
    assert warn_of_eval_in_train(section()) == []  # chat_zh.jsonl, eval_zh.jsonl


def test_a_saved_split_is_compared_by_the_split_each_side_reads(tmp_path: Path) -> None:
    import datasets

    rows = {"instruction": ["q", "r"], "output": ["a", "b"]}
    both = tmp_path / "both"
    datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows), test=datasets.Dataset.from_dict(rows)
    ).save_to_disk(both)
    only = tmp_path / "only"
    datasets.DatasetDict(validation=datasets.Dataset.from_dict(rows)).save_to_disk(only)

    def warned(train: str, eval_: str) -> bool:
        return warn_of_eval_in_train(section(train=train, eval=eval_)) == [eval_]

    # Training reads a DatasetDict's `train` unless told: DIR and DIR:train are the same rows.
    assert warned(str(both), f"{both}:train")
    assert not warned(str(both), f"{both}:test")
    # A held-out DIR of one split reads that split, whatever its name.
    assert warned(f"{only}:validation", str(only))
    assert not warned(str(both), str(only))
    # The hub: an unnamed split is `train` for training.
    assert warned("hf:org/set", "hf:org/set:train")
    assert not warned("hf:org/set", "hf:org/set:test")


def test_rows_truncation_left_nothing_to_train_are_named(
    tmp_path: Path, tok: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fits, lost = alpaca("short", "ok"), alpaca("p" * 70, "answer")
    train = write_jsonl(tmp_path / "t.jsonl", [fits, lost, fits])
    held = write_jsonl(tmp_path / "e.jsonl", [fits, fits, lost])
    data = prepare_data(
        section(train=train, eval=held, max_seq_len=64, on_error="skip"), tok, seed=0
    )
    said = " its prompt fills all data.max_seq_len=64 tokens, nothing left to train"
    assert data.report.dropped == [f"{train}: line 2:{said}", f"{held}: line 3:{said}"]
    assert data.report.as_dict()["dropped"] == data.report.dropped


@pytest.mark.parametrize("side", ["train", "eval"])
def test_strict_mode_names_the_row_whose_prompt_fills_max_seq_len(
    tmp_path: Path, tok: Any, side: str
) -> None:
    fits, lost = alpaca("short", "ok"), alpaca("p" * 70, "answer")
    assert prompt_len("p" * 70) > 64
    rows = {"train": [fits, fits], "eval": [fits, fits]}
    rows[side] = [fits, lost, fits]
    files = {k: write_jsonl(tmp_path / f"{k}.jsonl", v) for k, v in rows.items()}
    with pytest.raises(DataError) as err:
        prepare_data(section(**files, max_seq_len=64), tok, seed=0)
    assert str(err.value).startswith(
        f"{files[side]}: line 2: its prompt fills all data.max_seq_len=64 tokens"
    )


def test_all_rows_skipped_is_an_error(tmp_path: Path, tok: Any) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "q"}, {"foo": 1}])
    with pytest.raises(DataError) as err:
        load_split(section(train=train, on_error="skip"), seed=0)
    assert str(err.value) == (
        f"data.train: no usable rows (2 skipped; the first: {train}: line 1: output: missing)"
    )
    held = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "q"}])
    with pytest.raises(DataError, match=r"data\.eval: no usable rows \(1 skipped; the first: "):
        load_split(section(eval=held, on_error="skip"), seed=0)


def test_max_eval_samples_caps_the_eval_set(tmp_path: Path, tok: Any) -> None:
    held = write_jsonl(tmp_path / "e.jsonl", [alpaca(f"q{i}", f"a{i}") for i in range(10)])
    data = prepare_data(section(eval=held, max_eval_samples=3), tok, seed=0)
    assert len(data.eval) == len(data.eval_conversations) == data.report.eval_examples == 3
    assert data.report.rows_read == 16
    answers = [c[-1]["content"] for c in data.eval_conversations]
    assert len(set(answers)) == 3 and set(answers) <= {f"a{i}" for i in range(10)}


def test_template_errors_become_data_errors(tok: Any) -> None:
    import copy

    bad = copy.deepcopy(tok)
    bad.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(DataError, match="data.template=tokenizer: .*System role not supported"):
        prepare_data(section(template="tokenizer"), bad, seed=0)


def _no_system_role(tok: Any) -> Any:
    """The embedded tokenizer with a template that refuses system messages, as Gemma's does."""
    import copy

    bad = copy.deepcopy(tok)
    bad.chat_template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + tok.chat_template
    )
    return bad


def test_a_row_the_template_refuses_is_named_or_skipped(tmp_path: Path, tok: Any) -> None:
    system_row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]}  # fmt: skip
    path = write_jsonl(tmp_path / "t.jsonl", [alpaca("q0", "a0"), system_row, alpaca("q2", "a2")])
    bad = _no_system_role(tok)
    with pytest.raises(DataError) as info:
        prepare_data(section(train=path, template="tokenizer"), bad, seed=0)
    assert str(info.value).startswith(f"{path}: line 2: data.template=tokenizer: ")
    assert "System role not supported" in str(info.value)
    data = prepare_data(section(train=path, template="tokenizer", on_error="skip"), bad, seed=0)
    assert data.report.train_examples == 2 and data.report.rows_skipped == 1
    assert data.report.skipped[0].startswith(f"{path}: line 2: data.template=tokenizer: ")
    only = write_jsonl(tmp_path / "s.jsonl", [system_row])
    with pytest.raises(DataError) as info:
        prepare_data(section(train=only, template="tokenizer", on_error="skip"), bad, seed=0)
    assert str(info.value).startswith(
        f"data.train: no usable rows (1 skipped; the first: {only}: line 1: data.template="
    )


def test_fields_no_format_reads_are_reported_once_per_source_and_field(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    typo = {"instruction": "q", "inputs": "context", "output": "a"}
    train = write_jsonl(tmp_path / "t.jsonl", [typo, typo, {**alpaca("q", "a"), "id": 7}])
    with caplog.at_level(logging.WARNING, logger="raysft.data.pipeline"):
        _, _, report = load_split(section(train=train), seed=0)
    reads = "instruction, input, output, system, history, tests"
    assert report.unread_fields == [
        f"{train}: field 'id' in 1 row(s) is not read (alpaca rows read {reads}); if it is "
        "misspelt, its text is left out",
        f"{train}: field 'inputs' in 2 row(s) is not read (alpaca rows read {reads}); if it is "
        "misspelt, its text is left out",
    ]
    assert [r.getMessage() for r in caplog.records] == report.unread_fields


def test_keys_of_messages_no_format_reads_are_reported(tmp_path: Path) -> None:
    user = {"role": "user", "content": "q", "name": "bob"}
    answer = {"role": "assistant", "content": "a", "weight": 1}
    train = write_jsonl(tmp_path / "t.jsonl", [{"messages": [user, answer]}])
    _, _, report = load_split(section(train=train), seed=0)
    reads = "messages[].role, messages[].content, messages[].weight"
    assert report.unread_fields == [
        f"{train}: field 'messages[].name' in 1 row(s) is not read (messages rows read "
        f"{reads}); if it is misspelt, its text is left out"
    ]


def test_an_all_weight_0_row_is_skipped_and_counted(tmp_path: Path, tok: Any) -> None:
    answer = {"role": "assistant", "content": "a", "weight": 0}
    untrained = {"messages": [{"role": "user", "content": "q"}, answer]}
    train = write_jsonl(tmp_path / "t.jsonl", [alpaca("q", "a"), untrained, alpaca("r", "b")])
    why = f"{train}: line 2: messages: every assistant message has weight 0: nothing to train"
    with pytest.raises(DataError, match=re.escape(why)):
        prepare_data(section(train=train), tok, seed=0)
    data = prepare_data(section(train=train, on_error="skip"), tok, seed=0)
    assert (data.report.rows_skipped, data.report.train_examples) == (1, 2)
    assert data.report.skipped == [why]


def test_generation_scores_the_last_trained_answer_of_an_eval_row(tmp_path: Path, tok: Any) -> None:
    """A final answer of weight 0 is context, not a reference: exact match and the other
    generation metrics answer the row's last trained turn, after the history before it."""
    first = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    second = [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "x", "weight": 0}]
    evals = write_jsonl(tmp_path / "e.jsonl", [{"messages": first + second}, alpaca("q", "a")])
    data = prepare_data(section(eval=evals), tok, seed=0)
    assert [c[-1]["content"] for c in data.eval_conversations] == ["a1", "a"]
    assert data.eval_conversations[0] == first
    # The eval loss still reads the whole row: its weight-0 answer is in the tokens, untrained.
    assert data.eval[0].n_trained == len("a1") + 1  # its bytes and <|im_end|>
    assert tok.decode(data.eval[0].input_ids).rstrip().endswith("assistant\nx<|im_end|>")


def test_null_columns_are_not_unread_fields(tmp_path: Path) -> None:
    # Parquet / `datasets` rows of mixed formats carry every column, null where a row has none.
    rows = [{**alpaca("q", "a"), "conversations": None}, {**alpaca("q2", "a2"), "input": None}]
    _, _, report = load_split(section(train=write_jsonl(tmp_path / "t.jsonl", rows)), seed=0)
    assert report.unread_fields == []


def test_a_key_given_twice_in_a_row_is_a_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": "a", "output": "b"}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as err:
        load_split(section(train=str(path)), seed=0)
    assert str(err.value).startswith(
        f"{path}: line 2: key 'output' given twice in one object; which is meant?"
    )


def test_a_key_given_twice_in_a_json_file_is_one_bad_row_that_skip_drops(tmp_path: Path) -> None:
    # A JSON array, and the key twice inside a message: the row is malformed, not the file.
    path = tmp_path / "t.json"
    path.write_text(
        '[{"instruction": "q", "output": "a"},'
        ' {"messages": [{"role": "user", "content": "q", "content": "r"},'
        ' {"role": "assistant", "content": "a"}]},'
        ' {"instruction": "q2", "output": "a2"}]',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as err:
        load_split(section(train=str(path)), seed=0)
    assert str(err.value).startswith(f"{path}: row 1: key 'content' given twice in one object")
    train, _, report = load_split(section(train=str(path), on_error="skip"), seed=0)
    assert len(train) == 2 and report.rows_skipped == 1


@pytest.mark.parametrize("max_eval_samples", [None, 3])
def test_load_eval_reads_the_rows_load_split_does_without_the_training_data(
    tmp_path: Path, max_eval_samples: int | None
) -> None:
    held = write_jsonl(tmp_path / "e.jsonl", [alpaca(f"q{i}", f"a{i}") for i in range(8)])
    train = write_jsonl(tmp_path / "t.jsonl", [alpaca("t", "u")])
    cfg = section(train=train, eval=held, max_eval_samples=max_eval_samples)
    _, split_rows, _ = load_split(cfg, seed=5)
    (tmp_path / "t.jsonl").unlink()  # scoring needs only the held-out rows
    rows, report = load_eval(cfg, seed=5)
    assert rows == split_rows and len(rows) == (max_eval_samples or 8)
    assert report.rows_read == 8


def test_load_eval_splits_the_training_data_when_there_is_no_eval_source(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "t.jsonl", [alpaca(f"q{i}", f"a{i}") for i in range(20)])
    cfg = section(train=train, eval=None, eval_fraction=0.25)
    assert load_eval(cfg, seed=1)[0] == load_split(cfg, seed=1)[1]


def test_special_token_text_in_a_message_is_said_with_its_row(
    tmp_path: Path, tok: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An answer holding '</s>' (HTML strikethrough) is tokenized with the real EOS id, as a
    chat template tokenizes it at inference: the run trains on, and says which rows do so."""
    rows = [
        {"instruction": "Say hi.", "output": "hi"},
        {"instruction": "Strike it.", "output": "Use <s>old</s> here."},
        {"instruction": "Mark <|im_start|> it.", "output": "ok"},
    ]
    train = tmp_path / "rows.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with caplog.at_level("WARNING", logger="raysft.data.pipeline"):
        data = prepare_data(section(train=str(train), template="llama2"), tok, seed=0)
    said = [m for m in caplog.messages if "special token's text" in m]
    assert said == [
        f"data.train: 2 of 3 rows hold a special token's text in a message (the first: {train}: "
        "line 2, assistant: '<s>'): the tokenizer reads it as that token, not as text, as a chat "
        "template does at inference. In an answer the model learns to emit it there (an "
        "end-of-sequence token ends generation early). If it is meant as text, change it in the "
        "data"
    ]
    assert data.report.train_examples == 3  # said, not dropped
    eos = [t for t in data.train[1].labels if t == tok.eos_token_id]
    assert len(eos) == 2  # the answer's '</s>' and its terminator
    caplog.clear()
    with caplog.at_level("WARNING", logger="raysft.data.pipeline"):
        prepare_data(section(), tok, seed=0)
    assert not [m for m in caplog.messages if "special token's text" in m]


@pytest.mark.parametrize("blank", ["", "  ", "\n"])
def test_a_blank_system_prompt_is_none_as_a_rows_blank_system_is(tok: Any, blank: str) -> None:
    cfg = section(template="llama2", system_prompt=blank)
    assert cfg.system_prompt is None
    text = tok.decode(prepare_data(cfg, tok, seed=0).train[0].input_ids)
    assert "<<SYS>>" not in text and text.startswith("<s>[INST] Translate")


def test_train_on_prompt_trains_every_token_of_a_training_row_and_no_more_of_an_eval_one(
    tmp_path: Path, tok: Any
) -> None:
    weighted = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", "weight": 0},
            {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"},
        ]
    }
    train = write_jsonl(tmp_path / "t.jsonl", [alpaca("Say hi", "hi"), weighted])
    plain = prepare_data(section(train=train), tok, seed=0)
    whole = prepare_data(section(train=train, train_on_prompt=True), tok, seed=0)
    for ex, before in zip(whole.train, plain.train, strict=True):
        assert ex.input_ids == before.input_ids
        assert ex.labels == ex.input_ids  # the prompt, markup and the weight-0 answer too
        assert 0 < before.n_trained < ex.n_trained
    assert whole.report.trained_tokens == whole.report.train_tokens
    # The held-out loss is on the answers either way: the eval rows are the same examples.
    assert [e.labels for e in whole.eval] == [e.labels for e in plain.eval]


def test_train_on_prompt_leaves_the_bos_a_template_opens_with_untrained() -> None:
    from test_templates import _metaspace_tokenizer

    from raysft.data.pipeline import DataReport, render_row
    from raysft.data.tokens import IGNORE, tokenize

    sp = _metaspace_tokenizer(bos=True)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    segs = render_row(conv, section(train_on_prompt=True), sp, DataReport(), training=True)
    assert segs is not None
    ex = tokenize(segs, sp, max_seq_len=512)
    assert ex.input_ids[0] == sp.bos_token_id and ex.labels[0] == IGNORE
    assert ex.labels[1:] == ex.input_ids[1:]
    # llama2 writes "<s>" as its text's first characters: split off, untrained, all the same.
    llama = render_row(conv, section(train_on_prompt=True, template="llama2"), sp, DataReport(),
                       training=True)  # fmt: skip
    assert llama is not None
    ex = tokenize(llama, sp, max_seq_len=512)
    assert ex.input_ids[0] == sp.bos_token_id and ex.labels[0] == IGNORE
    assert ex.labels[1:] == ex.input_ids[1:]
    # Not a training row (the eval split, a generation prompt): as the template marks it.
    held_out = render_row(conv, section(train_on_prompt=True), sp, DataReport())
    assert held_out is not None and not all(s.trained for s in held_out)


def test_train_on_prompt_can_be_searched_and_a_trial_of_the_other_value_reads_its_own() -> None:
    from raysft.config import SearchParam, load_config
    from raysft.data.shared import data_key
    from raysft.search.searchable import check_param

    cfg = load_config(None, {})
    flipped = load_config(None, {"data.train_on_prompt": True})
    assert data_key(cfg, seed_matters=False) != data_key(flipped, seed_matters=False)
    choice = SearchParam(type="choice", values=[False, True])
    assert check_param("data.train_on_prompt", choice, {}, cfg) is None


def test_a_plain_text_row_trains_its_text_and_the_eos_after_it_whatever_the_template(
    tmp_path: Path, tok: Any
) -> None:
    text = "### Human: Spell abc backwards. ### Assistant: cba"
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": text}, alpaca("Say hi", "hi")])
    for template in ("chatml", "llama2", "vicuna"):
        data = prepare_data(section(train=train, template=template), tok, seed=0)
        ex = data.train[0]
        assert ex.labels == ex.input_ids  # every token, no template around it
        assert tok.decode(ex.input_ids, skip_special_tokens=False) == text + tok.eos_token
        assert ex.input_ids[-1] == tok.eos_token_id
        assert trained_spans(data.train[1], tok) != [tok.decode(data.train[1].input_ids)]


def test_a_plain_text_row_opens_with_the_bos_a_tokenizer_adds_untrained() -> None:
    from test_templates import _metaspace_tokenizer

    from raysft.data.templates import render
    from raysft.data.tokens import IGNORE, tokenize
    from raysft.errors import TemplateError

    sp = _metaspace_tokenizer(bos=True)
    conv = [{"role": "text", "content": "hello world"}]
    ex = tokenize(render(conv, template="chatml", tokenizer=sp), sp, max_seq_len=512)
    assert ex.input_ids[0] == sp.bos_token_id and ex.labels[0] == IGNORE
    assert ex.labels[1:] == ex.input_ids[1:] and ex.input_ids[-1] == sp.eos_token_id
    with pytest.raises(TemplateError, match="a plain-text row has no prompt to answer"):
        render(conv, template="chatml", tokenizer=sp, generation=True)


def test_generation_leaves_plain_text_rows_out_and_refuses_a_held_out_set_of_them_alone(
    tok: Any,
) -> None:
    from raysft.config import load_config
    from raysft.train.evaluate import generation_rows

    cfg = load_config(None, {})
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    text = [{"role": "text", "content": "plain"}]
    assert generation_rows([text, chat, text], tok, cfg) == [chat]
    with pytest.raises(DataError) as err:
        generation_rows([text, text], tok, cfg)
    assert str(err.value) == (
        "data.eval: its 2 rows are plain text, with no answer to generate: exact match, "
        "ROUGE-L, BLEU and pass@k cannot be scored on them; set train.exact_match: false (eval "
        "loss scores them), or hold out rows with answers"
    )


def test_raysft_evaluate_scores_plain_text_rows_on_their_loss_by_default() -> None:
    from raysft.train.score_saved import select_metrics

    text = [{"role": "text", "content": "plain"}]
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert [m.name for m in select_metrics(None, [text, text])] == ["eval_loss", "perplexity"]
    assert "exact_match" in [m.name for m in select_metrics(None, [text, chat])]


def test_generated_metrics_asked_of_plain_text_rows_are_refused_before_a_model_loads() -> None:
    from raysft.train.score_saved import select_metrics

    text = [{"role": "text", "content": "plain"}]
    with pytest.raises(DataError) as err:
        select_metrics(["eval_loss", "exact_match"], [text, text])
    assert str(err.value) == (
        "--metrics exact_match: the 2 eval rows are plain text, with no answer to generate; "
        "score them with --metrics eval_loss"
    )
    assert [m.name for m in select_metrics(["perplexity"], [text])] == ["perplexity"]
