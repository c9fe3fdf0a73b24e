"""An exclusive lock on an output directory for the life of the run writing it.

Two runs into one directory would mix their files (one run's layers.csv beside the
other's run.json) and a finishing run would delete the other's snapshots. The
lock is ``flock`` on ``DIR/.embgeom.lock``, which holds the holder's pid, host,
start time and command, so a refused run can name it. The kernel drops a flock
when its process dies, however it dies, so the lock of a killed run is taken
over at once. Where the file system refuses flock (some network file systems),
the file alone is the lock: a holder on this host whose pid is gone is taken
over; one on another host is trusted until the file is removed.

Within one process the lock is re-entrant: the command line holds OUT for the
whole run, and saving the tables into OUT takes the same lock again. Under
torchrun only rank 0 writes run directories, so only rank 0 takes their locks.
"""
from __future__ import annotations

import errno
import functools
import inspect
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import EmbgeomError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the file alone is the lock
    fcntl = None

LOCK_FILE = ".embgeom.lock"
_HELD: dict = {}  # resolved directory -> [file descriptor, depth, pid]


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]}


def _read_holder(path: Path) -> dict:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info.get("pid"):
        return "another process"
    text = f"pid {info['pid']} on {info.get('host', '?')}"
    if info.get("started"):
        text += f", since {info['started']}"
    return text + (f": {info['command']}" if info.get("command") else "")


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # someone else's process, or an unreadable pid: assume it holds
    return True


def _refusal(directory: Path, what: str, info: dict) -> EmbgeomError:
    return EmbgeomError(f"{what} {directory} is in use by another embgeom run ({_describe(info)}); wait for it "
                        f"to finish, or choose another {what}")


def _prepare(directory: Path, what: str) -> None:
    if directory.exists() and not directory.is_dir():
        raise EmbgeomError(f"{what} {directory} is a file; name a directory (it is created if missing)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EmbgeomError(f"cannot write to output directory {directory} ({exc.strerror}); "
                           f"choose another {what}") from None


def acquire(directory, what: str = "--out") -> Path:
    """Lock `directory` (created if missing) for this process, or raise EmbgeomError
    naming the run that holds it. Pair with `release`."""
    directory = Path(directory)
    _prepare(directory, what)
    if os.environ.get("RANK", "0") != "0":
        return directory
    key = str(directory.resolve())
    held = _HELD.get(key)
    if held is not None and held[2] == os.getpid():
        held[1] += 1
        return directory
    path = directory / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise EmbgeomError(f"cannot write to output directory {directory} ({exc.strerror}); "
                           f"choose another {what}") from None
    try:
        if fcntl is None:
            raise OSError(errno.ENOLCK, "no flock on this system")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise _refusal(directory, what, _read_holder(path)) from None
        # No flock here: the file's holder decides.
        info = _read_holder(path)
        mine = info.get("host") == socket.gethostname()
        if info.get("pid") and info.get("pid") != os.getpid() and (not mine or _alive(info["pid"])):
            os.close(fd)
            raise _refusal(directory, what, info) from None
    data = (json.dumps(_holder()) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    _HELD[key] = [fd, 1, os.getpid()]
    return directory


def release(directory) -> None:
    """Undo one `acquire` of `directory` by this process; the last one unlocks."""
    key = str(Path(directory).resolve())
    held = _HELD.get(key)
    if held is None or held[2] != os.getpid():
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[key]
    try:
        os.ftruncate(held[0], 0)  # no holder named (the file stays: removing it would race)
        if fcntl is not None:
            fcntl.flock(held[0], fcntl.LOCK_UN)
    except OSError:
        pass
    os.close(held[0])


@contextmanager
def locked(directory, what: str = "--out", enabled: bool = True):
    """`acquire` for the duration of a with-block (nothing if not `enabled`)."""
    if not enabled:
        yield Path(directory)
        return
    path = acquire(directory, what)
    try:
        yield path
    finally:
        release(path)


def holding(param: str, what: str):
    """Decorator: the function runs with the directory passed as `param` locked
    (unlocked when it returns or raises; nothing when that argument is None)."""
    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            directory = sig.bind(*args, **kwargs).arguments.get(param)
            if directory is None:
                return fn(*args, **kwargs)
            with locked(directory, what):
                return fn(*args, **kwargs)
        return inner
    return wrap
