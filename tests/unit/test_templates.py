"""Chat templates against hand-written golden files (SEED.md section 2), and exact label masks."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
from evalkit import FAMILIES, chat_tokenizer_dir

from raysft.data.templates import (
    JINJA,
    TemplateError,
    answer_preamble,
    generation_prompt,
    generation_prompt_ids,
    render,
    render_text,
    stop_strings,
    template_terminator,
)
from raysft.data.tokens import IGNORE, Segment, tokenize, trained_spans

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "templates"

SYSTEM = "You are a helpful assistant."
# The seed's ShareGPT example (section 2) and its Alpaca example as one user message.
U1 = "Hello, please introduce yourself"
A1 = "Hello! I am an AI assistant; I can help you answer questions, write, code and more."
U2 = "Can you help me write code?"
A2 = "Of course! Tell me what functionality you need and I will do my best to help."
ZH_USER = "Translate the following sentence into English\n\n今天天气真好"
ZH_ANSWER = "The weather is really nice today."

# What ends an assistant turn, trained with it.
TERMINATOR = {
    "llama2": " </s>",
    "chatml": "<|im_end|>",
    "vicuna": "</s>",
    "tokenizer": "<|im_end|>",
}
TEMPLATES = sorted(TERMINATOR)


def conv(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    """``conv(u1, a1, u2, a2, system=...)`` -> canonical messages."""
    msgs = [{"role": "system", "content": system}] if system is not None else []
    return msgs + [
        {"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)
    ]


SINGLE = conv(U1, A1)
MULTI = conv(U1, A1, U2, A2)
SYSTEM_SINGLE = conv(U1, A1, system=SYSTEM)
SYSTEM_MULTI = conv(U1, A1, U2, A2, system=SYSTEM)
ZH = conv(ZH_USER, ZH_ANSWER)

# golden file name -> (template, conversation)
GOLDEN_CASES = {
    "llama2_single": ("llama2", SINGLE),
    "llama2_system_single": ("llama2", SYSTEM_SINGLE),
    "llama2_multi": ("llama2", MULTI),
    "llama2_system_multi": ("llama2", SYSTEM_MULTI),
    "chatml_single": ("chatml", SINGLE),
    "chatml_system_single": ("chatml", SYSTEM_SINGLE),
    "chatml_system_multi": ("chatml", SYSTEM_MULTI),
    "chatml_alpaca_zh": ("chatml", ZH),
    "vicuna_single": ("vicuna", SINGLE),
    "vicuna_multi": ("vicuna", MULTI),
    "vicuna_system_single": ("vicuna", SYSTEM_SINGLE),
}
CONVERSATIONS = {
    "single": SINGLE,
    "multi": MULTI,
    "system_single": SYSTEM_SINGLE,
    "system_multi": SYSTEM_MULTI,
    "zh": ZH,
}


def golden(name: str) -> bytes:
    return (GOLDEN / f"{name}.txt").read_bytes()


def n_tokens(tok: Any, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def answers(template: str, c: list[dict[str, str]]) -> list[str]:
    return [m["content"] + TERMINATOR[template] for m in c if m["role"] == "assistant"]


# ---------------------------------------------------------------- golden files


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_builtin_template_matches_golden_byte_for_byte(name: str) -> None:
    template, c = GOLDEN_CASES[name]
    assert render_text(c, template=template).encode("utf-8") == golden(name)


def test_every_golden_file_is_checked() -> None:
    assert {p.stem for p in GOLDEN.glob("*.txt")} == set(GOLDEN_CASES)


def test_golden_llama2_multi_turn_joins_turns_with_eos_bos() -> None:
    # The seed's "{assistant_response_1} </s><s>[INST] {user_message_2} [/INST]".
    text = golden("llama2_system_multi").decode()
    assert f"{A1} </s><s>[INST] {U2} [/INST] {A2} </s>" in text
    assert text.count("<<SYS>>") == 1  # the system prompt lives in the first turn only


@pytest.mark.parametrize("name", ["chatml_single", "chatml_system_single", "chatml_system_multi"])
def test_tokenizer_template_renders_the_chatml_golden(tok: Any, name: str) -> None:
    _, c = GOLDEN_CASES[name]
    text = render_text(c, template="tokenizer", tokenizer=tok)
    assert text.encode("utf-8") == golden(name)
    # The tokenizer's own rendering differs only by the newline after the last <|im_end|>,
    # which is formatting, not part of the trained answer.
    assert tok.apply_chat_template(c, tokenize=False) == text + "\n"


def _merged(segments: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segments:
        if out and out[-1].trained == s.trained:
            out[-1] = Segment(out[-1].text + s.text, s.trained)
        else:
            out.append(s)
    return out


def test_tokenizer_template_segments(tok: Any) -> None:
    segs = render(SYSTEM_MULTI, template="tokenizer", tokenizer=tok)
    assert segs == [
        Segment(
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{U1}<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
        ),
        Segment(f"{A1}<|im_end|>", True),
        Segment(f"\n<|im_start|>user\n{U2}<|im_end|>\n<|im_start|>assistant\n", False),
        Segment(f"{A2}<|im_end|>", True),
    ]
    assert _merged(render(SYSTEM_MULTI, template="chatml")) == segs


def test_tokenizer_template_renders_each_prefix_once(
    tok: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = copy.deepcopy(tok)
    calls: list[tuple[int, bool]] = []
    real = counted.apply_chat_template

    def apply(msgs: Any, **kw: Any) -> Any:
        calls.append((len(msgs), kw["add_generation_prompt"]))
        return real(msgs, **kw)

    monkeypatch.setattr(counted, "apply_chat_template", apply)
    segs = render(SYSTEM_MULTI, template="tokenizer", tokenizer=counted)
    assert segs == render(SYSTEM_MULTI, template="tokenizer", tokenizer=tok)
    # system, user, assistant, user, assistant: each answer's prompt and whole, once each
    assert sorted(calls) == [(2, True), (3, False), (4, True), (5, False)]


def test_tokenizer_template_not_prefix_stable_raises(tok: Any) -> None:
    bad = copy.deepcopy(tok)
    # A header that depends on the number of messages: rendering [u] and [u, a] differ at the
    # start, so the prompt is not a prefix of the conversation (like templates that drop
    # earlier reasoning).
    bad.chat_template = (
        "{{ messages | length }} messages\n"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(TemplateError, match="growing prefixes"):
        render(SINGLE, template="tokenizer", tokenizer=bad)


def test_tokenizer_template_that_rewrites_content_raises(tok: Any) -> None:
    bad = copy.deepcopy(tok)
    bad.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(TemplateError, match="rewrites assistant content"):
        render(SINGLE, template="tokenizer", tokenizer=bad)


def test_tokenizer_template_errors_become_template_errors(tok: Any) -> None:
    bad = copy.deepcopy(tok)
    bad.chat_template = "{{ raise_exception('System role not supported') }}"
    with pytest.raises(TemplateError, match="System role not supported"):
        render(SYSTEM_SINGLE, template="tokenizer", tokenizer=bad)
    bad.chat_template = None
    with pytest.raises(TemplateError, match="no chat_template"):
        render(SINGLE, template="tokenizer", tokenizer=bad)


def test_unknown_template_raises() -> None:
    with pytest.raises(TemplateError, match="unknown template 'alpaca'"):
        render(SINGLE, template="alpaca")


# ---------------------------------------------------------------- label masks


@pytest.mark.parametrize("conv_name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", TEMPLATES)
def test_labels_cover_exactly_the_answers_and_terminators(
    tok: Any, template: str, conv_name: str
) -> None:
    c = CONVERSATIONS[conv_name]
    segs = render(c, template=template, tokenizer=tok)
    text = "".join(s.text for s in segs)
    ex = tokenize(segs, tok, max_seq_len=4096)
    want = answers(template, c)

    assert trained_spans(ex, tok) == want
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == text
    assert ex.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    assert not ex.truncated

    # Independent oracle: find each answer in the text, map its character span to tokens,
    # and expect labels == ids there and -100 everywhere else (system, user, template text).
    expected = [IGNORE] * len(ex.input_ids)
    cursor = 0
    for answer in want:
        pos = text.index(answer, cursor)
        lo, hi = n_tokens(tok, text[:pos]), n_tokens(tok, text[: pos + len(answer)])
        expected[lo:hi] = ex.input_ids[lo:hi]
        cursor = pos + len(answer)
    assert ex.labels == expected
    assert ex.n_trained == sum(n_tokens(tok, a) for a in want)
    # Nothing a user or system wrote is trained.
    untrained = tok.decode(
        [i for i, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE],
        skip_special_tokens=False,
    )
    for m in c:
        if m["role"] != "assistant":
            assert m["content"] in untrained


@pytest.mark.parametrize("weights", [(0, 1), (1, 0), (0, 1, 0)])
@pytest.mark.parametrize("template", TEMPLATES)
def test_an_answer_of_weight_0_is_context_and_not_trained(
    tok: Any, template: str, weights: tuple[int, ...]
) -> None:
    from raysft.data.formats import to_conversation

    contents = ["Paris", "Rome", "Oslo"][: len(weights)]
    messages: list[dict[str, Any]] = []
    for i, (content, weight) in enumerate(zip(contents, weights, strict=True)):
        messages += [
            {"role": "user", "content": f"Capital {i}?"},
            {"role": "assistant", "content": content, "weight": weight},
        ]
    c = to_conversation({"messages": messages}, system_prompt=SYSTEM)
    segments = render(c, template=template, tokenizer=tok)
    # The weight changes the mask, never the text: every answer is in the context.
    plain = [{"role": m["role"], "content": m["content"]} for m in c]
    assert "".join(s.text for s in segments) == render_text(plain, template=template, tokenizer=tok)
    ex = tokenize(segments, tok, max_seq_len=4096)
    kept = [a + TERMINATOR[template] for a, w in zip(contents, weights, strict=True) if w]
    assert trained_spans(ex, tok) == kept
    assert ex.n_trained == sum(n_tokens(tok, t) for t in kept)


@pytest.mark.parametrize("template", TEMPLATES)
def test_a_trl_prompt_completion_row_trains_its_completion_alone(tok: Any, template: str) -> None:
    from raysft.data.formats import to_conversation

    prompt = [
        {"role": "user", "content": "Capital 0?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "Capital 1?"},
    ]
    completion = [{"role": "assistant", "content": "Rome"}]
    c = to_conversation({"prompt": prompt, "completion": completion}, system_prompt=SYSTEM)
    ex = tokenize(render(c, template=template, tokenizer=tok), tok, max_seq_len=4096)
    assert trained_spans(ex, tok) == ["Rome" + TERMINATOR[template]]
    # Its text is that of the same messages in one list.
    plain = [{"role": m["role"], "content": m["content"]} for m in c]
    assert "".join(s.text for s in render(c, template=template, tokenizer=tok)) == render_text(
        plain, template=template, tokenizer=tok
    )


@pytest.mark.parametrize("conv_name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", TEMPLATES)
def test_generation_prompt_ends_where_the_answer_starts(
    tok: Any, template: str, conv_name: str
) -> None:
    c = CONVERSATIONS[conv_name]
    text = render_text(c, template=template, tokenizer=tok)
    prompt = generation_prompt(c, template=template, tokenizer=tok)
    assert text == prompt + c[-1]["content"] + TERMINATOR[template]
    # ... and on a token boundary: the next token is the first trained one of the last answer.
    ex = tokenize(render(c, template=template, tokenizer=tok), tok, max_seq_len=4096)
    k = n_tokens(tok, prompt)
    assert ex.input_ids[:k] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert ex.labels[k] != IGNORE
    assert ex.labels[k - 1] == IGNORE


@pytest.mark.parametrize(
    ("template", "prompt"),
    [
        ("llama2", f"<s>[INST] {U1} [/INST] "),
        ("chatml", f"<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n"),
        ("tokenizer", f"<|im_start|>user\n{U1}<|im_end|>\n<|im_start|>assistant\n"),
        (
            "vicuna",
            f"A chat between a curious user and an AI assistant.\n\nUSER: {U1}\nASSISTANT: ",
        ),
    ],
)
def test_generation_prompt_of_a_single_user_turn(tok: Any, template: str, prompt: str) -> None:
    assert generation_prompt(conv(U1), template=template, tokenizer=tok) == prompt
    assert generation_prompt(SINGLE, template=template, tokenizer=tok) == prompt


def test_stop_strings_are_the_stripped_terminators(tok: Any) -> None:
    assert stop_strings("llama2") == ["</s>"]
    assert stop_strings("chatml") == ["<|im_end|>"]
    assert stop_strings("vicuna") == ["</s>"]
    assert {"</s>", "<|im_end|>"} <= set(stop_strings("tokenizer", tok))


# ---------------------------------------------------------------- truncation


def test_truncation_inside_the_answer_keeps_the_trained_prefix(tok: Any) -> None:
    c = conv("q", "abcdefgh")
    segs = render(c, template="chatml")
    k = n_tokens(tok, generation_prompt(c, template="chatml"))
    ex = tokenize(segs, tok, max_seq_len=k + 3)
    assert ex.truncated
    assert len(ex.input_ids) == len(ex.labels) == k + 3
    assert trained_spans(ex, tok) == ["abc"]


def test_truncation_before_the_answer_leaves_nothing_to_train(tok: Any) -> None:
    c = conv("q" * 50, "answer")
    k = n_tokens(tok, generation_prompt(c, template="vicuna"))
    ex = tokenize(render(c, template="vicuna"), tok, max_seq_len=k)
    assert ex.truncated
    assert ex.n_trained == 0
    assert trained_spans(ex, tok) == []


def test_exact_fit_is_not_truncated(tok: Any) -> None:
    segs = render(SINGLE, template="llama2")
    full = n_tokens(tok, "".join(s.text for s in segs))
    ex = tokenize(segs, tok, max_seq_len=full)
    assert not ex.truncated
    assert trained_spans(ex, tok) == [A1 + " </s>"]


# ---------------------------------------------------------------- stops from the template itself


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stop_strings_come_from_the_chat_template(tmp_path: Path, family: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir(tmp_path, family))
    terminator = FAMILIES[family][4]
    assert template_terminator(tok) == terminator
    assert stop_strings("tokenizer", tok) == [terminator, tok.eos_token]
    # ... and it is what training puts after an answer: trained with it, then the turn ends.
    segs = render(conv(U1, "Paris"), template="tokenizer", tokenizer=tok)
    ex = tokenize(segs, tok, max_seq_len=4096)
    assert trained_spans(ex, tok)[0].startswith("Paris" + terminator)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_turn_of_a_multi_turn_conversation_trains_under_each_family(
    tmp_path: Path, family: str
) -> None:
    # Phi-3 ends the last message with an EOS that a next turn never follows: an earlier
    # answer trains what stays of it ("A1<|end|>"), the last one its whole ending.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir(tmp_path, family))
    terminator = FAMILIES[family][4]
    two = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
           {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"}]  # fmt: skip
    segs = render(two, template="tokenizer", tokenizer=tok)
    assert [s.text for s in segs if s.trained][0] == "A1" + terminator
    last = [s.text for s in segs if s.trained][1]
    assert last == "A2" + terminator + ("\n" + tok.eos_token if family == "phi3" else "")
    assert "".join(s.text for s in segs) == tok.apply_chat_template(two, tokenize=False).rstrip()
    # The second turn's generation prompt is the training text up to its answer.
    prompt = generation_prompt(two, template="tokenizer", tokenizer=tok)
    assert prompt == tok.apply_chat_template(two[:3], tokenize=False, add_generation_prompt=True)
    assert "".join(s.text for s in segs).startswith(prompt)
    ex = tokenize(segs, tok, max_seq_len=4096)
    ids = generation_prompt_ids(two, template="tokenizer", tokenizer=tok)
    assert ex.input_ids[: len(ids)] == ids and ex.labels[len(ids)] != IGNORE


def test_an_answer_preamble_of_the_template_is_no_part_of_the_answer(tok: Any) -> None:
    # Qwen3 writes an empty reasoning block before the last answer: it is trained, so a model
    # generates it, and exact match must not count it against the answer.
    from evalkit import QWEN3_TEMPLATE

    from raysft.train.evaluate import _answer, answer_stops
    from raysft.train.scoring import exact_match

    qwen = copy.copy(tok)
    qwen.chat_template = QWEN3_TEMPLATE
    assert answer_preamble("tokenizer", qwen) == "<think>\n\n</think>\n\n"
    assert answer_preamble("tokenizer", tok) == answer_preamble("chatml") == ""
    one = conv("2+2?", "4")
    ex = tokenize(render(one, template="tokenizer", tokenizer=qwen), qwen, max_seq_len=4096)
    assert trained_spans(ex, qwen) == ["<think>\n\n</think>\n\n4<|im_end|>"]
    # A model that writes exactly what it was trained on scores as right.
    prompt = generation_prompt_ids(one, template="tokenizer", tokenizer=qwen)
    continuation = qwen.decode(ex.input_ids[len(prompt) :], skip_special_tokens=False)
    stops, _ = answer_stops("tokenizer", qwen)
    preamble = answer_preamble("tokenizer", qwen).strip()
    assert _answer(continuation, stops, preamble) == "4"
    assert exact_match([_answer(continuation, stops, preamble)], ["4"]) == 1.0
    # An answer that does not open with it is kept whole.
    assert _answer("<think>4", stops, preamble) == "<think>4"


def test_template_terminator_of_the_embedded_chatml_and_of_none(tok: Any) -> None:
    assert template_terminator(tok) == "<|im_end|>"
    plain = copy.copy(tok)
    plain.chat_template = None
    assert template_terminator(plain) is None
    assert stop_strings("tokenizer", plain) == ["</s>"]


def test_template_terminator_of_a_template_that_writes_nothing_after_an_answer(tok: Any) -> None:
    bare = copy.copy(tok)
    bare.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    # After the answer comes the next turn's header only: the common prefix is empty.
    assert template_terminator(bare) is None


def test_the_end_of_answer_of_a_template_that_requires_a_system_message_is_found(
    tok: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Probed with a user turn alone, such a template raises: its terminator was taken for none,
    so answers ran on to max_new_tokens and exact match read 0, without a word."""
    needs_system = copy.copy(tok)
    needs_system.chat_template = (
        "{%- if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('A system message is required') }}{%- endif %}" + tok.chat_template
    )
    assert template_terminator(needs_system) == "<|im_end|>"
    assert stop_strings("tokenizer", needs_system) == ["<|im_end|>", "</s>"]
    assert answer_preamble("tokenizer", needs_system) == ""
    # One that renders nothing of the kind: said once, and answers stop at EOS only.
    never = copy.copy(tok)
    never.chat_template = "{{ raise_exception('Only tool calls, please') }}"
    with caplog.at_level(logging.WARNING, logger="raysft.data.templates"):
        assert template_terminator(never) is None
        assert stop_strings("tokenizer", never) == ["</s>"]
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("the tokenizer's chat_template renders no conversation of a user turn")
    assert "Only tool calls, please" in said and "stop at EOS only" in said


# ---------------------------------------------------------------- prompt ids as training saw them


def _metaspace_tokenizer(*, bos: bool = False) -> Any:
    """A SentencePiece-style tokenizer (Llama-2 like): spaces become "▁" and merge with the next
    word's first character, so a prompt ending in a space ends in a standalone "▁". ``bos``: its
    post-processor puts "<s>" first, as Llama-2's does."""
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    for c in ["▁", "\n", *sorted(set(string.printable) - set(string.whitespace))]:
        vocab.setdefault(c, len(vocab))
    merges = []
    for c in string.ascii_letters + string.digits + "[<":
        vocab["▁" + c] = len(vocab)
        merges.append(("▁", c))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    meta = {"replacement": "▁", "prepend_scheme": "first", "split": False}
    tk.pre_tokenizer = pre_tokenizers.Metaspace(**meta)
    tk.decoder = decoders.Metaspace(**meta)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>")])
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tk.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


@pytest.mark.parametrize("template", ["llama2", "vicuna"])
@pytest.mark.parametrize("answer", ["Paris", "-3", "(b)", "42"])
def test_every_answer_starts_at_the_token_generation_starts_at(template: str, answer: str) -> None:
    # "▁Paris" is one token, but "▁", "-" are two: the space ending "[/INST] " is trained with
    # the answer either way, so the model learns to write the "▁" it must generate after "]".
    sp = _metaspace_tokenizer()
    c = conv("Q", answer)
    ex = tokenize(render(c, template=template), sp, max_seq_len=4096)
    ids = generation_prompt_ids(c, template=template, tokenizer=sp)
    assert ex.input_ids[: len(ids)] == ids
    assert ex.labels[len(ids) - 1] == IGNORE and ex.labels[len(ids)] != IGNORE
    assert sp.convert_ids_to_tokens(ex.input_ids[len(ids)]).startswith("▁")


@pytest.mark.parametrize("template", ["llama2", "vicuna"])
def test_truncation_that_keeps_only_the_answers_lead_space_leaves_nothing_to_train(
    template: str,
) -> None:
    # "-3" is "▁", "-", "3": cut after the "▁" trained with it, no character of the answer is
    # left, so the sample has nothing to train (the pipeline drops and counts it).
    sp = _metaspace_tokenizer()
    segments = render(conv("Q", "-3"), template=template)
    full = tokenize(segments, sp, max_seq_len=4096)
    first = next(i for i, label in enumerate(full.labels) if label != IGNORE)
    assert sp.convert_ids_to_tokens(full.input_ids[first]) == "▁"
    cut = tokenize(segments, sp, max_seq_len=first + 1)
    assert cut.truncated and cut.n_trained == 0
    assert cut.input_ids == full.input_ids[: first + 1]
    # One token more keeps the "-": the "▁" before it is trained with it.
    more = tokenize(segments, sp, max_seq_len=first + 2)
    assert more.labels[first:] == full.input_ids[first : first + 2]


def _gpt2_style_tokenizer(tmp_path: Path) -> Any:
    """A byte-level BPE whose post-processor trims whitespace off offsets (GPT-2, GPT-NeoX ship
    it), so a token of spaces has an empty span; saved and reloaded as a user would load it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from raysft.assets.tokenizer import bytes_to_unicode

    vocab = {c: b for b, c in bytes_to_unicode().items()}
    merges = [("Ġ", "Ġ"), ("ĠĠ", "ĠĠ")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.post_processor = processors.ByteLevel(trim_offsets=True)
    tk.decoder = decoders.ByteLevel()
    specials = ("<|im_start|>", "<|im_end|>", "</s>")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="</s>")
    fast.save_pretrained(tmp_path)
    return AutoTokenizer.from_pretrained(tmp_path)


def test_indentation_is_trained_with_offsets_trimmed_of_spaces(tmp_path: Path) -> None:
    tok = _gpt2_style_tokenizer(tmp_path)
    answer = "def f():\n    return  1\n"
    assert any(s == e for s, e in tok(answer, return_offsets_mapping=True)["offset_mapping"])
    ex = tokenize(render(conv("Write f", answer), template="chatml"), tok, max_seq_len=4096)
    assert trained_spans(ex, tok) == [answer + "<|im_end|>"]


def _newline_merging_tokenizer() -> Any:
    """A byte-level BPE with Llama-3's pre-tokenizer rule that keeps runs of newlines together
    (``\\s*[\\r\\n]+``) and a "\\n\\n" token."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from raysft.assets.tokenizer import bytes_to_unicode

    vocab = {c: b for b, c in bytes_to_unicode().items()}
    vocab["ĊĊ"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    rule = r"\s*[\r\n]+|\s+(?!\S)|\s+|[^\s]+"
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rule), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tk.decoder = decoders.ByteLevel()
    specials = ("<|im_start|>", "<|im_end|>", "</s>")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="</s>")


@pytest.mark.parametrize("answer", ["\nfoo", "\n\n```python\nx = 1\n```"])
def test_an_answer_the_tokenizer_would_merge_into_the_prompt_is_tokenized_apart(
    answer: str,
) -> None:
    # Whole, "assistant\n" + "\nfoo" tokenizes as "assistant", "\n\n", "foo": a token of
    # prompt and answer, and a prompt generation never sees. Training sees what inference
    # does: the prompt's ids (generation_prompt_ids), then the answer's, the first trained.
    tok = _newline_merging_tokenizer()
    c = conv("Q", answer)
    segments = render(c, template="chatml")
    whole = tok("".join(s.text for s in segments), add_special_tokens=False)["input_ids"]
    ex = tokenize(segments, tok, max_seq_len=99)
    prompt = generation_prompt_ids(c, template="chatml", tokenizer=tok)
    assert ex.merged_boundary and ex.input_ids != whole
    assert ex.input_ids[: len(prompt)] == prompt
    assert ex.labels[len(prompt) - 1] == IGNORE and ex.labels[len(prompt)] != IGNORE
    assert trained_spans(ex, tok) == [answer + "<|im_end|>"]
    rest = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ex.input_ids[len(prompt) :] == rest


def test_every_turn_of_a_conversation_is_tokenized_apart_where_it_would_merge() -> None:
    tok = _newline_merging_tokenizer()
    c = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "\nfirst"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "\n\nsecond"},
    ]
    ex = tokenize(render(c, template="chatml"), tok, max_seq_len=99)
    assert trained_spans(ex, tok) == ["\nfirst<|im_end|>", "\n\nsecond<|im_end|>"]
    # Each answer starts at the token its own generation starts at: after the first prompt,
    first = generation_prompt_ids(c[:2], template="chatml", tokenizer=tok)
    assert ex.input_ids[: len(first)] == first and ex.labels[len(first)] != IGNORE
    # and the second answer right after its prompt's own last token ("\n", not "\n\n").
    start = ex.labels.index(IGNORE, len(first))
    second = ex.labels.index(next(x for x in ex.labels[start:] if x != IGNORE), start)
    assert tok.convert_ids_to_tokens(ex.input_ids[second - 1]) == "Ċ"


def test_a_tokenizer_that_adds_a_space_after_special_tokens_keeps_the_whole_ids() -> None:
    # A legacy normalizer prepends "▁" to every piece, after a special token too: encoding the
    # answer after EOS would add a trained "▁" the text does not have, so the ids stay whole.
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("▁abcdefghijklmnopqrstuvwxyzQ\n"))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["\n\n"] = len(vocab)
    vocab["<unk>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "\n")], unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Replace("▁", " ")
    specials = ("<|im_start|>", "<|im_end|>", "</s>")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="</s>")
    segments = render(conv("Q", "\nfoo"), template="chatml")
    ex = tokenize(segments, tok, max_seq_len=99)
    whole = tok("".join(s.text for s in segments), add_special_tokens=False)["input_ids"]
    assert not ex.merged_boundary and ex.input_ids == whole
    assert trained_spans(ex, tok) == ["\n\nfoo<|im_end|>"]


def test_newlines_inside_an_answer_are_tokenized_whole() -> None:
    tok = _newline_merging_tokenizer()
    segments = render(conv("Q", "foo\n\nbar"), template="chatml")
    ex = tokenize(segments, tok, max_seq_len=99)
    whole = tok("".join(s.text for s in segments), add_special_tokens=False)["input_ids"]
    assert not ex.merged_boundary and ex.input_ids == whole


def _plain_terminator_tokenizer() -> Any:
    """A byte-level BPE with Qwen2's and Llama-3's pre-tokenizer rule that keeps newlines after
    punctuation (`` ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*``), ">\\n" and "><" tokens, and "</s>", "<s>"
    as plain text (not special in those vocabularies); its EOS is "<|endoftext|>"."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from raysft.assets.tokenizer import bytes_to_unicode

    vocab = {c: b for b, c in bytes_to_unicode().items()}
    merges = [(">", "Ċ"), (">", "<")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    rule = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rule), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=eos)


@pytest.mark.parametrize(
    ("template", "merged"), [("vicuna", ">Ċ"), ("llama2", "><")], ids=["vicuna", "llama2"]
)
def test_a_plain_text_terminator_is_tokenized_apart_from_the_next_prompt(
    template: str, merged: str
) -> None:
    # Whole, "Yo</s>\nUSER:" holds a ">\n" token (" </s><s>[INST]" a "><"): trained for its
    # ">", it would train the next user turn's first character too.
    tok = _plain_terminator_tokenizer()
    c = conv("Hi", "Yo", "Bye", "Ok")
    segments = render(c, template=template)
    whole = tok("".join(s.text for s in segments), add_special_tokens=False)["input_ids"]
    assert merged in tok.convert_ids_to_tokens(whole)
    ex = tokenize(segments, tok, max_seq_len=512)
    assert trained_spans(ex, tok) == answers(template, c)
    assert ex.merged_boundary
    # The first answer ends in the tokens its own generation ends in, the text tokenized alone.
    first = tok(c[1]["content"] + TERMINATOR[template], add_special_tokens=False)["input_ids"]
    start = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
    assert ex.input_ids[start : start + len(first)] == first
    assert ex.labels[start + len(first)] == IGNORE


def test_the_data_report_counts_answers_tokenized_apart(tmp_path: Path) -> None:
    import json

    from raysft.config import DataSection
    from raysft.data.pipeline import prepare_data

    rows = [{"instruction": f"q{i}", "output": ("\n" if i % 2 else "") + f"a{i}"} for i in range(6)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = DataSection(train=str(path), eval=str(path), template="chatml")
    data = prepare_data(cfg, _newline_merging_tokenizer(), seed=0)
    assert data.report.merged_boundary == 6  # 3 train + 3 eval samples


def test_tokenizer_template_that_trims_content_is_not_rewriting_it(tok: Any) -> None:
    # Llama-3's and Gemma's templates write every message `| trim`: an answer ending in a newline
    # (code) is still the answer.
    trims = copy.deepcopy(tok)
    content = "message['content']"
    trims.chat_template = tok.chat_template.replace(content, f"{content} | trim")
    assert trims.chat_template != tok.chat_template
    c = conv("Write f", "def f():\n    return 1\n")
    ex = tokenize(render(c, template="tokenizer", tokenizer=trims), trims, max_seq_len=4096)
    assert trained_spans(ex, trims) == ["def f():\n    return 1<|im_end|>"]


@pytest.mark.parametrize("template", ["llama2", "vicuna"])
@pytest.mark.parametrize("conv_name", ["single", "multi", "system_multi"])
def test_prompt_ids_are_the_prefix_of_the_training_ids(template: str, conv_name: str) -> None:
    sp = _metaspace_tokenizer()
    c = CONVERSATIONS[conv_name]
    ex = tokenize(render(c, template=template), sp, max_seq_len=4096)
    ids = generation_prompt_ids(c, template=template, tokenizer=sp)
    assert ex.input_ids[: len(ids)] == ids
    assert ex.labels[len(ids) - 1] == IGNORE and ex.labels[len(ids)] != IGNORE
    assert sp.convert_ids_to_tokens(ids[-1]) != "▁"
    # The bug this avoids: the prompt text tokenized alone ends in a standalone "▁" that
    # training never saw before an answer.
    naive = sp(generation_prompt(c, template=template), add_special_tokens=False)["input_ids"]
    assert sp.convert_ids_to_tokens(naive[-1]) == "▁" and ex.input_ids[: len(naive)] != naive


@pytest.mark.parametrize("conv_name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("template", TEMPLATES)
def test_prompt_ids_with_the_byte_tokenizer(tok: Any, template: str, conv_name: str) -> None:
    c = CONVERSATIONS[conv_name]
    ex = tokenize(render(c, template=template, tokenizer=tok), tok, max_seq_len=4096)
    ids = generation_prompt_ids(c, template=template, tokenizer=tok)
    # Bytes never merge: the ids are exactly the prompt text's.
    prompt = generation_prompt(c, template=template, tokenizer=tok)
    assert ids == tok(prompt, add_special_tokens=False)["input_ids"] == ex.input_ids[: len(ids)]
    assert ex.labels[len(ids)] != IGNORE


def test_tokenizer_template_ignores_row_metadata_on_messages(tok: Any) -> None:
    strict = copy.copy(tok)  # a template that would show any extra key
    strict.chat_template = "{% for m in messages %}{{ m | dictsort }}{% endfor %}"
    tagged = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "tests": "t"}]
    assert "tests" not in render_text(tagged, template="tokenizer", tokenizer=strict)


@pytest.mark.parametrize("template", ["llama2", "chatml", "vicuna"])
def test_saved_chat_template_writes_the_trained_prompt(template: str) -> None:
    from raysft.assets.tokenizer import build_tokenizer
    from raysft.data.templates import JINJA, generation_prompt, render_text

    tok = build_tokenizer()
    tok.chat_template = JINJA[template]
    system = [{"role": "system", "content": "Be brief."}]
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "2+2?"}]  # fmt: skip
    for conv in (turns, system + turns, turns[:1]):
        got = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert got == generation_prompt(conv, template=template)
        full = [*conv, {"role": "assistant", "content": "4"}]
        assert tok.apply_chat_template(full, tokenize=False) == render_text(full, template=template)


@pytest.mark.parametrize("template", ["llama2", "chatml", "vicuna", "llama3", "phi3"])
def test_saved_chat_template_opens_with_the_runs_system_prompt(
    tmp_path: Path, template: str
) -> None:
    # Training and eval put data.system_prompt first where a row has no system message: so does
    # the template saved with the model, or plain transformers would prompt it without one.
    from transformers import AutoTokenizer

    from raysft.assets.tokenizer import build_tokenizer
    from raysft.data.templates import export_chat_template

    if template in FAMILIES:
        tok = AutoTokenizer.from_pretrained(chat_tokenizer_dir(tmp_path, template))
        name = "tokenizer"
    else:
        tok, name = build_tokenizer(), template
    system_prompt = 'Réponds "brièvement".\n{{ no jinja }} {% here %} \\ 🙂'
    saved = copy.copy(tok)
    saved.chat_template = export_chat_template(
        name, system_prompt=system_prompt, tokenizer_template=tok.chat_template
    )
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "2+2?"}]  # fmt: skip
    for conv in (turns, [{"role": "system", "content": "own"}, *turns]):
        trained = conv if conv[0]["role"] == "system" else [
            {"role": "system", "content": system_prompt}, *conv
        ]  # fmt: skip
        got = saved.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert got == generation_prompt(trained, template=name, tokenizer=tok)
        assert ("Réponds" in got) is (conv is turns)
    # Without a system prompt the saved template is the template itself.
    assert export_chat_template(name, system_prompt=None, tokenizer_template=tok.chat_template) == (
        tok.chat_template if name == "tokenizer" else JINJA[name]
    )


def test_named_chat_templates_each_open_with_the_system_prompt() -> None:
    from raysft.data.templates import export_chat_template

    named = {"default": "{{ messages[0]['content'] }}", "tool_use": "{{ messages | length }}"}
    saved = export_chat_template("tokenizer", system_prompt="S", tokenizer_template=named)
    assert isinstance(saved, dict) and saved.keys() == named.keys()
    for name, text in named.items():
        assert saved[name].endswith(text) and "'content': \"S\"" in saved[name]


def _ids(out: Any) -> list[int]:
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.parametrize("template", ["llama2", "vicuna"])
def test_a_saved_template_prompts_a_merging_tokenizer_as_training_did(template: str) -> None:
    """Plain transformers on an export (apply_chat_template, then its ids) must prompt with
    the ids training put before an answer: with a SentencePiece-style tokenizer, a prompt
    ending in "[/INST] " or "ASSISTANT: " ends in a standalone "▁" training never had there."""
    from raysft.data.templates import export_chat_template, render_text
    from raysft.data.tokens import space_merges_into_word

    sp = _metaspace_tokenizer()
    assert space_merges_into_word(sp)
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "2+2?"}]  # fmt: skip
    trained = generation_prompt_ids(turns, template=template, tokenizer=sp)
    saved, as_written = copy.copy(sp), copy.copy(sp)
    saved.chat_template = export_chat_template(
        template, system_prompt=None, tokenizer_template=None, space_with_answer=True
    )
    as_written.chat_template = JINJA[template]
    served = saved.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
    assert _ids(served) == trained
    before = as_written.apply_chat_template(turns, tokenize=True, add_generation_prompt=True)
    assert _ids(before) != trained  # the template as written: a trailing standalone "▁"
    # A whole conversation is still the training text, byte for byte.
    whole = [*turns, {"role": "assistant", "content": "4"}]
    assert saved.apply_chat_template(whole, tokenize=False) == render_text(whole, template=template)


# ------------------------------------------------------ BOS, and llama2 stripping contents


def _saved(tok: Any, template: str, *, bos: bool) -> Any:
    """``tok`` with the chat_template a run exports for ``template`` (as ``training_tokenizer``)."""
    from raysft.data.templates import export_chat_template
    from raysft.data.tokens import space_merges_into_word

    saved = copy.copy(tok)
    saved.chat_template = export_chat_template(
        template,
        system_prompt=None,
        tokenizer_template=None,
        space_with_answer=space_merges_into_word(tok),
        bos=bos,
    )
    return saved


@pytest.mark.parametrize("conv_name", ["single", "multi", "system_multi"])
@pytest.mark.parametrize("template", ["chatml", "vicuna"])
def test_chatml_and_vicuna_open_with_the_bos_a_llama_tokenizer_adds(
    template: str, conv_name: str
) -> None:
    # A Llama base saw "<s>" first in every pretraining sequence, and tok(text) (FastChat, vLLM
    # given a string) puts it there: training, the eval prompt and the export all have it.
    from raysft.data.tokens import adds_bos_token

    sp = _metaspace_tokenizer(bos=True)
    bos = sp.bos_token_id
    assert adds_bos_token(sp) and sp("x")["input_ids"][0] == bos
    c = CONVERSATIONS[conv_name]
    ex = tokenize(render(c, template=template, tokenizer=sp), sp, max_seq_len=4096)
    assert ex.input_ids[0] == bos and ex.labels[0] == IGNORE
    assert ex.input_ids.count(bos) == 1
    assert trained_spans(ex, sp) == [a.lstrip() for a in answers(template, c)]
    ids = generation_prompt_ids(c, template=template, tokenizer=sp)
    assert ids[0] == bos and ex.input_ids[: len(ids)] == ids
    assert ex.labels[len(ids) - 1] == IGNORE and ex.labels[len(ids)] != IGNORE
    # Plain transformers on the export prompts with the same ids, BOS included.
    prompt = c[:-1]
    served = _saved(sp, template, bos=True).apply_chat_template(
        prompt, tokenize=True, add_generation_prompt=True
    )
    assert _ids(served) == generation_prompt_ids(prompt, template=template, tokenizer=sp)


@pytest.mark.parametrize("conv_name", ["single", "system_multi"])
def test_llama2_never_gets_a_second_bos(conv_name: str) -> None:
    # llama2 writes "<s>" itself, before every [INST]: nothing is put before it.
    sp = _metaspace_tokenizer(bos=True)
    bos = sp.bos_token_id
    c = CONVERSATIONS[conv_name]
    ex = tokenize(render(c, template="llama2", tokenizer=sp), sp, max_seq_len=4096)
    assert ex.input_ids[0] == bos and ex.input_ids[1] != bos
    ids = generation_prompt_ids(c, template="llama2", tokenizer=sp)
    assert ids[0] == bos and ids[1] != bos and ex.input_ids[: len(ids)] == ids
    saved = _saved(sp, "llama2", bos=True)
    assert "bos_token" not in saved.chat_template
    served = saved.apply_chat_template(c[:-1], tokenize=True, add_generation_prompt=True)
    assert _ids(served) == generation_prompt_ids(c[:-1], template="llama2", tokenizer=sp)


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_a_tokenizer_that_adds_no_bos_renders_the_golden_files(tok: Any, name: str) -> None:
    # The embedded byte tokenizer (its model was pretrained without BOS), Qwen's: unchanged.
    from raysft.data.templates import export_chat_template
    from raysft.data.tokens import adds_bos_token

    template, c = GOLDEN_CASES[name]
    for no_bos in (tok, _metaspace_tokenizer()):
        assert not adds_bos_token(no_bos)
        text = render_text(c, template=template, tokenizer=no_bos)
        assert text.encode("utf-8") == golden(name)
    assert (
        export_chat_template(template, system_prompt=None, tokenizer_template=None, bos=False)
        == (JINJA[template])
    )
    ex = tokenize(render(c, template=template, tokenizer=tok), tok, max_seq_len=4096)
    assert ex.input_ids == tok(golden(name).decode("utf-8"), add_special_tokens=False)["input_ids"]


SPACED = conv("  Tell me a joke.\n", "\nWhy did the chicken cross the road?\n", "Again ", " No.\n")
SPACED_SYSTEM = [{"role": "system", "content": " Be funny.\n"}, *SPACED]


def _stripped(c: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{**m, "content": m["content"].strip()} for m in c]


@pytest.mark.parametrize("c", [SPACED, SPACED_SYSTEM], ids=["plain", "system"])
def test_llama2_strips_every_message_as_meta_does(c: list[dict[str, str]]) -> None:
    # Meta's chat_completion and HF's Llama-2 template (`| trim`) strip each message: the model
    # must not learn to open an answer with "\n" after "[/INST] " or close it with "\n </s>".
    from raysft.train.scoring import exact_match

    sp = _metaspace_tokenizer(bos=True)
    clean = _stripped(c)
    assert render(c, template="llama2") == render(clean, template="llama2")
    ex = tokenize(render(c, template="llama2", tokenizer=sp), sp, max_seq_len=4096)
    assert trained_spans(ex, sp) == [
        "Why did the chicken cross the road? </s>",
        "No. </s>",
    ]
    assert ex == tokenize(render(clean, template="llama2", tokenizer=sp), sp, max_seq_len=4096)
    ids = generation_prompt_ids(c, template="llama2", tokenizer=sp)
    assert ids == generation_prompt_ids(clean, template="llama2", tokenizer=sp)
    assert ex.input_ids[: len(ids)] == ids and ex.labels[len(ids)] != IGNORE
    # The export trims as well, so plain transformers prompts as training did.
    saved = _saved(sp, "llama2", bos=True)
    assert saved.apply_chat_template(c, tokenize=False) == render_text(clean, template="llama2")
    served = saved.apply_chat_template(c[:-1], tokenize=True, add_generation_prompt=True)
    assert _ids(served) == ids
    # Eval's reference is the raw content; exact match strips it, as training did.
    assert exact_match(["No."], [c[-1]["content"]]) == 1.0


@pytest.mark.parametrize("template", ["chatml", "vicuna"])
def test_chatml_and_vicuna_keep_surrounding_whitespace(template: str) -> None:
    # ChatML (Qwen's template) and FastChat write contents as they are.
    assert render_text(SPACED, template=template) != render_text(
        _stripped(SPACED), template=template
    )
    assert "\nWhy did the chicken cross the road?\n" in render_text(SPACED, template=template)
