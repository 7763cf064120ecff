"""raysft.data.tokens.Example: ids and labels held as arrays, read back as lists, read-only.
(Tokenization itself is tested with the templates that render its input: test_templates.py.)"""

from __future__ import annotations

import pickle

import pytest

from raysft.data.tokens import IGNORE, Example


def test_an_example_reads_back_lists_and_counts_its_tokens() -> None:
    ex = Example([5, 300, 70000], [IGNORE, 300, 70000], truncated=True, merged_boundary=True)
    assert ex.input_ids == [5, 300, 70000] and isinstance(ex.input_ids, list)
    assert ex.labels == [IGNORE, 300, 70000]
    assert (ex.n_tokens, ex.n_trained, ex.truncated, ex.merged_boundary) == (3, 2, True, True)
    assert ex == Example((5, 300, 70000), iter([IGNORE, 300, 70000]), True, True)
    assert ex != Example([5, 300, 70000], [IGNORE, 300, 70000], True, False)


def test_an_example_is_read_only_and_pickles_whole() -> None:
    ex = Example([1, 2], [IGNORE, 2], truncated=False, merged_boundary=True)
    for name in ("truncated", "merged_boundary", "_ids", "input_ids"):
        with pytest.raises(AttributeError):
            setattr(ex, name, None)
        with pytest.raises(AttributeError):
            delattr(ex, name)
    again = pickle.loads(pickle.dumps([ex, ex], protocol=pickle.HIGHEST_PROTOCOL))
    assert again == [ex, ex] and again[0].merged_boundary and not again[0].truncated


def test_ids_and_labels_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="3 input_ids but 2 labels"):
        Example([1, 2, 3], [1, 2], truncated=False)
