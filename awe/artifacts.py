"""Atomic file writing and the model directory's files.

Every file is written to a temporary name in the same directory, flushed to disk and renamed over
the final name, so an interrupted run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from awe import __version__
from awe.errors import AweError


def cannot_write(path: Path, exc: OSError) -> AweError:
    """One line for a failed write: what, where and how to fix it."""
    import errno

    reason = exc.strerror or str(exc)
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        reason = f"{blocker} is a file, not a directory"
    fix = ("free some space and run again" if exc.errno == errno.ENOSPC
           else "check the path and its permissions, or choose another location")
    return AweError(f"cannot write {path}: {reason} ({fix})")


def file_mode(directory: bool = False) -> int:
    """The mode a new file (directory) gets under the process's umask: 0644 (0755) under umask
    022."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


class AtomicFile:
    """A temporary file next to ``path`` (``.<name>.<random>.tmp``): :meth:`commit` flushes it
    to disk, gives it the umask's mode (mkstemp's 0600, or that of a writer that recreates the
    file, would outlive the rename) and renames it over ``path``; :meth:`discard` removes it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                       dir=self.path.parent)
        except OSError as exc:
            raise cannot_write(self.path, exc) from exc
        os.close(fd)
        self.tmp = Path(tmp)

    def commit(self) -> None:
        try:
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(self.tmp, file_mode())
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.discard()
            raise cannot_write(self.path, exc) from exc

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``."""
    file = AtomicFile(path)
    try:
        yield file.tmp
    except BaseException as exc:
        file.discard()
        if isinstance(exc, OSError):
            raise cannot_write(file.path, exc) from exc
        raise
    file.commit()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise AweError(f"{path}: missing file; train the model again") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AweError(f"{path}: not valid JSON ({exc}); the file is damaged, retrain") from exc


FORMAT_VERSION = 1
CONFIG = "config.json"
LABELS = "labels.json"
WSABIE_WEIGHTS = "wsabie.safetensors"
AWE_WEIGHTS = "awe.safetensors"
HISTORY = "history.csv"
AWE_HISTORY = "awe_history.csv"
METRICS = "metrics.json"


def library_versions() -> dict[str, str]:
    import faiss
    import numpy
    import pyarrow
    import torch


    return {"awe": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "pyarrow": pyarrow.__version__, "faiss": getattr(faiss, "__version__", "unknown")}


def write_tensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_tensors(path: str | os.PathLike) -> dict:
    """Load safetensors (never pickle); a missing or damaged file is a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise AweError(f"{path}: missing file; train the model again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AweError(f"{path}: damaged weights file ({exc}); train the model again") from exc


def write_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(c for c in row if c not in columns)
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join(_csv_cell(row.get(c, "")) for c in columns))
    write_text(path, "\n".join(lines) + "\n")


def _csv_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


@contextlib.contextmanager
def replaced_directory(target: str | os.PathLike) -> Iterator[Path]:
    """A new directory beside ``target`` to write into; when the block succeeds its files are
    synced and it is renamed over ``target`` (an earlier ``target`` is removed), so readers see
    the old directory or the whole new one. It gets the umask's mode (mkdtemp's 0700 would
    outlive the rename)."""
    import shutil

    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp",
                                      dir=target.parent))
        os.chmod(stage, file_mode(directory=True))
    except OSError as exc:
        raise cannot_write(target, exc) from exc
    try:
        yield stage
        for file in stage.iterdir():  # writers do not sync; the rename must not outrun them
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(stage, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise cannot_write(target, exc) from exc
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def staged(directory: str | os.PathLike) -> Iterator[Path]:
    """A hidden staging directory inside ``directory``: files written there are moved into
    ``directory`` only when the block succeeds (config.json last); on failure it is removed."""
    import shutil

    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".staging-", suffix=".tmp", dir=directory))
    except OSError as exc:
        raise cannot_write(directory, exc) from exc
    try:
        yield stage
        names = sorted((p.name for p in stage.iterdir() if not p.name.startswith(".")),
                       key=lambda n: n == CONFIG)
        for name in names:
            os.replace(stage / name, directory / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# Every fingerprint and digest in awe: SHA-256, the first 16 hex digits.
DIGEST_CHARS = 16
_FILE_CHUNK = 1 << 20


class Digest:
    """A SHA-256 fed piece by piece; :meth:`hex` is awe's short form (16 hex digits)."""

    def __init__(self):
        self._h = hashlib.sha256()

    def bytes(self, *chunks: bytes) -> Digest:
        for chunk in chunks:
            self._h.update(chunk)
        return self

    def text(self, *texts: str) -> Digest:
        return self.bytes(*(t.encode() for t in texts))

    def json(self, obj) -> Digest:
        """The object as JSON with sorted keys (what is not JSON: its ``str``)."""
        return self.text(json.dumps(obj, sort_keys=True, default=str))

    def arrays(self, *arrays: np.ndarray) -> Digest:
        """Each array's dtype, shape and bytes."""
        for a in arrays:
            a = np.ascontiguousarray(a)
            self.bytes(str((a.dtype.str, a.shape)).encode(), a.tobytes())
        return self

    def file(self, path: str | os.PathLike) -> Digest:
        """The bytes of a file; a missing one is a clear error."""
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(_FILE_CHUNK):
                    self._h.update(chunk)
        except FileNotFoundError as exc:
            raise AweError(f"{path}: missing file; train the model again") from exc
        return self

    def hex(self) -> str:
        return self._h.hexdigest()[:DIGEST_CHARS]


def tensor_digest(*arrays: np.ndarray) -> str:
    """The digest of arrays (dtype, shape and bytes of each)."""
    return Digest().arrays(*arrays).hex()


def json_digest(obj) -> str:
    """The digest of a JSON-able object (sorted keys): the fingerprint of a config section."""
    return Digest().json(obj).hex()
