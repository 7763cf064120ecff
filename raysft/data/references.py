"""What a held-out conversation is scored against: its last trained answer (the reference of
exact match, ROUGE-L and BLEU) and, for a code task's row, the tests its answer must pass
(pass@k), which ``formats`` carries on the conversation's final answer."""

from __future__ import annotations

import functools

from raysft.data.formats import Conversation, is_trained
from raysft.data.sources import Role, iter_rows
from raysft.errors import RaysftError


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
