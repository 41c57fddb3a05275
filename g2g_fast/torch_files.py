"""Reading any file with torch.load safely: training checkpoints and pretrained weight files alike.

`weights_only=True` always (a file from the internet must never run code), and a failure is one
line that says what the file is not, never torch's own advice to retry with weights_only=False.
"""
from __future__ import annotations

import errno
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch


class UnreadableFile(ValueError):
    """A file torch.load cannot read safely; the message names the flag, the file and why."""


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint", flag: str | None = None) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)`, or an UnreadableFile error of one line:
    `[flag ]path: <what the file is not>` (see `describe_load_error`). For every file read with
    torch.load: training checkpoints, pretrained weight files (`what="FUNIT generator file"`,
    `flag="--init-funit"`, say). torch's warnings are shown only when the load succeeds."""
    prefix = f"{flag} " if flag else ""
    path = Path(path)
    if not path.exists():
        raise UnreadableFile(f"{prefix}{path}: no such file")
    if path.is_dir():  # torch.load would say only "Is a directory"
        raise UnreadableFile(f"{prefix}{path}: is a folder; pass the {what} itself (a .pt/.pth file)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a torn or foreign file
            raise UnreadableFile(prefix + describe_load_error(path, e, what)) from None
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return obj


# torch.save's legacy (pre-zip) format: a pickle that starts with this magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def describe_load_error(path: str | os.PathLike, exc: BaseException, what: str = "checkpoint") -> str:
    """Why `torch.load(path, weights_only=True)` raised `exc`, as one line: `path: <reason>`.

    Says what the file is not (truncated, not a torch file, a refused pickle), told apart by the
    file's first bytes and the exception, rather than torch's own text: that is long, varies with
    the kind of damage, and advises loading with `weights_only=False`, which a user must not do
    for a file from elsewhere (it runs the file's pickled code)."""
    path = Path(path)
    if isinstance(exc, OSError) and exc.errno != errno.EINVAL:  # a folder, no permission, an I/O error
        return f"{path}: cannot read the {what} ({exc.strerror or type(exc).__name__})"
    text = str(exc)  # (EINVAL: torch's zip reader seeking before the start of a short, truncated file)
    head = _head(path)
    torch_file = head.startswith((b"PK\x03\x04", _LEGACY_MAGIC))
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found or (torch_file and "Weights only load failed" in text and "Unsupported operand" not in text):
        # a torch file whose pickle names a class or function: refused, never imported or run
        name = f" ({found.group(1)})" if found else ""
        return (f"{path}: refused: the {what} holds pickled Python objects beyond tensors{name}; "
                f"it is read with weights_only=True, and we never run code from a file")
    return f"{path}: not a readable {what} ({_what_the_file_is(path, head)})"


def _head(path: Path, n: int = 64) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _zip_end_missing(path: Path) -> bool:
    """Whether a zip archive lacks its end record (PK\\x05\\x06, in the last 64 KiB + 22 bytes)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - (1 << 16) - 22))
            return b"PK\x05\x06" not in f.read()
    except OSError:
        return False


def _what_the_file_is(path: Path, head: bytes) -> str:
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):  # torch.save's format is a zip archive
        if _zip_end_missing(path):
            return "truncated: the end of its zip archive is missing"
        return "a damaged zip archive, or one that torch.save did not write"
    if head.startswith(_LEGACY_MAGIC):
        return "truncated or damaged: a torch file in the legacy format"
    if head.startswith(b"\x80"):
        return "a plain Python pickle, not a file written by torch.save"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself; fetch it with git lfs pull"
    if len(head) > 10 and head[8:10] == b'{"':
        return "a safetensors file; this reads files written by torch.save"
    start = head.decode("utf-8", errors="replace")
    body = start[:-3] if len(head) == 64 else start  # the read may cut a multi-byte character
    if body and "\ufffd" not in body and all(c.isprintable() or c in "\r\n\t" for c in body):
        first = start.strip().splitlines()[0] if start.strip() else ""
        shown = repr(first[:24]) + ("..." if len(first) > 24 or len(head) == 64 else "")
        return f"a text file starting {shown}, not a torch file"
    return "not a torch file"
