"""Text segments marked trained or not -> token ids and labels (``Example``), as inference
tokenizes the same text.

The whole text is tokenized once and each token's characters decide whether it is trained, so a
merge across a segment boundary cannot shift the label mask; where a token would hold both the
end of a prompt and the start of its answer, the two are tokenized apart. Rendering the segments
is ``raysft.data.templates``' job.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
import weakref
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from raysft.errors import TemplateError

IGNORE = -100  # label value cross-entropy skips


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


class Example:
    """One tokenized sample: its token ids, its labels (IGNORE where not trained), whether it
    was cut to ``max_seq_len``, and whether prompt and answer were tokenized apart. Read-only.

    The ids and labels are kept as 4-byte arrays, read back as lists. Every sample of a run's
    data stays in memory for the whole run, in every data-parallel worker, and in a search in
    every trial's worker: a Python list of token ids takes several times the memory (a pointer
    and an int object per id), and unpickling the search's shared data (raysft.data.shared)
    builds one int object per token. On 100,000 Alpaca rows (7.1M tokens) a worker held 355 MiB
    as lists and 82 MiB as arrays (benchmarks/data_memory.py, benchmarks/RESULTS.md).
    """

    __slots__ = ("_ids", "_labels", "_truncated", "_merged")
    _ids: array[int]
    _labels: array[int]
    _truncated: bool
    _merged: bool

    def __init__(
        self,
        input_ids: Iterable[int],
        labels: Iterable[int],
        truncated: bool,
        merged_boundary: bool = False,
    ) -> None:
        ids, labs = array("i", input_ids), array("i", labels)
        if len(ids) != len(labs):
            raise ValueError(f"{len(ids)} input_ids but {len(labs)} labels")
        for name, value in zip(
            self.__slots__, (ids, labs, truncated, merged_boundary), strict=True
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"an Example is read-only ({name})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"an Example is read-only ({name})")

    def __reduce__(self) -> tuple[Any, ...]:  # unpickled by _restore: no setattr, no copy
        return (_restore, (self._ids, self._labels, self._truncated, self._merged))

    @property
    def truncated(self) -> bool:
        return bool(self._truncated)

    @property
    def merged_boundary(self) -> bool:
        """The tokenizer would have merged prompt and answer text into one token (an answer
        starting with a newline after ChatML's "assistant\\n", a plain-text "</s>" and the
        next "\\n"): tokenized apart there."""
        return bool(self._merged)

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
        mine = (self._ids, self._labels, self.truncated, self.merged_boundary)
        return mine == (other._ids, other._labels, other.truncated, other.merged_boundary)

    __hash__ = None  # type: ignore[assignment]  # equal by value, and mutable arrays inside

    def __repr__(self) -> str:
        return (
            f"Example(input_ids={self.input_ids}, labels={self.labels}, "
            f"truncated={self.truncated}, merged_boundary={self.merged_boundary})"
        )


def _restore(ids: array[int], labels: array[int], truncated: bool, merged: bool) -> Example:
    example = object.__new__(Example)
    for name, value in zip(Example.__slots__, (ids, labels, truncated, merged), strict=True):
        object.__setattr__(example, name, value)
    return example


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


def special_token_texts(tokenizer: Any) -> re.Pattern[str] | None:
    """A pattern matching the text of the tokenizer's special tokens (EOS, BOS, a chat
    template's turn markers), longest first; None where it has none. Such text inside a message
    is read as the token itself, by training's tokenization as by a chat template's at
    inference."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts |= {t.content for t in added.values() if getattr(t, "special", False)}
    texts = {t for t in texts if isinstance(t, str) and t}
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)))


def special_text_in(conv: Iterable[dict[str, Any]], pattern: re.Pattern[str]) -> str | None:
    """``role: 'TEXT'`` for the first message of ``conv`` that holds a special token's text."""
    for message in conv:
        found = pattern.search(message["content"])
        if found:
            return f"{message['role']}: {found.group()!r}"
    return None
