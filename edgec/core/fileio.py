"""Atomic file output, output guards and data-only torch loading: the one place files are written and read."""
from __future__ import annotations

import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

from edgec.core.errors import EdgecError, first_line


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write bytes to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output(output: str | Path, *inputs) -> Path:
    """Refuse an output that is a folder or would overwrite one of the inputs (inputs are never modified)."""
    out = Path(output)
    if out.is_dir():
        raise EdgecError(f"output {out} is a directory; give a file name")
    for src in inputs:
        if src is not None and out.exists() and Path(src).exists() and out.resolve() == Path(src).resolve():
            raise EdgecError(f"refusing to overwrite the input {src}; choose another output")
    return out


def serialize(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def read_data(path: str | Path, what: str = "checkpoint"):
    """``torch.load(weights_only=True)`` with every failure turned into a one-line EdgecError."""
    import torch

    path = Path(path)
    if not path.exists():
        raise EdgecError(f"no such file: {path}")
    if path.is_dir():
        raise EdgecError(f"{path} is a directory, not a {what} file")
    if path.stat().st_size == 0:
        raise EdgecError(f"{path} is empty")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        raise EdgecError(f"{path} is truncated or corrupt (a zip archive without its central directory)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "unsupported" in msg.lower():
            global_name = _unsupported_global(msg)
            raise EdgecError(
                f"refusing to load {path}: it is a pickle that would import or run code{global_name}; "
                "edgec loads checkpoints as data only"
            ) from None
        raise EdgecError(f"{path} is corrupt or not a torch file ({first_line(exc)})") from None
    except Exception as exc:  # the unpickler raises anything (IndexError, EOFError, ...) on garbage
        raise EdgecError(f"{path} is truncated or corrupt, or not a torch file ({first_line(exc)})") from None


def _unsupported_global(msg: str) -> str:
    for line in msg.splitlines():
        if "Unsupported global: GLOBAL" in line:
            name = line.split("GLOBAL", 1)[1].strip().split()[0]
            return f" ({name})"
    return ""
