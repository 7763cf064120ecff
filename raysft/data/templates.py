"""Chat templates: a conversation -> text segments marked trained or not -> token ids + labels.

The built-in templates are byte-exact to SEED.md section 2. Rendering returns segments, not a
string, so the label mask is exact by construction: every assistant turn's content plus its
terminator is trained (but a turn its row gave weight 0, ``is_trained``); system, user, template
text and padding are not.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import weakref
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from raysft.data.formats import Conversation, is_trained
from raysft.errors import TemplateError

IGNORE = -100  # label value cross-entropy skips

VICUNA_SYSTEM = "A chat between a curious user and an AI assistant."

# What ends an assistant turn, as trained; generation stops at the stripped form.
TERMINATORS = {"llama2": " </s>", "chatml": "<|im_end|>", "vicuna": "</s>"}
# An answer no chat template alters (no spaces to trim, no markup), to find its terminator.
_SENTINEL = "RaysftSentinelAnswer"
# The answer after a generation prompt when tokenizing it as training does: an ordinary word.
_PROBE_ANSWER = "The"
# Built-in templates whose text has no BOS of its own (llama2 writes "<s>"): they open with the
# tokenizer's BOS where it adds one by default (``adds_bos_token``).
_OPENS_WITH_BOS = ("chatml", "vicuna")


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


class Example:
    """One tokenized sample: its token ids, its labels (IGNORE where not trained), whether it
    was cut to ``max_seq_len``, and whether prompt and answer were tokenized apart.

    The ids and labels are kept as 4-byte arrays, read back as lists. Every sample of a run's
    data stays in memory for the whole run, in every data-parallel worker, and in a search in
    every trial's worker: a Python list of token ids takes about 9 times the memory (a pointer
    and an int object per id), and unpickling the search's shared data (raysft.data.shared)
    builds one int object per token. Measured on 100,000 samples of 160 tokens: about 990 MiB
    as lists against 125 MiB as arrays, unpickled in 3.9 s against 0.4 s.
    """

    __slots__ = ("_ids", "_labels", "truncated", "merged_boundary")

    def __init__(
        self,
        input_ids: Iterable[int],
        labels: Iterable[int],
        truncated: bool,
        merged_boundary: bool = False,
    ) -> None:
        self._ids = array("i", input_ids)
        self._labels = array("i", labels)
        if len(self._ids) != len(self._labels):
            raise ValueError(f"{len(self._ids)} input_ids but {len(self._labels)} labels")
        self.truncated = truncated
        # The tokenizer would have merged prompt and answer text into one token (an answer
        # starting with a newline after ChatML's "assistant\n", a plain-text "</s>" and the next
        # "\n"): tokenized apart there.
        self.merged_boundary = merged_boundary

    @property
    def input_ids(self) -> list[int]:
        return self._ids.tolist()

    @property
    def labels(self) -> list[int]:
        return self._labels.tolist()

    @property
    def n_tokens(self) -> int:
        return len(self._ids)

    @property
    def n_trained(self) -> int:
        return len(self._labels) - self._labels.count(IGNORE)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Example):
            return NotImplemented
        return (self._ids, self._labels, self.truncated, self.merged_boundary) == (
            other._ids,
            other._labels,
            other.truncated,
            other.merged_boundary,
        )

    __hash__ = None  # type: ignore[assignment]  # equal by value, and mutable arrays inside

    def __repr__(self) -> str:
        return (
            f"Example(input_ids={self.input_ids}, labels={self.labels}, "
            f"truncated={self.truncated}, merged_boundary={self.merged_boundary})"
        )


def _split_system(conv: Conversation) -> tuple[str | None, Conversation]:
    if conv and conv[0]["role"] == "system":
        return conv[0]["content"], conv[1:]
    return None, conv


def _llama2(conv: Conversation, *, generation: bool) -> list[Segment]:
    # Every content stripped, as Meta's chat_completion and HF's Llama-2 template (`| trim`) do:
    # else an answer's "\n" lands between "[/INST] " and the answer and before " </s>", and the
    # model learns to open and close answers with a newline no Llama-2 prompt ever has.
    system, turns = _split_system(conv)
    segs: list[Segment] = []
    for i in range(0, len(turns), 2):
        user = turns[i]["content"].strip()
        if i == 0 and system is not None:
            user = f"<<SYS>>\n{system.strip()}\n<</SYS>>\n\n{user}"
        segs.append(Segment(f"<s>[INST] {user} [/INST] ", False))
        if i + 1 < len(turns):
            answer = turns[i + 1]
            text = answer["content"].strip() + TERMINATORS["llama2"]
            segs.append(Segment(text, is_trained(answer)))
    return _finish(segs, turns, generation=generation)


def _chatml(conv: Conversation, *, generation: bool) -> list[Segment]:
    segs: list[Segment] = []
    for msg in conv:
        sep = "\n" if segs else ""
        if msg["role"] == "assistant":
            segs.append(Segment(f"{sep}<|im_start|>assistant\n", False))
            segs.append(Segment(msg["content"] + TERMINATORS["chatml"], is_trained(msg)))
        else:
            segs.append(
                Segment(f"{sep}<|im_start|>{msg['role']}\n{msg['content']}<|im_end|>", False)
            )
    if generation:
        segs.append(Segment("\n<|im_start|>assistant\n", False))
    return segs


def _vicuna(conv: Conversation, *, generation: bool) -> list[Segment]:
    system, turns = _split_system(conv)
    segs = [Segment(f"{VICUNA_SYSTEM if system is None else system}\n\n", False)]
    for i in range(0, len(turns), 2):
        sep = "\n" if i else ""
        segs.append(Segment(f"{sep}USER: {turns[i]['content']}\nASSISTANT: ", False))
        if i + 1 < len(turns):
            answer = turns[i + 1]
            segs.append(Segment(answer["content"] + TERMINATORS["vicuna"], is_trained(answer)))
    return _finish(segs, turns, generation=generation)


def _finish(segs: list[Segment], turns: Conversation, *, generation: bool) -> list[Segment]:
    """Without a generation prompt the tail of a last user turn (no answer) is not wanted."""
    # By the turns, not by the last segment's mask: an answer of weight 0 is untrained too.
    answered = bool(turns) and len(turns) % 2 == 0
    if not generation and not answered:
        segs = segs[:-1]
    if generation and answered:
        raise TemplateError("a generation prompt must end with a user turn")
    return segs


def _apply_chat_template(tokenizer: Any, msgs: Conversation, *, generation: bool) -> str:
    import jinja2

    # Role and content only: a message may carry row metadata (an eval row's ``tests``).
    plain = [{"role": m["role"], "content": m["content"]} for m in msgs]
    try:
        out = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation)
    except jinja2.TemplateError as err:  # e.g. "System role not supported"
        raise TemplateError(f"the tokenizer's chat_template failed: {err}") from None
    return str(out)


def _from_tokenizer(conv: Conversation, tokenizer: Any, *, generation: bool) -> list[Segment]:
    """Spans from the tokenizer's own chat_template, found by rendering growing prefixes."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("data.template is tokenizer but the tokenizer has no chat_template")

    rendered: dict[tuple[int, bool], str] = {}  # a turn's prompt is also the last one's "next"

    def render(n: int, gen: bool) -> str:
        """The first ``n`` messages rendered (with the generation prompt when ``gen``)."""
        if (n, gen) not in rendered:
            rendered[n, gen] = _apply_chat_template(tokenizer, conv[:n], generation=gen)
        return rendered[n, gen]

    not_growing = TemplateError(
        "the tokenizer's chat_template does not render conversations as growing prefixes "
        "(e.g. it drops earlier reasoning); use data.template llama2, chatml or vicuna"
    )
    answers = [i for i, msg in enumerate(conv) if msg["role"] == "assistant"]
    segs: list[Segment] = []
    done = ""
    for k, i in enumerate(answers):
        prompt, full = render(i, True), render(i + 1, False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise not_growing
        answer = full[len(prompt) :]
        # Some templates end the last message with an EOS that a next turn does not follow
        # (Phi-3: "<|end|>\n<|endoftext|>"): an answer the conversation goes on after is what
        # stays of it when it does.
        later = answers[k + 1] if k + 1 < len(answers) else None
        if later is None and generation and len(conv) > i + 1:
            later = len(conv)
        if later is not None:
            nxt = render(later, True)
            if not nxt.startswith(prompt):
                raise not_growing
            answer = _common_start(tokenizer, answer, nxt[len(prompt) :])
        trained = answer.rstrip()  # the newline after the terminator is formatting, not an answer
        # Trimming the content is not rewriting it: Llama-3's and Gemma's templates apply
        # `| trim` to every message, and answers often end in a newline (code).
        content = conv[i]["content"].strip()
        if content not in trained:
            if later is not None and content in full[len(prompt) :]:
                raise not_growing  # it renders an earlier answer otherwise than the last
            raise TemplateError("the tokenizer's chat_template rewrites assistant content")
        segs += [Segment(prompt[len(done) :], False), Segment(trained, is_trained(conv[i]))]
        done = prompt + trained
    if generation:
        prompt = render(len(conv), True)
        if not prompt.startswith(done):
            raise not_growing
        segs.append(Segment(prompt[len(done) :], False))
    return [s for s in segs if s.text]


def _common_start(tokenizer: Any, a: str, b: str) -> str:
    """The start ``a`` shares with ``b`` in whole tokens: "<|end|>\n<|endoftext|>" and
    "<|end|>\n<|user|>" share "<|end|>\n", where their characters share "<|end|>\n<|"."""
    if not getattr(tokenizer, "is_fast", False):  # no offsets: decode the common ids
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (a, b)]
        text = str(tokenizer.decode(os.path.commonprefix(ids), skip_special_tokens=False))
        return text if a.startswith(text) else os.path.commonprefix([a, b])
    enc = tokenizer(a, add_special_tokens=False, return_offsets_mapping=True)
    n = len(
        os.path.commonprefix(
            [enc["input_ids"], tokenizer(b, add_special_tokens=False)["input_ids"]]
        )
    )
    return a[: enc["offset_mapping"][n - 1][1]] if n else ""


_BUILTIN = {"llama2": _llama2, "chatml": _chatml, "vicuna": _vicuna}


# The built-in templates as Jinja chat_templates, saved with the trained model's tokenizer so
# that ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` writes the prompt
# it was trained on (``generation_prompt``), byte for byte (for a tokenizer that joins a space
# to the next word, as the ids training saw: ``JINJA_SPACE_WITH_ANSWER``).
_SYS = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
)
JINJA = {
    "llama2": _SYS
    + (
        "{%- for m in turns -%}{%- if loop.index0 % 2 == 0 -%}"
        "{{ '<s>[INST] ' }}{%- if loop.first and system is not none -%}"
        "{{ '<<SYS>>\n' + (system | trim) + '\n<</SYS>>\n\n' }}{%- endif -%}"
        "{{ (m['content'] | trim) + ' [/INST] ' }}"
        "{%- else -%}{{ (m['content'] | trim) + ' </s>' }}{%- endif -%}{%- endfor -%}"
    ),
    "chatml": (
        "{%- for m in messages -%}{%- if not loop.first -%}{{ '\n' }}{%- endif -%}"
        "{%- if m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\n' + m['content'] }}"
        "{%- else -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}{%- endif -%}"
        "{{ '<|im_end|>' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '\n<|im_start|>assistant\n' }}{%- endif -%}"
    ),
    "vicuna": _SYS
    + (
        "{{ (system if system is not none else " + json.dumps(VICUNA_SYSTEM) + ") + '\n\n' }}"
        "{%- for m in turns -%}{%- if loop.index0 % 2 == 0 -%}"
        "{%- if not loop.first -%}{{ '\n' }}{%- endif -%}"
        "{{ 'USER: ' + m['content'] + '\nASSISTANT: ' }}"
        "{%- else -%}{{ m['content'] + '</s>' }}{%- endif -%}{%- endfor -%}"
    ),
}


# llama2 and vicuna for a tokenizer that joins a space to the word after it (SentencePiece
# "▁Paris"): the space ending a prompt ("[/INST] ") is written before the answer, not at the
# end of a generation prompt. Training merged it into the answer's first token, so a prompt
# ending in it would tokenize to a standalone "▁" the model never saw before an answer
# (``generation_prompt_ids``). A whole conversation renders to the same text either way.
_SPACE_AFTER_USER_TURN = "{%- if not loop.last -%}{{ ' ' }}{%- endif -%}"
JINJA_SPACE_WITH_ANSWER = {
    "llama2": JINJA["llama2"].replace(
        "{{ (m['content'] | trim) + ' [/INST] ' }}",
        "{{ (m['content'] | trim) + ' [/INST]' }}" + _SPACE_AFTER_USER_TURN,
    ),
    "vicuna": JINJA["vicuna"].replace(
        "{{ 'USER: ' + m['content'] + '\nASSISTANT: ' }}",
        "{{ 'USER: ' + m['content'] + '\nASSISTANT:' }}" + _SPACE_AFTER_USER_TURN,
    ),
}


def export_chat_template(
    template: str,
    *,
    system_prompt: str | None,
    tokenizer_template: str | dict[str, str] | None,
    space_with_answer: bool = False,
    bos: bool = False,
) -> str | dict[str, str] | None:
    """The chat_template saved with a trained model: the built-in template's Jinja (or the
    tokenizer's own, or each of its named ones), opening with ``data.system_prompt`` where a
    conversation has no system message, as every training and eval conversation did. None:
    nothing to save. ``space_with_answer`` (``space_merges_into_word`` of the tokenizer):
    a generation prompt that tokenizes as training saw it (``JINJA_SPACE_WITH_ANSWER``).
    ``bos`` (``adds_bos_token`` of the tokenizer): chatml and vicuna open with its BOS, as
    training rendered them (``render``)."""
    builtin = (
        JINJA_SPACE_WITH_ANSWER
        if space_with_answer and template in JINJA_SPACE_WITH_ANSWER
        else JINJA
    )
    jinja: str | dict[str, str] | None = builtin.get(template)
    if bos and template in _OPENS_WITH_BOS:
        # In the text: apply_chat_template tokenizes it with add_special_tokens=False.
        jinja = "{{ bos_token }}" + builtin[template]
    if template == "tokenizer":
        jinja = tokenizer_template
    if jinja is None or not system_prompt:
        return jinja
    # A JSON string is a Jinja string literal; non-ASCII kept as is (Jinja would read a JSON
    # surrogate pair as two characters).
    default = "{'role': 'system', 'content': " + json.dumps(system_prompt, ensure_ascii=False) + "}"
    opening = (
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        "{%- set messages = [" + default + "] + messages -%}{%- endif -%}"
    )
    if isinstance(jinja, dict):  # named templates ("default", "tool_use"): each of them
        return {name: opening + text for name, text in jinja.items()}
    return opening + jinja


def render(
    conv: Conversation, *, template: str, tokenizer: Any = None, generation: bool = False
) -> list[Segment]:
    """Segments of one conversation; ``generation`` renders a prompt that ends with a user turn.
    chatml and vicuna open with the tokenizer's BOS (untrained) where it adds one by default."""
    if template == "tokenizer":
        return _from_tokenizer(conv, tokenizer, generation=generation)
    if template not in _BUILTIN:
        raise TemplateError(f"unknown template {template!r}")
    segs = _BUILTIN[template](conv, generation=generation)
    # A Llama/Mistral base saw BOS first in every pretraining sequence, and ``tok(text)`` (vLLM
    # given a string, FastChat) puts it there: trained without it, the model is off its
    # pretraining distribution and meets at inference a BOS it was never tuned with. Written as
    # text, so the ids, the generation prompt and the saved template (``{{ bos_token }}``,
    # which apply_chat_template tokenizes without special tokens) all have it. A tokenizer that
    # adds none (Qwen, the embedded byte one, whose model was pretrained without) is untouched.
    # (After a BOS in the text, transformers 5's Llama tokenizer writes "A", not tok(text)'s
    # "▁A": so do HF's own Llama chat templates, and the export must give these very ids.)
    if template in _OPENS_WITH_BOS and tokenizer is not None and adds_bos_token(tokenizer):
        bos = str(tokenizer.bos_token)
        if not "".join(s.text for s in segs).startswith(bos):
            segs = [Segment(bos, False), *segs]
    return segs


def render_text(conv: Conversation, *, template: str, tokenizer: Any = None) -> str:
    return "".join(s.text for s in render(conv, template=template, tokenizer=tokenizer))


def generation_prompt(conv: Conversation, *, template: str, tokenizer: Any = None) -> str:
    """The text a model continues to answer the final user turn of ``conv`` (assistant dropped)."""
    if conv and conv[-1]["role"] == "assistant":
        conv = conv[:-1]
    segs = render(conv, template=template, tokenizer=tokenizer, generation=True)
    return "".join(s.text for s in segs)


def generation_prompt_ids(conv: Conversation, *, template: str, tokenizer: Any) -> list[int]:
    """Token ids of the generation prompt exactly as training saw them before an answer.

    Tokenizing the prompt text alone can differ at its end: a SentencePiece tokenizer reads the
    space that ends a llama2/vicuna prompt (``[/INST] ``, ``ASSISTANT: ``) as a standalone ``▁``,
    while in training that space merged into the answer's first token (``▁Paris``). So the prompt
    is tokenized with a probe answer after it, the way ``tokenize`` does, and the ids before the
    first trained token are kept. The probe is fixed, never the reference, so the prompt does not
    depend on the answer.
    """
    if conv and conv[-1]["role"] == "assistant":
        conv = conv[:-1]
    segs = render(conv, template=template, tokenizer=tokenizer, generation=True)
    # Only the probe is marked trained: earlier answers in the history are prompt here.
    probe = [*(Segment(s.text, False) for s in segs), Segment(_PROBE_ANSWER, True)]
    ex = tokenize(probe, tokenizer, max_seq_len=1 << 30)
    first = next(i for i, label in enumerate(ex.labels) if label != IGNORE)
    return ex.input_ids[:first]


def stop_strings(template: str, tokenizer: Any = None) -> list[str]:
    """Strings that end a generated answer: a built-in template's terminator; for ``tokenizer``,
    the one its chat_template writes after an assistant turn (``template_terminator``), and EOS."""
    if template in TERMINATORS:
        return [TERMINATORS[template].strip()]
    eos = getattr(tokenizer, "eos_token", None)
    stops = [template_terminator(tokenizer), eos if isinstance(eos, str) else None]
    return list(dict.fromkeys(s for s in stops if s))


def terminator_tokens(template: str, tokenizer: Any) -> int:
    """How many tokens of ``tokenizer`` the template's end of answer takes: 1 where it is a
    special token, more where a built-in template writes a marker the tokenizer does not have
    (ChatML's ``<|im_end|>`` on a Llama tokenizer): the model then learns to end answers with
    those ordinary tokens and never with EOS. 1 when the template has none to measure."""
    stops = stop_strings(template, tokenizer)
    return max(1, token_count(stops[0], tokenizer)) if stops else 1


def token_count(text: str, tokenizer: Any) -> int:
    """How many tokens ``text`` takes in ``tokenizer``, alone (no special tokens added)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_preamble(template: str, tokenizer: Any = None) -> str:
    """What a chat_template writes between the generation prompt and the last answer's content,
    e.g. Qwen3's empty reasoning block "<think>\n\n</think>\n\n": trained with the answer, so
    generated before it, and no part of it. Found with a sentinel answer; "" for the built-in
    templates and for templates that write nothing there."""
    if template != "tokenizer" or not getattr(tokenizer, "chat_template", None):
        return ""
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}
    try:
        prompt = _apply_chat_template(tokenizer, [user], generation=True)
        full = _apply_chat_template(tokenizer, [user, answer], generation=False)
    except TemplateError:
        return ""
    if not full.startswith(prompt) or _SENTINEL not in full[len(prompt) :]:
        return ""
    return full[len(prompt) : full.index(_SENTINEL, len(prompt))]


def template_terminator(tokenizer: Any) -> str | None:
    """What a chat_template writes right after an assistant message's content, e.g. Llama-3
    ``<|eot_id|>``, Gemma ``<end_of_turn>``, Phi-3 ``<|end|>``, ChatML ``<|im_end|>``.

    Found by rendering a sentinel answer twice, as the last turn and followed by a user turn,
    and taking the tokens that follow it in both (decoded, whitespace stripped): the last turn
    alone may be followed by an EOS (Phi-3), the next turn's header is not part of the
    terminator. None if the template writes nothing there.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}
    after = []
    for msgs in ([user, answer], [user, answer, {"role": "user", "content": "Thanks"}]):
        try:
            text = _apply_chat_template(tokenizer, msgs, generation=False)
        except TemplateError:
            continue  # e.g. a template that allows a single turn only
        if _SENTINEL in text:
            after.append(text[text.index(_SENTINEL) + len(_SENTINEL) :])
    if not after:
        return None
    # Common prefix in tokens, not characters: "<|end|>\n<|endoftext|>" and "<|end|>\n<|user|>"
    # share "<|end|>\n<|" as text, but only "<|end|>", "\n" as tokens.
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in after]
    common = os.path.commonprefix(ids)
    return str(tokenizer.decode(common, skip_special_tokens=False)).strip() or None


def tokenize(segments: list[Segment], tokenizer: Any, *, max_seq_len: int) -> Example:
    """Token ids and labels. The whole text is tokenized once (as at inference) and a token is
    trained when its characters overlap a trained segment, so SentencePiece merges across a
    segment boundary cannot shift the mask. Where a token would hold the end of a prompt and the
    start of its answer, or the end of an answer and the start of the next prompt, the two are
    tokenized apart (``_encode_apart``), as generation sees them. Slow tokenizers fall back to
    per-segment encoding."""
    text = "".join(s.text for s in segments)
    if not getattr(tokenizer, "is_fast", False):
        return _tokenize_per_segment(segments, tokenizer, max_seq_len=max_seq_len)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained, answer = _trained_chars(segments, merges=space_merges_into_word(tokenizer))
    ids: list[int] = list(enc["input_ids"])
    offsets: list[tuple[int, int]] = list(enc["offset_mapping"])
    # Trained characters before each position: a token's span [a, b) holds one iff
    # counted[b] > counted[a] (a per-token slice and any() was most of the data's setup time).
    counted = list(itertools.accumulate(trained, initial=0))
    starts, ends = _owned_spans(offsets)
    cuts = _answers_merged_into_prompts(starts, ends, trained, counted)
    apart = _encode_apart(text, cuts, tokenizer, whole=ids) if cuts else None
    if apart is not None:
        ids, offsets = apart
        starts, ends = _owned_spans(offsets)
    if len(starts) != len(ids):  # one span per token, or the labels would be misplaced
        raise TemplateError(f"{len(ids)} token ids but {len(starts)} offsets from the tokenizer")
    n = min(len(ids), max_seq_len)
    labels = [
        t if counted[b] > counted[a] else IGNORE
        for t, a, b in zip(ids[:n], starts[:n], ends[:n], strict=True)
    ]
    truncated = len(ids) > max_seq_len
    # An answer cut right after the prompt's space trained with it ("[/INST]", "▁") keeps none
    # of its own text: that "▁" alone is nothing to learn (a sample left without any is dropped).
    last = max_seq_len - 1 if truncated else -1
    while last >= 0 and labels[last] != IGNORE and not any(answer[starts[last] : ends[last]]):
        labels[last], last = IGNORE, last - 1
    return Example(ids[:max_seq_len], labels, truncated, apart is not None)


def _owned_spans(offsets: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Each token's span of the text as (starts, ends): a token owns the characters since the
    previous token ended. Offsets trimmed of whitespace (a ByteLevel post_processor with
    trim_offsets) leave a token of spaces (code indentation) an empty span that would never be
    trained."""
    if not offsets:
        return [], []
    starts, ends = zip(*offsets, strict=True)
    reached = itertools.accumulate(ends, max, initial=0)  # the furthest end before each token
    return list(map(min, starts, reached)), list(ends)


def _trained_chars(segments: list[Segment], *, merges: bool) -> tuple[bytearray, bytearray]:
    """1 for each character of the text that is trained, and 1 for each of an answer's own
    (without the spaces before it that ``merges`` trains with it)."""
    n = sum(len(s.text) for s in segments)
    trained, answer = bytearray(n), bytearray(n)
    text, pos = "".join(s.text for s in segments), 0
    for seg in segments:
        if seg.trained:
            # Where a space merges into the next word ("▁Paris") but not always ("▁", "4" in
            # Llama-2), the spaces ending the prompt ("[/INST] ") go with the answer, so the
            # answer starts at the same token whatever it is, as ``generation_prompt_ids`` has it.
            lead = 0
            while merges and lead < pos and text[pos - lead - 1] == " ":
                lead += 1
            trained[pos - lead : pos + len(seg.text)] = b"\x01" * (lead + len(seg.text))
            answer[pos : pos + len(seg.text)] = b"\x01" * len(seg.text)
        pos += len(seg.text)
    return trained, answer


def _answers_merged_into_prompts(
    starts: list[int], ends: list[int], trained: bytearray, counted: list[int]
) -> list[int]:
    """Where a token would hold trained and untrained text, at each change between them: an
    answer's start merged into its prompt (Llama-3's and Qwen's pre-tokenizers keep a run of
    newlines together, so ChatML's "assistant\n" and an answer starting with "\n" are one "\n\n"
    token), or a plain-text terminator merged into the next prompt (Qwen's ">\n" of "</s>\nUSER",
    "><" of " </s><s>[INST]"). Such a token, trained for any trained character, would train
    the prompt's text too. ``starts``, ``ends``: the tokens' spans (``_owned_spans``);
    ``counted``: trained characters before each position."""
    cuts: set[int] = set()  # a set: tokens of one multi-byte character share their offsets
    for lo, end in zip(starts, ends, strict=True):
        if 0 < counted[end] - counted[lo] < end - lo:  # partly trained: a change inside
            cuts.update(i for i in range(lo + 1, end) if trained[i] != trained[i - 1])
    return sorted(cuts)


def _encode_apart(
    text: str,
    cuts: list[int],
    tokenizer: Any,
    *,
    whole: list[int],
) -> tuple[list[int], list[tuple[int, int]]] | None:
    """``text`` tokenized with a token boundary at each cut, as inference sees it: the prompt
    alone (what ``generation_prompt_ids`` gives), then the answer the model must generate after
    it, which ends where its generation stops, apart from the next prompt. Each piece after the
    first is encoded after the EOS token, which no merge crosses and after which a
    SentencePiece tokenizer adds no "▁" of its own, and the EOS is dropped. None (keep the
    ``whole`` text's ids) if the tokenizer has no single-token EOS to do that with, or if the ids
    do not decode to the text ``whole`` decodes to (a legacy normalizer that adds "▁" after
    every special token).

    In a later turn's history, inference (``generation_prompt_ids``, transformers'
    ``apply_chat_template``) tokenizes an earlier answer whole, merged; training keeps every
    answer apart, each starting and ending where its own generation did."""
    sentinel = getattr(tokenizer, "eos_token", None)
    if not isinstance(sentinel, str) or not sentinel:
        return None
    head = tokenizer(sentinel, add_special_tokens=False)["input_ids"]
    if len(head) != 1:
        return None
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(text)], strict=True)):
        piece = text[a:b] if i == 0 else sentinel + text[a:b]
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        shift = a - (0 if i == 0 else len(sentinel))
        pairs = list(zip(enc["input_ids"], enc["offset_mapping"], strict=True))
        if i:
            if not pairs or pairs[0][0] != head[0]:
                return None
            pairs = pairs[1:]
        ids += [t for t, _ in pairs]
        offsets += [(s + shift, e + shift) for _, (s, e) in pairs]
    decode = functools.partial(tokenizer.decode, skip_special_tokens=False)
    return (ids, offsets) if decode(ids) == decode(whole) else None


_MERGES: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()  # per tokenizer
_BOS: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()  # per tokenizer


def adds_bos_token(tokenizer: Any) -> bool:
    """Whether the tokenizer puts its BOS first when it encodes text by default (its
    post-processor adds it: Llama, Mistral), as a model of it saw every pretraining sequence
    start. Asked once per tokenizer object."""
    try:
        return _BOS[tokenizer]
    except (KeyError, TypeError):  # TypeError: an object without weak references
        pass
    bos_id, bos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
    ids = tokenizer("x")["input_ids"] if isinstance(bos_id, int) and isinstance(bos, str) else []
    adds = bool(ids) and ids[0] == bos_id
    with contextlib.suppress(TypeError):
        _BOS[tokenizer] = adds
    return adds


def space_merges_into_word(tokenizer: Any) -> bool:
    """Whether the tokenizer joins a space with the word after it (SentencePiece "▁The", GPT-2
    "ĠThe"), unlike a byte tokenizer. Asked once per tokenizer object."""
    try:
        return _MERGES[tokenizer]
    except (KeyError, TypeError):  # TypeError: an object without weak references
        pass
    enc = tokenizer(": The", add_special_tokens=False, return_offsets_mapping=True)
    merges, prev_end = False, 0
    for start, end in enc["offset_mapping"]:
        if start <= 2 < end:  # the token holding "T": does it (or a trimmed gap) hold the space?
            merges = min(start, prev_end) <= 1
            break
        prev_end = max(prev_end, end)
    with contextlib.suppress(TypeError):
        _MERGES[tokenizer] = merges
    return merges


def _tokenize_per_segment(segments: list[Segment], tokenizer: Any, *, max_seq_len: int) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    for seg in segments:
        seg_ids = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
        ids += seg_ids
        labels += seg_ids if seg.trained else [IGNORE] * len(seg_ids)
    truncated = len(ids) > max_seq_len
    return Example(ids[:max_seq_len], labels[:max_seq_len], truncated)


def trained_spans(example: Example, tokenizer: Any) -> list[str]:
    """Decoded text of each contiguous run of label-bearing tokens."""
    spans: list[list[int]] = []
    prev = False
    for tok, label in zip(example.input_ids, example.labels, strict=True):
        on = label != IGNORE
        if on and not prev:
            spans.append([])
        if on:
            spans[-1].append(tok)
        prev = on
    return [tokenizer.decode(s, skip_special_tokens=False) for s in spans]
