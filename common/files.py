"""How zimage-trt writes files, so that a kill, a full disk or a second run at once leaves nothing behind.

Everything is written under a temporary name beside its target and renamed into place at the end:

    .NAME.partial-PID        a bundle folder being exported
    .NAME.tmp-PID[-HEX]      a file being written: engine, sidecar, timing or runtime cache, PNG
    .NAME.old-PID            a bundle being replaced by --force, removed once the new one is in place
    .NAME.lock               held by the export or build that writes NAME (its PID inside)

A run that is killed leaves its temporary names; the next run of the same command on the same target removes
those whose PID is no longer alive (`remove_debris`), and takes over a lock whose holder is gone (`TargetLock`).
Before writing, `check_space` compares an estimate with the free space. An OSError while writing becomes one line
(`os_error_line`): which file, why, and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path

from zimage_trt.common.errors import UserError

_DEBRIS = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?$")
SPACE_MARGIN = 1.05  # estimates are of the weights; graphs, headers and sidecars add a little
SPACE_SLACK = 32 << 20


def temp_path(target: Path, kind: str = "tmp", suffix: str = "") -> Path:
    """The temporary name of `target` for this process (`suffix`: to tell several writers of one process apart)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}{'-' + suffix if suffix else ''}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file of this call's own (two threads of a process may write
    the same path, e.g. the server's worker and the exit hook saving a runtime cache), removed if writing fails.
    Temporary files of `path` that a killed process left are removed first."""
    path = Path(path)
    remove_debris(path.parent, {path.name})
    tmp = temp_path(path, suffix=secrets.token_hex(4))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_debris(folder: Path, names=None) -> list[Path]:
    """Remove the temporary files and folders that killed runs left in `folder` (only those of the target names
    in `names`, or all of them when None). Entries of a live process, this one included, are left alone."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        m = _DEBRIS.match(entry.name)
        if not m or (names is not None and m["name"] not in names):
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def free_bytes(folder: Path) -> int:
    """Free bytes for an unprivileged writer on the file system that holds `folder` (or would hold it)."""
    p = Path(folder).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def gb(n: float) -> str:
    """Bytes for a message: MB below a GB, GB above."""
    if n < 1e9:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.2f} GB" if n < 10e9 else f"{n / 1e9:.1f} GB"


def check_space(folder: Path, need: int, what: str, fix: str) -> None:
    """Refuse, in one line, to start writing about `need` bytes into `folder` when it has less free."""
    need = int(need * SPACE_MARGIN) + SPACE_SLACK
    free = free_bytes(folder)
    if need > free:
        raise UserError(f"{what} needs about {gb(need)} in {Path(folder).absolute()} and {gb(free)} is free; {fix}")


_WHY = {
    errno.ENOSPC: ("no space left on the device", "free space there or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota or write elsewhere"),
    errno.EROFS: ("read-only file system", "write to a folder on a writable file system"),
    errno.EACCES: ("permission denied", "write to a folder you can write to"),
    errno.EPERM: ("operation not permitted", "write to a folder you can write to"),
    errno.EFBIG: ("file too large for this file system", "write to a file system that takes large files"),
}


def os_error_line(exc: OSError, path=None, fix: str | None = None) -> str:
    """One line for an OSError while writing `path` (a file or folder, named as the user knows it): which file,
    why, and what to do. The file is `path` when the error is about one of its temporary names, the error's own
    file when that is inside `path`, and an error about a file elsewhere is about reading it and says so."""
    name = exc.filename.decode(errors="replace") if isinstance(exc.filename, bytes) else exc.filename
    why, default_fix = _WHY.get(exc.errno, (exc.strerror or str(exc), "check the path and try again"))
    if path is None:  # the CLI's net: reading or writing, unknown
        return f"{name}: {why}; {default_fix}" if name else f"file error: {why}; {default_fix}"
    path = Path(path)
    where = path
    if name:
        file = Path(name).absolute()
        if not _written_by(file, path.absolute()):
            return f"could not read {name}: {why}"
        if not any(_DEBRIS.match(part) for part in file.parts):
            where = file
    detail = f"could not write {where}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        detail += f" ({gb(free_bytes(where.parent))} free there)"
    return f"{detail}: {why}; {fix or default_fix}"


def _written_by(file: Path, target: Path) -> bool:
    """Whether `file` is `target`, inside it, or inside a temporary name of it or of its folder (a bundle's
    file is written in the bundle's partial folder)."""
    for p in (file, *file.parents):
        if p == target:
            return True
        for t in (target, target.parent):
            if p.parent == t.parent and p.name.startswith(f".{t.name}."):
                return True
    return False


@contextlib.contextmanager
def writing(path, fix: str | None = None):
    """Turn an OSError raised inside into a UserError of one line about `path`."""
    try:
        yield
    except OSError as exc:
        raise UserError(os_error_line(exc, path, fix)) from None


class TargetLock:
    """`.NAME.lock` beside `target`, held while one export or build writes it.

    The lock is an flock on that file, so the kernel releases it when the holder dies, however it dies; the file
    itself holds the holder's PID for the message, and is removed by the holder at the end. A lock file left by a
    killed run is taken over. After locking, the path must still name the locked file: a holder that removed it
    just before would otherwise let two runs in."""

    def __init__(self, target: Path, command: str):
        self.target, self.command = Path(target), command
        self.path = self.target.with_name(f".{self.target.name}.lock")
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise UserError(
                    f"another {self.command} (PID {holder}) is writing {self.target}; wait for it to finish, or stop "
                    "it (its lock is released when it exits)"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file while we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        return False


def sha256_of(paths: list[Path]) -> str:
    """One SHA-256 over these files' bytes in order (a bundle's graph and its weights, a LoRA file)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()
