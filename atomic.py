"""Atomic file writes: a reader never sees a half-written checkpoint, result or picture, and a failed write (full
disk, read-only folder, a folder where the file should be) is one line naming the path and the cause."""
from __future__ import annotations

import glob
import json
import math
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

from config import UserError

_HOST = socket.gethostname().replace(".", "_")


class WriteError(UserError):
    """A file could not be written (full disk, read-only or missing folder): a problem of the target, not of the
    data or model being written, so commands stop at once instead of going on to the next category."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    An interruption or error leaves ``path`` as it was (absent or the previous version); an OSError (no space, no
    permission, read-only file system, ``path`` a folder) is a UserError naming ``path``. The temporary file's
    name carries this host and process: temporaries of ``path`` left by a killed process on this host are
    removed first.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "it is a folder")
        remove_stale_temporaries(path)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> the permissions a plain open() would give
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        cause = os_error_in(err)
        if cause is None:
            raise
        raise WriteError(f"cannot write '{path}' ({cause.strerror or cause}): {_remedy(cause)}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


def os_error_in(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: itself, or one it was raised from or while handling (torch.save, for one, turns
    a full disk into a RuntimeError); None when there is none."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _remedy(err: OSError) -> str:
    if err.errno == 28:  # ENOSPC
        return "free some space there or choose another folder; nothing was changed"
    return "choose a writable file path; nothing was changed"


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of ``path`` that processes of this host left when they were killed."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{_HOST}-*.tmp"):
        pid = stale.name[len(f".{path.name}.{_HOST}-"):].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically as UTF-8; a file name that is not valid UTF-8 keeps its exact bytes."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> Path:
    """Write ``value`` as JSON atomically: strictly valid JSON, a float that is not finite becomes null."""
    return atomic_write_text(path, json.dumps(finite_or_none(value), indent=2, allow_nan=False) + "\n")


def finite_or_none(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite (numpy's included) replaced by None, recursively."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
        return finite_or_none(value.item())
    return value


def check_writable_folder(folder: str | os.PathLike, what: str) -> Path:
    """``folder`` once files can be written there: it exists as a folder that takes a new file, or it does not exist
    and its nearest existing parent folder does (nothing is created); UserError naming it otherwise. Called before
    long work, so that an unwritable target fails at once, not after it."""
    folder = Path(folder)
    existing = folder
    try:
        while not existing.exists():
            if existing.is_symlink():  # a dangling link
                raise FileNotFoundError(2, f"'{existing}' is a link to nothing")
            existing = existing.parent.absolute() if existing == existing.parent else existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(20, f"'{existing}' is a file")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise WriteError(f"cannot write {what} into '{folder}' ({err.strerror or err}): choose a writable folder"
                         ) from None
    return folder
