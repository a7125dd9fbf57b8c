"""Upload steps take files from the uploads directory only: paths are confined, symlinks
resolved, sizes bounded (pure: no browser)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from worker import uploads
from worker.uploads import MAX_UPLOAD_BYTES, UploadRefused, read_upload, relative_upload

from .conftest import UPLOADS


@pytest.mark.parametrize(
    "name", ["", " ", "/etc/passwd", "../x", "a/../../x", "a\\b", "C:/x", "a\x00b"]
)
def test_paths_that_could_leave_the_directory_are_refused(name: str) -> None:
    with pytest.raises(UploadRefused):
        relative_upload(name)


def test_a_staged_file_is_read_whole_with_its_type() -> None:
    file = read_upload(UPLOADS, "receipt-ord-100231.png")
    assert (file.name, file.mime_type) == ("receipt-ord-100231.png", "image/png")
    assert file.content == (UPLOADS / "receipt-ord-100231.png").read_bytes()


def test_symlinks_out_missing_files_big_files_and_no_directory_are_refused(
    tmp_path: Path,
) -> None:
    root = tmp_path / "uploads"
    (root / "job").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    (root / "job" / "escape.txt").symlink_to(secret)
    (root / "job" / "big.bin").write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    (root / "job" / "ok.txt").write_text("fine")
    for name, why in [
        ("job/escape.txt", "outside"),
        ("job/missing.txt", "not a file"),
        ("job", "not a file"),
        ("job/big.bin", "larger"),
    ]:
        with pytest.raises(UploadRefused, match=why):
            read_upload(root, name)
    with pytest.raises(UploadRefused, match="no uploads directory"):
        read_upload(None, "job/ok.txt")
    assert read_upload(root, "job/ok.txt").content == b"fine"


@pytest.mark.parametrize(
    ("swap", "why"),
    [("file", "changed after it was checked"), ("directory", "changed after it was checked"),
     ("fifo", "is not a file")],
)  # fmt: skip
def test_a_file_swapped_after_its_check_is_never_followed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap: str, why: str
) -> None:
    # The check resolved the path and found a regular file inside; the read then opened the
    # path again and followed whatever was there by then: a symlink out, put in its place
    # (or in its directory's) between the two, was read and sent to the site.
    root = tmp_path / "uploads"
    (root / "job").mkdir(parents=True)
    (root / "job" / "receipt.txt").write_text("the receipt")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "receipt.txt").write_text("not yours")
    checked = uploads._checked

    def check_then_swap(uploads_dir: Path | None, name: str) -> tuple[Path, Path]:
        found = checked(uploads_dir, name)
        if swap == "file":
            (root / "job" / "receipt.txt").unlink()
            (root / "job" / "receipt.txt").symlink_to(outside / "receipt.txt")
        elif swap == "directory":
            (root / "job").rename(root / "job-moved")
            (root / "job").symlink_to(outside)
        else:  # a read of it would wait for a writer for ever
            (root / "job" / "receipt.txt").unlink()
            os.mkfifo(root / "job" / "receipt.txt")
        return found

    monkeypatch.setattr(uploads, "_checked", check_then_swap)
    with pytest.raises(UploadRefused, match=why):
        read_upload(root, "job/receipt.txt")
