"""Atomic file writes: a reader (or a job killed mid-write) never sees a half-written file.

Files get the permissions any new file would get under the process's umask (a temporary file starts at
0600), so a team sharing a cluster filesystem can read each other's results, students and teachers.
"""
import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # no space, read-only, quota: said with the file it was writing
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _torch_bytes(obj: Any) -> memoryview:
    """What torch.save writes, in memory: a full disk then fails in a plain write, with its errno, not deep
    inside torch's zip writer ("unexpected pos ...")."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer()


def save_torch(obj: Any, path: Path) -> None:
    payload = _torch_bytes(obj)
    _atomic_write(path, lambda f: f.write(payload))


_UNWRITABLE_SAID: set[str] = set()


def cache_unwritable(kind: str, path: Path, err: OSError) -> None:
    """An optional cache that cannot be written (no space, read-only, permissions, quota) costs no run: say it
    once per process and kind, and go on without writing."""
    if kind not in _UNWRITABLE_SAID:
        _UNWRITABLE_SAID.add(kind)
        log.warning("%s: cannot write %s (%s); going on without writing it", kind, path, err)


CHECKSUM_HEADER = b"kd-sha256 "  # a checked file: this, the sha256 of the rest in hex, a newline, then the rest:
                                 # what torch.save wrote


class CorruptFile(ValueError):
    """A kept file whose content does not match the checksum written with it (or that has none)."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = Path(path), why


class Unchecked(CorruptFile):
    """A file with no checksum header: written before checksums, or not by this harness."""


def save_checked(obj: Any, path: Path) -> None:
    """torch.save with the sha256 of what it wrote, in one atomic file, for `load_checked` to verify."""
    payload = _torch_bytes(obj)
    header = CHECKSUM_HEADER + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    _atomic_write(path, lambda f: (f.write(header), f.write(payload)))


def load_checked(path: Path, map_location=None, weights_only: bool = True) -> Any:
    """What `save_checked` wrote, after checking its sha256; CorruptFile if the content changed or has no checksum
    (a file from before checksums, or not from this harness)."""
    data = memoryview(Path(path).read_bytes())
    end = bytes(data[:100]).find(b"\n")
    header = bytes(data[:end])
    if end < 0 or not header.startswith(CHECKSUM_HEADER):
        raise Unchecked(path, "it has no checksum (written before checksums, or not by this harness)")
    expected, payload = header[len(CHECKSUM_HEADER):].decode(errors="replace"), data[end + 1:]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise CorruptFile(path, f"its content's sha256 is {actual[:16]}..., not the {expected[:16]}... written with it")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=weights_only)
    except Exception as err:  # whole, but not what this harness wrote
        raise CorruptFile(path, f"unreadable ({err})") from None


def load_kept(path: Path, then: str, map_location=None) -> Any | None:
    """A kept file that can be made again (a cache entry, predictions): what `save_checked` wrote, or None when it
    is missing or damaged; a damaged one is set aside, saying that the caller will do `then` instead."""
    try:
        return load_checked(path, map_location=map_location)
    except FileNotFoundError:
        return None
    except CorruptFile as err:
        set_aside(err, then)
        return None


def set_aside(error: CorruptFile, then: str) -> Path:
    """Move a corrupt file to `<name>.corrupt` (kept for inspection, never read again) and say so in one line."""
    aside = error.path.with_name(error.path.name + ".corrupt")
    try:
        os.replace(error.path, aside)
        moved = f"moved it to {aside.name}"
    except FileNotFoundError:  # another job moved it first
        moved = "another job moved it aside"
    except OSError as err:  # a read-only folder: leave it, it is never trusted anyway
        moved = f"could not move it aside ({err.strerror})"
    log.warning("%s: %s; %s and %s", error.path, error.why, moved, then)
    return aside


CONTENT_SHA256 = "content_sha256"  # the key of a checked JSON record's checksum


def _json_sha256(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def save_json_checked(record: dict, path: Path) -> None:
    """A JSON record with the sha256 of its content as one more key, for `load_json_checked` to verify."""
    save_json({**record, CONTENT_SHA256: _json_sha256(record)}, path)


def load_json_checked(path: Path) -> tuple[dict, bool]:
    """A record `save_json_checked` wrote, checked: (record, True); one without the checksum key: (record, False);
    CorruptFile if its content changed or it is not JSON."""
    try:
        record = load_json(path)
    except ValueError as err:
        raise CorruptFile(path, f"it is not JSON ({err})") from None
    if not isinstance(record, dict) or CONTENT_SHA256 not in record:
        return record, False
    expected = record.pop(CONTENT_SHA256)
    if _json_sha256(record) != expected:
        raise CorruptFile(path, f"its content's sha256 is not the {str(expected)[:16]}... written with it")
    return record, True


def save_json(obj: Any, path: Path) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def exclusive(lock_path: str | Path, waiting_message: str):
    """Hold a file lock shared with other processes; say `waiting_message` when another one holds it first."""
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("%s", waiting_message)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensors_sha256(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def flatten(mapping: dict, separator: str, prefix: str = "") -> dict:
    """Nested dicts as one level, keys joined with `separator`: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, separator, f"{prefix}{key}{separator}"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
