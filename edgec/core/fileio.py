"""Atomic file output, output guards and data-only torch loading: the one place files are written and read."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

from edgec.core.errors import EdgecError, first_line


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write bytes to ``path`` via a temporary file in the same folder and a rename."""
    atomic_stream(path, lambda f: f.write(data))


def atomic_save(path: str | Path, obj) -> None:
    """``atomic_write(path, serialize(obj))`` without holding the file's bytes in memory: ``torch.save``
    streams into the temporary file (the same bytes)."""
    import torch

    atomic_stream(path, lambda f: torch.save(_canonical(obj), f))


def atomic_stream(path: str | Path, write) -> None:
    """``write(file)`` into a temporary file in ``path``'s folder, then rename it to ``path`` (nothing is left
    behind on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
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


def check_output(output: str | Path, *inputs, others: dict | None = None) -> Path:
    """Refuse, before any work, an output edgec cannot or must not write: a folder; something that exists and
    is not a regular file (a FIFO or a device: the rename would replace it); a path under a file or in a folder
    it cannot write; one of the ``inputs`` (inputs are never modified); or one of ``others`` (``{what: path}``,
    the command's other outputs)."""
    out = Path(output)
    if not str(output).strip():
        raise EdgecError("the output path is empty; give a file name")
    if out.is_dir():
        raise EdgecError(f"output {out} is a directory; give a file name")
    if out.exists() and not out.is_file():
        raise EdgecError(f"output {out} exists and is not a regular file (a FIFO, socket or device); "
                         "choose another output")
    folder = existing_ancestor(out)
    if not folder.is_dir():
        raise EdgecError(f"cannot write {out}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EdgecError(f"cannot write {out}: no permission to write in {folder}")
    for src in inputs:
        if src is not None and same_file(out, src):
            raise EdgecError(f"refusing to overwrite the input {src}; choose another output")
    for what, other in (others or {}).items():
        if other is not None and same_file(out, other):
            raise EdgecError(f"{out} is also {what}; give each output its own path")
    return out


def existing_ancestor(path: Path) -> Path:
    """The nearest existing folder (or file) above ``path``: where the write would create folders from."""
    parent = Path(path).parent  # as given (relative stays relative, for messages)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name the same file (symlinks and ``..`` resolved; the files need not exist)."""
    try:
        pa, pb = Path(a), Path(b)
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
        return pa.resolve() == pb.resolve()
    except (OSError, ValueError, RuntimeError):  # an unresolvable path (a loop, a NUL byte) names nothing
        return False


def _canonical(obj):
    """Plain containers rebuilt with every string interned. The pickle memo shares objects by identity, so
    equal strings from different sources (a literal vs. one read back from a resume file) would otherwise
    give different bytes for the same content; interned, the bytes depend on the values only."""
    from sys import intern

    kind = type(obj)  # exact types: an OrderedDict state_dict (with its _metadata) or a torch.Size stays as is
    if kind is str:
        return intern(obj)
    if kind is dict:
        return {_canonical(k): _canonical(v) for k, v in obj.items()}
    if kind in (list, tuple):
        return kind(_canonical(v) for v in obj)
    return obj


def serialize(obj) -> bytes:
    """``torch.save`` to bytes; the same content always gives the same bytes (see ``_canonical``)."""
    import torch

    buf = io.BytesIO()
    torch.save(_canonical(obj), buf)
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
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        if any(marker in msg for marker in _CODE_MARKERS):
            raise EdgecError(
                f"refusing to load {path}: it is a pickle that would import or run code{_unsupported_global(msg)}; "
                "edgec loads checkpoints as data only"
            ) from None
        # e.g. "Unsupported operand 91": the bytes are not a pickle at all
        raise EdgecError(f"{path} is not a {what} (corrupt, or not a torch file: {_weights_only_reason(msg)})") \
            from None
    except Exception as exc:  # the unpickler raises anything (IndexError, EOFError, ...) on garbage
        raise EdgecError(f"{path} is truncated or corrupt, or not a torch file ({first_line(exc)})") from None
    check_tensors(obj, str(path))
    return obj


def check_tensors(obj, what: str) -> None:
    """Every tensor in a loaded object (nested dicts, lists, tuples) holds the data its shape claims: dense, not
    meta, and no more elements than its storage has bytes for. A stride-0 view is a few bytes in a file but
    terabytes for any copy of it (a digest, ``isfinite``, a batch). Each container is visited once (by
    identity), so shared or self-referencing containers cost nothing extra."""
    import torch

    stack, visited = [(obj, "")], set()
    while stack:
        value, where = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if id(value) in visited:
                continue
            visited.add(id(value))
            if isinstance(value, dict):
                stack.extend((v, f"{where}.{str(k)[:60]}" if where else str(k)[:60]) for k, v in value.items())
            else:
                stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, torch.Tensor):
            _check_tensor_data(value, what, where or "(top level)")


def _check_tensor_data(t, what: str, where: str) -> None:
    import torch

    if t.is_meta or t.layout != torch.strided:
        kind = "meta" if t.is_meta else str(t.layout).removeprefix("torch.")
        raise EdgecError(f"{what}: tensor '{where}' is a {kind} tensor; edgec loads dense tensors with data only")
    stored = t.untyped_storage().nbytes()
    if t.numel() * t.element_size() > stored:
        raise EdgecError(f"{what}: tensor '{where}' has shape {list(t.shape)[:8]} but only {stored} bytes of data; "
                         "refusing it")



# What torch's weights-only unpickler says when a pickle names a global (a class or function to import or call);
# anything else it refuses (an unknown opcode, a bad persistent id) means the bytes are not a valid pickle.
_CODE_MARKERS = ("GLOBAL", "Can only create new object", "Can only build", "allowlisted", "add_safe_globals")


def _weights_only_reason(msg: str) -> str:
    """The unpickler's own reason, without torch's advice about ``weights_only=False`` around it."""
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    reason = next((ln for ln in lines if not ln.startswith(("Weights only load failed", "Please file an issue",
                                                             "Check the documentation"))), "")
    return reason.removeprefix("WeightsUnpickler error:").strip()[:200] or "not a valid pickle"


def _unsupported_global(msg: str) -> str:
    for line in msg.splitlines():
        if "GLOBAL" in line:
            name = line.split("GLOBAL", 1)[1].strip().split()[0]
            return f" ({name})"
    return ""


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (no whole-file copy in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
