"""One run per folder: ``megadmd train`` holds an exclusive lock on its output_dir.

The lock is ``fcntl.flock`` on ``<output_dir>/.megadmd.lock``, taken by rank 0 only (so one lock
per run, whatever the number of ranks and nodes) and held until the run ends. The file holds the
holder's host, pid and start time, for the message a second run gets. The kernel drops a flock
when its process dies, so a run killed with ``kill -9`` (or a node that went down, on filesystems
whose server notices) leaves no lock behind: the next run takes the lock and, finding the dead
holder's line still in the file, says that it takes over a stale lock. The file is never deleted
(deleting a lock file lets two processes lock two different files of the same name); a run that
ends normally empties it.

Filesystems without flock support (some Lustre mounts without ``-o flock``) get a warning and no
lock: the run goes on, as it would have before this lock existed.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("megadmd")


class RunLock:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> Optional[str]:
        """Take the lock: None when held now, else the line naming the holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "another process (it has not written its name yet)"
            os.close(fd)
            return holder
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            log.warning("cannot lock %s (%s): this filesystem has no flock, so nothing stops a second run "
                        "in the same folder", self.path, exc.strerror)
        previous = _read(fd)
        if previous:
            log.warning("taking over the lock of a run that is no longer running (%s)", previous)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        line = f"host {socket.gethostname()}, pid {os.getpid()}, started {started}, command {' '.join(sys.argv)}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, (line + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return None

    def release(self) -> None:
        """Empty the file (the run ended normally) and drop the lock."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass  # a full or read-only disk at exit must not hide the run's own outcome
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
