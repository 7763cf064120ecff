"""Where outputs go: ``writable_dir_problem`` names what stands in the way."""

from __future__ import annotations

from pathlib import Path

import pytest

from raysft.paths import writable_dir_problem


def test_a_writable_folder_and_one_still_to_make_pass(tmp_path: Path) -> None:
    assert writable_dir_problem(tmp_path) is None
    assert writable_dir_problem(tmp_path / "a" / "b") is None
    assert not (tmp_path / "a").exists()  # probed, not made


def test_a_file_in_the_way_is_named(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert writable_dir_problem(tmp_path / "f") == f"{tmp_path / 'f'} is a file, not a directory"
    assert writable_dir_problem(tmp_path / "f" / "out") == (
        f"{tmp_path / 'f' / 'out'} cannot be created: {tmp_path / 'f'} is a file"
    )


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_filesystem_that_takes_no_folders_is_not_called_missing() -> None:
    """/proc exists, but mkdir in it fails with ENOENT: the message said 'No such file'."""
    assert writable_dir_problem("/proc/raysft-out") == (
        "/proc/raysft-out cannot be created: its filesystem takes no new directories (/proc)"
    )
