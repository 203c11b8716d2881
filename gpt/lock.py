"""One trainer per run folder: `RunLock(OUT)` holds an exclusive lock on `OUT/.lock` for as long
as a training runs, so a second `python -m gpt.train --out-dir OUT` stops at once with
"OUT is in use by pid N" instead of interleaving checkpoints and metrics with the first.

The lock is the operating system's (flock on POSIX, msvcrt.locking on Windows), held on an open
file: it goes away with the process that holds it, however that process ends (kill -9
included). A lock file left behind by a dead trainer is therefore no lock at all; the next
trainer takes it over and writes its own pid into it. Readers (gpt.sample, load_model) take no
lock: a save swaps whole folders, and load_checkpoint retries when one is swapped under it.
"""

from __future__ import annotations

import os

from .errors import UserError

LOCK_FILE = ".lock"

try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True


class RunInUseError(UserError):
    """Another live process holds the run folder's lock (the message names its pid)."""


class RunLock:
    """Exclusive lock on a run folder, as a context manager.

        with RunLock("out"):      # RunInUseError: "out is in use by pid 1234"
            train ...

    Releasing deletes the lock file (and the run folder, if the lock made it and it is still
    empty), so a run that stopped on bad input leaves the folder as it found it."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_FILE)
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self):
        self._made_dir = not os.path.isdir(self.out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        for _ in range(100):  # a holder may delete the file between our open and our lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
            if not _try_lock(fd):
                try:
                    text = os.read(fd, 32).decode("ascii", "replace")
                    owner = text.split("\n", 1)[0].strip() or "unknown"  # the pid's line
                finally:
                    os.close(fd)
                self._remove_made_dir()
                raise RunInUseError(f"{self.out_dir} is in use by pid {owner} (another "
                                    "training writes there); wait for it to finish, stop it, "
                                    "or choose another run folder")
            if _same_file(fd, self.path):
                break
            os.close(fd)  # we locked a file its holder had just deleted: try the new one
        else:  # pragma: no cover - a lock file that keeps being replaced
            raise RunInUseError(f"{self.out_dir} is in use (its lock file keeps changing)")
        # A dead trainer's pid may still be there, and may be longer than ours: empty the file
        # before writing, or "27570\n" over "2757013999\n" leaves "27570\n3999\n".
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)  # while still holding it, so no one locks a dead file
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
            self._remove_made_dir()

    def _remove_made_dir(self) -> None:
        if self._made_dir:
            try:
                os.rmdir(self.out_dir)  # only if empty
            except OSError:
                pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _same_file(fd: int, path: str) -> bool:
    """Is the open file `fd` still the file at `path` (not deleted or replaced)?"""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
