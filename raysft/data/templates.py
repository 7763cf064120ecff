"""Chat templates: a conversation -> text segments marked trained or not (``raysft.data.tokens``
turns them into token ids and labels).

The built-in templates are byte-exact to SEED.md section 2. Rendering returns segments, not a
string, so the label mask is exact by construction: every assistant turn's content plus its
terminator is trained (but a turn its row gave weight 0, ``is_trained``); system, user, template
text and padding are not.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from raysft.data.formats import Conversation, is_plain_text, is_trained
from raysft.data.tokens import IGNORE, Segment, adds_bos_token, tokenize
from raysft.errors import TemplateError

log = logging.getLogger(__name__)

VICUNA_SYSTEM = "A chat between a curious user and an AI assistant."

# What ends an assistant turn, as trained; generation stops at the stripped form.
TERMINATORS = {"llama2": " </s>", "chatml": "<|im_end|>", "vicuna": "</s>"}
# An answer no chat template alters (no spaces to trim, no markup), to find its terminator.
_SENTINEL = "RaysftSentinelAnswer"
# The answer after a generation prompt when tokenizing it as training does: an ordinary word.
_PROBE_ANSWER = "The"
# The probe conversations' openings, in turn: none, then a system message, for a template that
# refuses a conversation without one (and one that refuses a system role takes the first).
_PROBE_OPENINGS: tuple[list[dict[str, str]], ...] = ([], [{"role": "system", "content": "Hi"}])
# The chat templates whose end of answer was warned of as unknown (once a process each).
_UNKNOWN_END_WARNED: set[int] = set()
# Built-in templates whose text has no BOS of its own (llama2 writes "<s>"): they open with the
# tokenizer's BOS where it adds one by default (``adds_bos_token``).
_OPENS_WITH_BOS = ("chatml", "vicuna")


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
    chatml and vicuna open with the tokenizer's BOS (untrained) where it adds one by default.
    A plain-text row is no conversation: see ``_plain_text``."""
    if is_plain_text(conv):
        return _plain_text(conv[0]["content"], tokenizer, generation=generation)
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


def _plain_text(text: str, tokenizer: Any, *, generation: bool) -> list[Segment]:
    """A plain-text row as TRL trains one: the tokenizer's BOS where it adds one (untrained: no
    token predicts it), then the text and the tokenizer's EOS, all trained, so the model learns
    where such a text ends. No template: it has no turns."""
    if generation:
        raise TemplateError("a plain-text row has no prompt to answer (no generation for it)")
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise TemplateError("plain-text rows end with the tokenizer's EOS, and it has none")
    segs = [Segment(text, True), Segment(str(eos), True)]
    if adds_bos_token(tokenizer):
        segs.insert(0, Segment(str(tokenizer.bos_token), False))
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
    for opening in _PROBE_OPENINGS:
        try:
            prompt = _apply_chat_template(tokenizer, [*opening, user], generation=True)
            full = _apply_chat_template(tokenizer, [*opening, user, answer], generation=False)
        except TemplateError:
            continue
        if not full.startswith(prompt) or _SENTINEL not in full[len(prompt) :]:
            return ""
        return full[len(prompt) : full.index(_SENTINEL, len(prompt))]
    return ""


def template_terminator(tokenizer: Any) -> str | None:
    """What a chat_template writes right after an assistant message's content, e.g. Llama-3
    ``<|eot_id|>``, Gemma ``<end_of_turn>``, Phi-3 ``<|end|>``, ChatML ``<|im_end|>``.

    Found by rendering a sentinel answer twice, as the last turn and followed by a user turn,
    and taking the tokens that follow it in both (decoded, whitespace stripped): the last turn
    alone may be followed by an EOS (Phi-3), the next turn's header is not part of the
    terminator. Rendered without a system message, else with one (a template may require it).
    None if the template writes nothing there; also where it renders neither, which is warned
    of: answers then stop at EOS only.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}
    after: list[str] = []
    refused: list[str] = []
    for opening in _PROBE_OPENINGS:
        for msgs in ([user, answer], [user, answer, {"role": "user", "content": "Thanks"}]):
            try:
                text = _apply_chat_template(tokenizer, [*opening, *msgs], generation=False)
            except TemplateError as err:
                refused.append(str(err))
                continue  # e.g. a template that allows a single turn only
            if _SENTINEL in text:
                after.append(text[text.index(_SENTINEL) + len(_SENTINEL) :])
        if after:
            break
    if not after:
        if refused and hash(str(template)) not in _UNKNOWN_END_WARNED:
            _UNKNOWN_END_WARNED.add(hash(str(template)))
            log.warning(
                "the tokenizer's chat_template renders no conversation of a user turn and an "
                "answer, with or without a system message (%s): its end of answer is unknown, so "
                "generated answers stop at EOS only and may run on to train.max_new_tokens",
                refused[-1],
            )
        return None
    # Common prefix in tokens, not characters: "<|end|>\n<|endoftext|>" and "<|end|>\n<|user|>"
    # share "<|end|>\n<|" as text, but only "<|end|>", "\n" as tokens.
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in after]
    common = os.path.commonprefix(ids)
    return str(tokenizer.decode(common, skip_special_tokens=False)).strip() or None
