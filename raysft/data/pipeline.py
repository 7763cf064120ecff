"""Config's data section -> tokenized train/eval examples and a report of what was dropped."""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from raysft.config import DataSection
from raysft.data.digest import sources
from raysft.data.formats import (
    Conversation,
    DataError,
    LoadedData,
    load_conversations,
    reads,
)
from raysft.data.references import scored_part
from raysft.data.sources import Role, default_split, saved_split
from raysft.data.split import split_train_eval
from raysft.data.templates import TERMINATORS, render, terminator_tokens, token_count
from raysft.data.tokens import (
    Example,
    Segment,
    special_text_in,
    special_token_texts,
    tokenize,
)
from raysft.errors import TemplateError

log = logging.getLogger(__name__)

# A split that takes longer to tokenize says how far it got this often: 100,000 rows take a
# minute or more on 2 CPU cores, silent until now.
PROGRESS_EVERY_S = 15.0


@dataclass
class DataReport:
    rows_read: int = 0
    rows_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # first few reasons, for the log
    train_examples: int = 0
    eval_examples: int = 0
    eval_sampled_from: int = 0  # held-out conversations data.max_eval_samples picked from (0: all)
    # Per split, so that held-out rows never count as training's: samples cut to max_seq_len
    # but still trainable, and samples truncation left nothing to learn (dropped, counted).
    train_truncated: int = 0
    eval_truncated: int = 0
    train_dropped_no_trained_tokens: int = 0
    eval_dropped_no_trained_tokens: int = 0
    dropped: list[str] = field(default_factory=list)  # those rows of both splits, named
    merged_boundary: int = 0  # samples tokenized apart where prompt and answer would merge
    train_tokens: int = 0
    trained_tokens: int = 0
    packing_efficiency: float | None = None
    packed_rows: int | None = None
    # Fields of rows no format reads: "source: 'inputs' in 12 rows (alpaca reads ...)"
    unread_fields: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped"] = self.skipped[:20]
        out["dropped"] = self.dropped[:20]
        return out


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example]
    eval_conversations: list[Conversation]  # aligned with ``eval``, for exact match
    report: DataReport


def render_row(
    conv: Conversation,
    cfg: DataSection,
    tokenizer: Any,
    report: DataReport,
    *,
    origins: dict[int, str] | None = None,
    training: bool = False,
) -> list[Segment] | None:
    """``conv`` rendered by ``data.template``; None for a row the template refuses in skip mode
    (counted in ``report``). In strict mode such a row is a DataError naming it (``origins``:
    ``id(conv)`` -> "file: line N"). ``training``: a training row, every segment of which is
    trained with ``data.train_on_prompt`` (but a BOS the template opens with, never a target)."""
    try:
        segments = render(conv, template=cfg.template, tokenizer=tokenizer)
    except TemplateError as err:
        # One row the template cannot render (Gemma's "System role not supported"): a
        # malformed row, so an error in strict mode, dropped and counted in skip mode.
        why = f"{(origins or {}).get(id(conv), 'a row')}: data.template={cfg.template}: {err}"
        if cfg.on_error == "strict":
            raise DataError(why) from None
        report.skipped.append(why)
        report.rows_skipped += 1
        return None
    if training and cfg.train_on_prompt:
        # llama2 writes "<s>" as its text's first characters; chatml and vicuna add it apart.
        bos = str(getattr(tokenizer, "bos_token", None) or "")
        first = segments[0].text if segments else ""
        opening = [Segment(bos, False)] if bos and first.startswith(bos) else []
        if opening:
            segments = [Segment(first[len(bos) :], True), *segments[1:]]
        segments = opening + [Segment(s.text, True) for s in segments if s.text]
    return segments


def _tokenize_all(
    convs: list[Conversation],
    cfg: DataSection,
    tokenizer: Any,
    report: DataReport,
    *,
    origins: dict[int, str] | None = None,
    skipped: list[str] | None = None,
    name: str = "data",
) -> tuple[list[Example], list[Conversation], list[str]]:
    """The examples and the conversations kept, and the rows truncation left nothing to train
    (named). ``skipped``: this split's own list of skipped rows, extended here too. ``name``:
    the split, in the progress lines of a long one."""
    examples, kept, dropped = [], [], []
    specials, special_rows = special_token_texts(tokenizer), []
    start = time.monotonic()
    say_at = start + PROGRESS_EVERY_S
    for done, conv in enumerate(convs):
        if done and time.monotonic() >= say_at:
            rate = done / (time.monotonic() - start)
            log.info(
                "data.%s: tokenized %s of %s conversations (%.0f a second)",
                name, f"{done:,}", f"{len(convs):,}", rate,
            )  # fmt: skip
            say_at += PROGRESS_EVERY_S
        segments = render_row(
            conv, cfg, tokenizer, report, origins=origins, training=name == "train"
        )
        if segments is None:  # skipped (skip mode): counted in report, and in this split's list
            if skipped is not None:
                skipped.append(report.skipped[-1])
            continue
        found = specials and special_text_in(conv, specials)
        if found:
            special_rows.append(f"{(origins or {}).get(id(conv), 'a row')}, {found}")
        ex = tokenize(segments, tokenizer, max_seq_len=cfg.max_seq_len)
        if ex.n_trained == 0:
            if cfg.on_error == "strict":
                # Truncation left nothing to learn: the row is unusable, like a malformed one.
                raise DataError(
                    f"{(origins or {}).get(id(conv), 'a row')}: its prompt fills all "
                    f"data.max_seq_len={cfg.max_seq_len} tokens, nothing left to train (raise "
                    "data.max_seq_len; data.on_error=skip drops and counts such rows)"
                )
            # Named like a skipped row, so the dropped ones can be found and fixed.
            dropped.append(
                f"{(origins or {}).get(id(conv), 'a row')}: its prompt fills all "
                f"data.max_seq_len={cfg.max_seq_len} tokens, nothing left to train"
            )
            continue
        report.merged_boundary += ex.merged_boundary
        examples.append(ex)
        kept.append(conv)
    report.dropped += dropped
    if special_rows:
        _warn_of_special_text(name, special_rows, len(convs))
    return examples, kept, dropped


def _warn_of_special_text(name: str, rows: list[str], total: int) -> None:
    log.warning(
        "data.%s: %d of %d rows hold a special token's text in a message (the first: %s): the "
        "tokenizer reads it as that token, not as text, as a chat template does at inference. "
        "In an answer the model learns to emit it there (an end-of-sequence token ends "
        "generation early). If it is meant as text, change it in the data",
        name, len(rows), total, rows[0],
    )  # fmt: skip


def load_split(
    cfg: DataSection, *, seed: int, with_eval: bool = True
) -> tuple[list[Conversation], list[Conversation], DataReport]:
    """Conversations for train and eval (seeded split when no eval source is given).

    ``with_eval=False`` reads the training sources only and splits nothing off.
    """
    train, evals, report, _, _ = _load_split(cfg, seed=seed, with_eval=with_eval)
    return train, evals, report


@dataclass
class TrainingRows:
    conversations: list[Conversation]
    report: DataReport
    origins: dict[int, str]  # id(conv) -> "file: line N"
    # Why data.train could not be split (fewer than 2 rows): all its rows are here, and a run
    # would refuse them.
    no_split: str | None = None


def training_rows(cfg: DataSection, *, seed: int) -> TrainingRows:
    """The conversations a run trains on, in file order (a preview): ``data.train`` less the
    rows ``load_split`` holds out when ``data.eval`` is null (the same split, same seed); the
    eval source itself is not read."""
    train, _, report, origins, _ = _load_split(cfg, seed=seed, with_eval=False)
    if cfg.eval is None:
        try:
            train, _ = split_train_eval(train, eval_fraction=cfg.eval_fraction, seed=seed)
        except DataError as err:
            return TrainingRows(train, report, origins, no_split=str(err))
    return TrainingRows(train, report, origins)


def _no_rows(name: str, sources: str | list[str], loaded: LoadedData) -> DataError:
    if loaded.n_rows == 0:
        names = ", ".join([sources] if isinstance(sources, str) else sources)
        return DataError(f"data.{name}: {names}: no rows (empty)")
    return _no_usable_rows(name, loaded.skipped)


def _no_usable_rows(name: str, skipped: list[str]) -> DataError:
    first = f"; the first: {skipped[0]}" if skipped else ""
    return DataError(f"data.{name}: no usable rows ({len(skipped)} skipped{first})")


def _note_unread(loaded: LoadedData, report: DataReport) -> None:
    """Say which fields of the rows (and keys of their messages) no format reads: a misspelt
    field (``inputs``) would otherwise drop its text from every row without a word."""
    for (source, kind, key), rows in sorted(loaded.unread.items()):
        note = (
            f"{source}: field {key!r} in {rows} row(s) is not read ({kind} rows read "
            f"{', '.join(reads(kind, key))}); if it is misspelt, its text is left out"
        )
        report.unread_fields.append(note)
        log.warning("%s", note)


def _where(source: str, role: Role) -> tuple[str, str | None]:
    """What a source reads, for comparing two: a hub name and split, else the resolved path and
    the split a saved ``DatasetDict`` gives ``role`` without one named (read from its
    ``dataset_dict.json``, as ``_iter_saved_dataset`` picks it; None: one Dataset, a file)."""
    if source.startswith("hf:"):
        name, _, hub_split = source[3:].partition(":")
        return f"hf:{name}", hub_split or "train"  # an unnamed split: train reads `train`
    path, split = saved_split(source)
    if split is None and path.is_dir():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = []  # one Dataset, or not a dataset at all (its read says so)
        split = default_split([str(s) for s in splits], role)
    return str(path.resolve()), split


def warn_of_eval_in_train(cfg: DataSection) -> list[str]:
    """Warn of each ``data.eval`` source that ``data.train`` reads too: its "held-out" scores
    would be on training rows. Returns the sources warned of."""
    train = {_where(t, "train"): t for t in sources(cfg.train)}
    same = [e for e in sources(cfg.eval) if _where(e, "eval") in train]
    for source in same:
        log.warning(
            "data.eval: %s is also in data.train (as %s): the eval rows are training rows, so "
            "the held-out scores say nothing of unseen data; use another file, or set "
            "data.eval: null for a seeded split (data.eval_fraction)",
            source,
            train[_where(source, "eval")],
        )
    return same


def _load_split(
    cfg: DataSection, *, seed: int, with_eval: bool, with_train: bool = True
) -> tuple[
    list[Conversation], list[Conversation], DataReport, dict[int, str], dict[str, list[str]]
]:
    """``load_split``, where each conversation came from (``id(conv)`` -> "file: line i"), and
    the rows skipped per split ("train", "eval": a split's errors name its own rows only).
    ``with_train=False``: ``data.train`` is read only if the eval rows are split from it."""
    report = DataReport()
    origins: dict[int, str] = {}
    skipped: dict[str, list[str]] = {"train": [], "eval": []}

    def load(sources: str | list[str], role: Role = "train") -> LoadedData:
        loaded = load_conversations(
            sources,
            role=role,
            fmt=cfg.format,
            on_error=cfg.on_error,
            system_prompt=cfg.system_prompt,
        )
        origins.update(zip(map(id, loaded.conversations), loaded.origins, strict=True))
        return loaded

    train_convs: list[Conversation] = []
    if with_train or cfg.eval is None:
        train = load(cfg.train)
        _note_unread(train, report)
        report.rows_read += train.n_rows
        report.skipped += train.skipped
        skipped["train"] += train.skipped
        if not train.conversations:
            raise _no_rows("train", cfg.train, train)
        train_convs = train.conversations
    if not with_eval:
        report.rows_skipped = len(report.skipped)
        return train_convs, [], report, origins, skipped
    if cfg.eval is None:
        train_convs, eval_convs = split_train_eval(
            train_convs, eval_fraction=cfg.eval_fraction, seed=seed
        )
    else:
        warn_of_eval_in_train(cfg)
        held = load(cfg.eval, "eval")
        _note_unread(held, report)
        report.rows_read += held.n_rows
        report.skipped += held.skipped
        skipped["eval"] += held.skipped
        eval_convs = held.conversations
        if not eval_convs:
            raise _no_rows("eval", cfg.eval, held)
    report.rows_skipped = len(report.skipped)
    picked = _sampled(eval_convs, cfg, seed=seed)
    report.eval_sampled_from = len(eval_convs) if len(picked) < len(eval_convs) else 0
    return train_convs, picked, report, origins, skipped


def _sampled(convs: list[Conversation], cfg: DataSection, *, seed: int) -> list[Conversation]:
    """``data.max_eval_samples`` of the held-out conversations, picked by ``seed``."""
    if cfg.max_eval_samples is not None and len(convs) > cfg.max_eval_samples:
        return random.Random(seed).sample(convs, cfg.max_eval_samples)
    return convs


def load_eval(cfg: DataSection, *, seed: int) -> tuple[list[Conversation], DataReport]:
    """The held-out conversations ``load_split`` returns (the same rows, picked by the same
    seed), without reading the training data where it is not needed: only a split of
    ``data.train`` (no ``data.eval``) reads it."""
    _, evals, report, _, _ = _load_split(cfg, seed=seed, with_eval=True, with_train=False)
    return evals, report


_WARNED_TERMINATORS: set[tuple[str, str]] = set()  # (template, tokenizer): said once a process


def _warn_of_a_split_terminator(cfg: DataSection, tokenizer: Any) -> None:
    """A built-in template whose end of answer this tokenizer splits into ordinary tokens: said
    once, with what to do (the run still trains: the answers end with those tokens)."""
    if cfg.template not in TERMINATORS:
        return
    n = terminator_tokens(cfg.template, tokenizer)
    key = (cfg.template, str(getattr(tokenizer, "name_or_path", "")))
    if n <= 1 or key in _WARNED_TERMINATORS:
        return
    _WARNED_TERMINATORS.add(key)
    end = TERMINATORS[cfg.template].strip()
    log.warning(
        "data.template: %s ends each answer with %r, which this tokenizer has no token for: it "
        "is %d ordinary tokens, so the model learns to end answers with them and never with "
        "EOS, and generation stops only on the text (eval cuts there; a plain generate of the "
        "export runs to its length limit). Use data.template: tokenizer where the model has a "
        "chat template, or a template whose markers this tokenizer has",
        cfg.template, end, n,
    )  # fmt: skip


def _warn_of_a_foreign_bos(cfg: DataSection, tokenizer: Any) -> None:
    """``llama2`` writes its turns' ``<s>`` as the BOS Llama-2's tokenizer has: on a tokenizer
    whose BOS is another (Llama-3's ``<|begin_of_text|>``), its rows open with that text and
    never with the BOS the model was pretrained after. Said once."""
    bos = getattr(tokenizer, "bos_token", None)
    key = ("llama2 <s>", str(getattr(tokenizer, "name_or_path", "")))
    if cfg.template != "llama2" or bos in (None, "<s>") or key in _WARNED_TERMINATORS:
        return
    _WARNED_TERMINATORS.add(key)
    log.warning(
        "data.template: llama2 opens each turn with '<s>', Llama-2's BOS, but this tokenizer's "
        "BOS is %r: its rows open with the text '<s>' (%d token(s)), never with %r. Use "
        "data.template: tokenizer where the model has a chat template",
        bos, token_count("<s>", tokenizer), bos,
    )  # fmt: skip


def check_template(cfg: DataSection, tokenizer: Any) -> None:
    """``template: tokenizer`` needs a tokenizer with a chat_template: said once, of the model,
    not of the first row each would fail on."""
    _warn_of_a_split_terminator(cfg, tokenizer)
    _warn_of_a_foreign_bos(cfg, tokenizer)
    if cfg.template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "data.template: tokenizer, but the model's tokenizer has no chat_template (a base "
            "model often has none): choose llama2, chatml or vicuna"
        )


def prepare_data(cfg: DataSection, tokenizer: Any, *, seed: int) -> PreparedData:
    check_template(cfg, tokenizer)
    train_convs, eval_convs, report, origins, skipped = _load_split(cfg, seed=seed, with_eval=True)
    tokenized = {
        name: _tokenize_all(
            convs, cfg, tokenizer, report, origins=origins, skipped=skipped[name], name=name
        )
        for name, convs in (("train", train_convs), ("eval", eval_convs))
    }
    train, _, _ = tokenized["train"]
    evals, eval_kept, _ = tokenized["eval"]
    for name, (kept, _, dropped) in tokenized.items():
        if kept:
            continue
        if dropped:  # this split's own rows, never the other's
            raise DataError(
                f"data.{name}: every sample lost its trainable tokens to truncation at "
                f"data.max_seq_len={cfg.max_seq_len} (raise it or shorten the prompts; the "
                f"first: {dropped[0]})"
            )
        raise _no_usable_rows(name, skipped[name])
    report.train_examples, report.eval_examples = len(train), len(evals)
    report.train_truncated = sum(e.truncated for e in train)
    report.eval_truncated = sum(e.truncated for e in evals)
    report.train_dropped_no_trained_tokens = len(tokenized["train"][2])
    report.eval_dropped_no_trained_tokens = len(tokenized["eval"][2])
    report.train_tokens = sum(e.n_tokens for e in train)
    report.trained_tokens = sum(e.n_trained for e in train)
    # Generation scores each row's last trained answer (a final one of weight 0 is context).
    return PreparedData(train, evals, [scored_part(c) for c in eval_kept], report)
