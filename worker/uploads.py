"""Files a script may upload: only from the worker's uploads directory, never from anywhere a
job payload names.

The orchestrator stages attachments (a customer's receipt) in the uploads directory
(`FORMWORK_UPLOADS_DIR`, e.g. `uploads/T-88812/receipt.png`) and passes the path relative to it
as an input. That path is confined: empty, absolute, drive-letter or backslash paths and `..`
are refused outright, and after resolving symlinks the file must still lie inside the
directory. Only a regular file of at most `MAX_UPLOAD_BYTES` is sent, and the bytes sent are the
bytes checked: read here, and handed to the page as bytes or, for a big file, as a private
copy of the job's (`stage_upload`) — never the staged file, which may change after the check.
The file checked is the file read: it is opened one path component at a time from the
directory, none of them followed if it became a symlink since the check (`O_NOFOLLOW`), and the
open file itself is judged again (`fstat`).
"""

from __future__ import annotations

import mimetypes
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Generous for a receipt or a screenshot; a bound so a job cannot make a worker read a disk.
MAX_UPLOAD_BYTES = 25 * 1024 * 1024


# Up to this size (or when the job records a HAR) a file goes to the page as bytes, through
# Playwright's protocol at about a second per MB: the request body Chromium reports then holds
# them, which a HAR and `replay --from-har` match on. A file the page reads from disk is left
# out of that body. Above it, the page gets a private copy on disk (`stage_upload`).
INLINE_UPLOAD_BYTES = 1024 * 1024


class UploadRefused(ValueError):
    """The named file may not be uploaded (outside the uploads directory, missing, too big)."""


@dataclass(frozen=True)
class UploadFile:
    """A file ready to hand to a file input: its name, type and exact content."""

    name: str
    mime_type: str
    content: bytes


def relative_upload(name: str) -> PurePosixPath:
    """`name` as a path relative to the uploads directory, or UploadRefused."""
    path = PurePosixPath(name)
    if (
        not name.strip()
        or path.is_absolute()
        or "\\" in name
        or "\x00" in name
        or ":" in path.parts[0]
        or ".." in path.parts
    ):
        raise UploadRefused(
            f"upload file {name!r} must be a relative path inside the uploads directory "
            "(not absolute, no '..')"
        )
    return path


def upload_path(uploads_dir: Path | None, name: str) -> Path:
    """The real file `name` names inside `uploads_dir`, symlinks resolved; UploadRefused when
    it is not a regular file there, is empty or too big."""
    return _checked(uploads_dir, name)[1]


def _checked(uploads_dir: Path | None, name: str) -> tuple[Path, Path]:
    """The uploads directory and the file `name` names in it, both resolved (`upload_path`)."""
    if uploads_dir is None:
        raise UploadRefused("this worker has no uploads directory (FORMWORK_UPLOADS_DIR)")
    relative = relative_upload(name)
    root = uploads_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise UploadRefused(f"upload file {name!r} leads outside the uploads directory")
    if not path.is_file():
        raise UploadRefused(f"upload file {name!r} is not a file in the uploads directory")
    _check_size(name, path.stat().st_size)
    return root, path


def _check_size(name: str, size: int) -> None:
    if size > MAX_UPLOAD_BYTES:
        raise UploadRefused(f"upload file {name!r} is larger than {MAX_UPLOAD_BYTES} bytes")
    if size == 0:
        # No attachment is empty: a file staged while still being written, or a failed copy.
        # A site that takes it anyway (the orders site does) keeps a refund with no receipt.
        raise UploadRefused(f"upload file {name!r} is empty (0 bytes): is it staged whole?")


def _open_within(root: Path, relative: PurePosixPath) -> int:
    """A file descriptor for `root / relative`, opened a component at a time from `root`
    without following any symlink: a directory or the file swapped for one after the check
    fails to open (ELOOP, or ENOTDIR) instead of leading out of `root`."""
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in relative.parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = inner
        # O_NONBLOCK: a FIFO swapped in would block the open until a writer came; it opens at
        # once and is refused as no regular file. A regular file's reads ignore the flag.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
        return os.open(relative.parts[-1], flags, dir_fd=directory)
    finally:
        os.close(directory)


def read_upload(uploads_dir: Path | None, name: str) -> UploadFile:
    """Check and read `name` (blocking: run it in a thread)."""
    root, path = _checked(uploads_dir, name)
    try:
        fd = _open_within(root, PurePosixPath(path.relative_to(root).as_posix()))
    except OSError as exc:
        # Resolved, it held no symlink a moment ago: one is there now, or the file is gone.
        raise UploadRefused(
            f"upload file {name!r} changed after it was checked ({exc.strerror}): refused"
        ) from None
    with open(fd, "rb") as opened:
        if not stat.S_ISREG(os.fstat(opened.fileno()).st_mode):
            raise UploadRefused(f"upload file {name!r} is not a file in the uploads directory")
        # At most one byte over the limit: a file that grows as it is read is not read whole.
        content = opened.read(MAX_UPLOAD_BYTES + 1)
    _check_size(name, len(content))  # grew or was emptied since the check
    mime_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return UploadFile(name=path.name, mime_type=mime_type, content=content)


def stage_upload(file: UploadFile, folder: Path | None) -> tuple[Path, Path]:
    """Write `file`'s checked bytes to `<folder>/<name>`, making `folder` (private) when it is
    None; returns the folder and the copy (blocking: run it in a thread).

    For a file over `INLINE_UPLOAD_BYTES` the browser is given this path rather than the
    bytes: bytes go through Playwright's protocol as base64 at about a second per MB, so a file
    of a few MB outlasted the step's timeout and one near `MAX_UPLOAD_BYTES` never went up.
    Chromium reads the copy when the form is sent, so it lives until the job ends
    (`discard_staged`)."""
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="formwork-upload-"))  # 0700: the worker's own
    target = folder / file.name
    target.write_bytes(file.content)
    return folder, target


def discard_staged(folder: Path | None) -> None:
    """Remove a job's private upload copies (blocking)."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
