"""One writer per feature store at a time, across processes.

An advisory `flock` on `<store>.lock` beside the store: the kernel drops it when its holder dies, even
by SIGKILL, so a crashed extraction never leaves a stale lock that needs cleaning by hand. A second
`pathseg extract` on the same store waits, then finds the first one's work done and computes only what
is still missing.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pathseg.errors import PathsegError


def lock_path_for(store_path: Path) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".lock")


def _holder(handle) -> str:
    handle.seek(0)
    text = handle.read().strip()
    return f"pid {text}" if text else "another process"


@contextmanager
def store_lock(store_path: Path, *, wait: bool = True, on_wait=None, timeout: float | None = None) -> Iterator[None]:
    """Hold the store's write lock for the block; `on_wait(message)` is told once if another holds it."""
    path = lock_path_for(store_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = open(path, "a+")  # noqa: SIM115 - held for the whole block, closed in finally
    except OSError as error:
        raise PathsegError(
            f"cannot create the lock file {path} ({error.strerror}); check the cache directory"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            if not wait:
                raise PathsegError(f"{store_path} is being written by {holder}; wait for it to finish") from None
            if on_wait is not None:
                on_wait(f"{store_path} is being written by {holder}; waiting for it to finish")
            started = time.monotonic()
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if timeout is not None and time.monotonic() - started > timeout:
                        raise PathsegError(
                            f"{store_path} is still being written by {holder} after {timeout:.0f} s; try again later"
                        ) from None
                    time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()
