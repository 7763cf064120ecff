"""Embedded assets: byte-level tokenizer, shipped tiny base model and task datasets."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raysft.assets import (
    EMBEDDED_PREFIX,
    absolute_if_local,
    asset_path,
    corpus,
    resolve,
    text_code,
)
from raysft.assets.tokenizer import SPECIAL_TOKENS, build_tokenizer
from raysft.errors import AssetError

NASTY = [
    "",
    " ",
    "   leading and trailing   ",
    "a  b   c\t\td",
    "\n",
    "\n\nline one\r\nline two\n",
    "hello",
    "Hello, World!",
    "中文文本测试",
    "emoji 🤖👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "café naïve résumé",
    "ｆｕｌｌｗｉｄｔｈ and combining e\u0301",
    "\u200b zero width \ufeff bom",
    "<s>[INST] hi [/INST] yo </s><|im_start|>a<|im_end|>\n",
    "<unk><pad><s></s>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    " <s> spaced </s> ",
    "<s<s>>",
    "<|im_start",
    "\x00\x01\x7f control",
    "Ġ Ċ ĉ byte-level look-alikes",
]


@pytest.fixture(scope="module")
def shipped_tok():
    return AutoTokenizer.from_pretrained(asset_path("tiny-base"))


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(asset_path("tiny-base")).eval()


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = [*NASTY, "<s>", "</s>", "<|im_end|>", "<|im_start|>", " ", "\n"]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 30)):
            r = rng.random()
            if r < 0.15:
                chars.append(rng.choice(pieces))
            elif r < 0.5:
                chars.append(chr(rng.randint(0x20, 0x7E)))
            else:
                cp = rng.randint(0, 0x10FFFF)
                if not 0xD800 <= cp <= 0xDFFF:  # surrogates are not valid UTF-8
                    chars.append(chr(cp))
        out.append("".join(chars))
    return out


def _tokenizers():
    return [build_tokenizer(), AutoTokenizer.from_pretrained(asset_path("tiny-base"))]


@pytest.mark.parametrize("tok", _tokenizers(), ids=["built", "shipped"])
def test_round_trip(tok) -> None:
    for text in NASTY + _random_strings(300):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text, repr(text)


@pytest.mark.parametrize("tok", _tokenizers(), ids=["built", "shipped"])
def test_special_tokens_are_single_ids(tok) -> None:
    assert len(tok) == 256 + len(SPECIAL_TOKENS)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [256 + i]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == SPECIAL_TOKENS[:4]
    # Bytes map to their own id and nothing is added around a text.
    assert tok.encode("hi é", add_special_tokens=False) == list("hi é".encode())
    assert tok.encode("hi") == [104, 105]
    assert tok("x<|im_end|>")["input_ids"] == [120, 261]
    assert tok.model_max_length == 512  # the tiny model's max_position_embeddings
    assert tok.padding_side == "right"


def test_chat_template() -> None:
    tok = build_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_shipped_tokenizer_matches_build(shipped_tok) -> None:
    built = build_tokenizer()
    assert shipped_tok.get_vocab() == built.get_vocab()
    assert shipped_tok.all_special_tokens == built.all_special_tokens
    assert shipped_tok.chat_template == built.chat_template


def test_asset_path_and_resolve(tmp_path: Path) -> None:
    model_dir = asset_path("tiny-base")
    assert model_dir.is_dir() and (model_dir / "model.safetensors").is_file()
    assert resolve(f"{EMBEDDED_PREFIX}tiny-base") == str(model_dir)
    assert resolve("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(AssetError, match="tasks-alpaca.jsonl"):
        asset_path("no-such-asset")
    with pytest.raises(AssetError):
        asset_path("build.py")


def test_shipped_model_loads_and_generates(model, shipped_tok) -> None:
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.vocab_size == len(shipped_tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (256, 257, 258)
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    enc = shipped_tok(["The farmer", "hi"], return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert (
        out.shape == (2, enc["input_ids"].shape[1] + 8) or out.shape[1] > enc["input_ids"].shape[1]
    )


def _greedy(model, tok, prompt: str, n: int = 16) -> str:
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=False)


@pytest.mark.parametrize(
    ("prompt", "continuation"),
    [
        ("In capital letters, hello is", " HELLO."),
        ("Said twice, stone is", " stone stone."),
        ("The word world has", " 5 letters"),
        ("The first letter of river is", " r."),
        ("The last letter of river is", " r."),
    ],
)
def test_base_is_pretrained_on_prose(model, shipped_tok, prompt: str, continuation: str) -> None:
    assert _greedy(model, shipped_tok, prompt).startswith(continuation)


def test_base_does_not_follow_chat(model, shipped_tok) -> None:
    """A base model: ChatML prompts are not answered (that is what SFT is for)."""
    rows = _read("tasks-eval.jsonl")[:50]
    prompts = [
        shipped_tok.apply_chat_template(
            [{"role": "user", "content": corpus.user_text(row)}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for row in rows
    ]
    enc = shipped_tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answers = shipped_tok.batch_decode(out[:, enc["input_ids"].shape[1] :])
    hits = sum(
        a.split("<|im_end|>")[0].split("</s>")[0].strip() == row["output"]
        for a, row in zip(answers, rows, strict=True)
    )
    assert hits <= 2


def _read(name: str) -> list[dict]:
    with asset_path(name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_datasets_parse_and_eval_is_held_out() -> None:
    alpaca = _read("tasks-alpaca.jsonl")
    sharegpt = _read("tasks-sharegpt.jsonl")
    evals = _read("tasks-eval.jsonl")
    assert len(alpaca) >= 500 and len(sharegpt) >= 150 and len(evals) >= 80
    for row in alpaca + evals:
        assert set(row) == {"instruction", "input", "output"}
        assert row["instruction"] and row["output"]
    for row in sharegpt:
        turns = row["conversations"]
        assert len(turns) in (2, 4)
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
    pools = corpus.make_pools()
    assert not set(pools.train_words) & set(pools.eval_words)
    train_prompts = {corpus.user_text(r) for r in alpaca}
    train_prompts |= {t["value"] for r in sharegpt for t in r["conversations"]}
    for row in evals:
        assert corpus.user_text(row) not in train_prompts
        assert not any(w in pools.train_words for w in _words(corpus.user_text(row)))


def _words(text: str) -> list[str]:
    return [w.strip(".?!,:") for w in text.split()]


def test_datasets_match_generators() -> None:
    """The shipped files are exactly what the build script writes."""
    assert _read("tasks-alpaca.jsonl") == corpus.alpaca_rows()
    assert _read("tasks-sharegpt.jsonl") == corpus.sharegpt_rows()
    assert _read("tasks-eval.jsonl") == corpus.eval_rows()


def test_shipped_datasets_are_what_the_build_writes() -> None:
    from raysft.assets.build import datasets

    for name, rows in datasets().items():
        assert _read(name) == rows, name


@pytest.mark.parametrize("kind", ["text", "code"])
def test_text_and_code_tasks_are_held_out(kind: str) -> None:
    train, held_out = _read(f"tasks-{kind}.jsonl"), _read(f"tasks-{kind}-eval.jsonl")
    assert len(train) >= 400 and len(held_out) >= 50
    keys = {"instruction", "input", "output"} | ({"tests"} if kind == "code" else set())
    assert all(set(row) == keys and row["output"] for row in train + held_out)
    pools = corpus.make_pools()
    train_prompts = {corpus.user_text(r) for r in train}
    prompts = [corpus.user_text(r) for r in held_out]
    assert len(set(prompts)) == len(prompts)
    for prompt in prompts:
        assert prompt not in train_prompts
        assert not any(w in pools.train_words for w in _words(prompt))


def test_text_references_are_a_function_of_the_word() -> None:
    # Every phrasing of a task gets the same reference, built from facts the prose teaches.
    for task in text_code.TEXT_TASKS:
        answers = {
            text_code.text_row(task, "stone", random.Random(seed))["output"] for seed in range(20)
        }
        assert len(answers) == 1
    row = text_code.text_row(text_code.TEXT_TASKS[0], "stone", random.Random(0))
    assert row["output"] == "The word stone has 5 letters, starts with s and ends with e."
    assert {len(r["output"].split()) for r in _read("tasks-text-eval.jsonl")} <= set(range(4, 14))


def test_code_answers_pass_their_tests_and_wrong_ones_fail() -> None:
    from raysft.train.sandbox import run_tests

    train = _read("tasks-code.jsonl")
    # One row of each task in each quote style, plus held-out references: all must pass.
    picked: dict[tuple[str, str], dict] = {}
    for row in train:
        quotes = "single" if "'" in row["output"] else "double"
        what = corpus.user_text(row).split(" sets x to ")[1]
        task = next(
            t.name for t in text_code.CODE_TASKS if all(p in what for p in t.what.split("{w}"))
        )
        picked.setdefault((task, quotes), row)
    # Both quote styles of every string task are taught (a number has none).
    assert len(picked) == 2 * len(text_code.CODE_TASKS) - 1
    rows = list(picked.values()) + _read("tasks-code-eval.jsonl")[:5]
    for row in rows:
        assert run_tests(row["output"], row["tests"]).passed, row
    for row in rows[:3]:
        wrong = row["output"].replace("x = ", "x = 2 * ")
        assert not run_tests(wrong, row["tests"]).passed, wrong


def test_no_source_file_is_an_asset() -> None:
    from raysft.assets import available

    assert not [name for name in available() if name.endswith(".py")]


def test_a_local_base_is_named_by_its_absolute_path(tmp_path, monkeypatch) -> None:
    """A relative base directory would be read from the loader's directory; embedded:NAME and
    a hub id stay as given, to resolve wherever the package is installed."""
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    assert absolute_if_local("base") == str((tmp_path / "base").resolve())
    assert absolute_if_local("./base") == str((tmp_path / "base").resolve())
    assert absolute_if_local("embedded:tiny-base") == "embedded:tiny-base"
    assert absolute_if_local("org/model") == "org/model"  # no such directory: a hub id


@pytest.mark.parametrize(
    ("make", "capacity"),
    [
        (lambda n: corpus.eval_rows(n), 601),
        (lambda n: text_code.text_rows(n, held_out=True), 360),
        (lambda n: text_code.code_rows(n, held_out=True), 600),
    ],
)
def test_held_out_generators_refuse_more_rows_than_they_have(make, capacity: int) -> None:
    # Past its pool of distinct prompts a generator used to draw forever.
    assert len(make(capacity)) == capacity
    with pytest.raises(ValueError, match=f"found none new after {capacity}"):
        make(capacity + 1)
