"""Temporary folders that a killed run leaves behind, and the next run clears.

ecoquant builds every output in a hidden sibling (``.OUT.partial-XXXX``) and
renames it into place when it is whole. Ctrl-C, SIGTERM and SIGHUP remove that
folder on the way out (:mod:`ecoquant.signals`), but SIGKILL, a power cut or
an out-of-memory kill cannot. So each such folder records who owns it (pid
and host, in :data:`OWNER_FILE`), and a later run that writes the same output
removes the ones whose owner is no longer alive on this host. A folder held
by a live process (a second run writing the same output) is left alone, and
so is one owned from another host (a shared disk), whose liveness cannot be told.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

OWNER_FILE = ".ecoquant-owner"
#: A folder with no owner file yet is one being created this instant, or one an older
#: ecoquant left; after this many seconds it is the latter.
UNOWNED_GRACE_S = 60.0


def owned_tempdir(parent: Path, prefix: str) -> Path:
    """A fresh folder ``parent/prefix*`` marked with this process as its owner, stale ones of the same prefix removed."""
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale(parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    (tmp / OWNER_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")
    return tmp


def disown(tmp: Path) -> None:
    """Drop the owner mark before ``tmp`` is renamed into the output (the mark is not part of it)."""
    (tmp / OWNER_FILE).unlink(missing_ok=True)


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove folders ``parent/prefix*`` whose owner process is gone; return them."""
    removed = []
    for path in sorted(parent.glob(f"{prefix}*")):
        if path.is_dir() and not path.is_symlink() and _is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _is_stale(path: Path) -> bool:
    try:
        pid_text, host = (path / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except FileNotFoundError:
        try:
            return time.time() - path.stat().st_mtime > UNOWNED_GRACE_S
        except FileNotFoundError:
            return False  # its owner finished and renamed it meanwhile
    except (OSError, ValueError):
        return False  # unreadable: not ours to judge
    return host == socket.gethostname() and not pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: signalled is enough
    return state != "Z"
