"""Files a script may upload: only from the worker's uploads directory, never from anywhere a
job payload names.

The orchestrator stages attachments (a customer's receipt) in the uploads directory
(`FORMWORK_UPLOADS_DIR`, e.g. `uploads/T-88812/receipt.png`) and passes the path relative to it
as an input. That path is confined: empty, absolute, drive-letter or backslash paths and `..`
are refused outright, and after resolving symlinks the file must still lie inside the
directory. Only a regular file of at most `MAX_UPLOAD_BYTES` is sent, and the bytes sent are the
bytes checked (read here and handed to the browser, which never opens a path itself).
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Generous for a receipt or a screenshot; a bound so a job cannot make a worker read a disk.
MAX_UPLOAD_BYTES = 25 * 1024 * 1024


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
    it is not a regular file there or is too big."""
    if uploads_dir is None:
        raise UploadRefused("this worker has no uploads directory (FORMWORK_UPLOADS_DIR)")
    relative = relative_upload(name)
    root = uploads_dir.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise UploadRefused(f"upload file {name!r} leads outside the uploads directory")
    if not path.is_file():
        raise UploadRefused(f"upload file {name!r} is not a file in the uploads directory")
    if path.stat().st_size > MAX_UPLOAD_BYTES:
        raise UploadRefused(f"upload file {name!r} is larger than {MAX_UPLOAD_BYTES} bytes")
    return path


def read_upload(uploads_dir: Path | None, name: str) -> UploadFile:
    """Check and read `name` (blocking: run it in a thread)."""
    path = upload_path(uploads_dir, name)
    content = path.read_bytes()
    if len(content) > MAX_UPLOAD_BYTES:  # grew since the check
        raise UploadRefused(f"upload file {name!r} is larger than {MAX_UPLOAD_BYTES} bytes")
    mime_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return UploadFile(name=path.name, mime_type=mime_type, content=content)
