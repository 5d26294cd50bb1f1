"""Writes that survive a crash or a lost node: atomic replacement, fsync of files and folders."""
from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Makes a rename or a new file in `path` durable; a no-op where the file system cannot
    (CIFS, 9p and others refuse fsync on a directory: their renames are synchronous anyway)."""
    try:
        fsync(path)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise


def atomic_write(path: Path, text: str, only_if_absent: bool = False) -> bool:
    """Writes `text` to `path` whole or not at all. With `only_if_absent`, the first of several
    writers wins: returns False, writing nothing, when `path` exists (a hard link, which no
    other writer can replace, where the file system has them)."""
    # Its own temporary name per writer: ranks on several nodes write state.json at once, and
    # containers give their processes the same pids.
    tmp = path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if only_if_absent:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # no hard links here: check, then rename (a narrow race, no torn file)
                if path.exists():
                    return False
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:  # after a link, or a write that failed (a full disk): no temporary file stays behind
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)  # the rename itself
    return True


def flush_to_storage(directory: Path) -> None:
    """fsync every file under `directory` and the directories themselves.

    torch.save leaves its bytes in the page cache; a node that loses power after complete.json
    names a checkpoint could otherwise come back with that file present and the data files
    short or empty. An fsync flushes what this node wrote to a file, whichever process wrote
    it, so one process per node is enough."""
    directory = Path(directory)
    paths = sorted(directory.rglob("*"))
    for path in paths:
        if path.is_file():
            fsync(path)
    for path in [directory, *(p for p in paths if p.is_dir())]:
        fsync_directory(path)


def unused_path(path: Path, suffix: str = "") -> Path:
    """`path` + `suffix`, or `path.2` + `suffix`, `path.3` + `suffix`, ... whichever does not
    exist yet: what is set or kept aside never replaces what was set aside before."""
    candidate, n = path.with_name(path.name + suffix), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}{suffix}")
    return candidate
