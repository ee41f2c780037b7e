"""One training process per run directory: an exclusive lock on RUN/.lock for the life of the run.

The lock is an OS file lock (fcntl.flock), so the kernel releases it when its process dies, even by
SIGKILL: the .lock file a dead run leaves behind never blocks a new one. The file records the holder's
pid, host and start time, which a second `eflow train` on the same directory reports; it stays after
the run (the flock, not the file, is the lock). On a filesystem without flock support the recorded pid
is checked instead (same host only).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from eflow.errors import EflowError
from eflow.run_dir import LOCK

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None


def _holder(path: Path) -> str:
    """Who holds the lock, from the lock file, as words."""
    try:
        info = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["time"]))
        return f"pid {info['pid']} on {info['host']} (since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _recorded_holder_alive(path: Path) -> bool | None:
    """Whether the pid recorded in the lock file runs on this host (None: unknown, another host)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return None if isinstance(info, dict) and "host" in info else False
    try:
        os.kill(int(info["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return False
    except PermissionError:
        return True
    return int(info["pid"]) != os.getpid()


class RunLock:
    """Context manager: hold RUN/.lock or fail at once, naming the holder."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            elif _recorded_holder_alive(self.path):
                raise BlockingIOError
        except OSError as err:  # held (BlockingIOError), or no flock here: then trust a dead recorded pid
            held = isinstance(err, BlockingIOError) or _recorded_holder_alive(self.path) is not False
            if held:
                os.close(fd)
                raise EflowError(
                    f"{self.path.parent} is in use by another eflow train ({_holder(self.path)}); wait for "
                    "it, stop it, or choose another --out"
                ) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock; the file stays (unlinking it would race)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
