"""Named shared-memory segments that outlive the process that made them.

A prefill engine writes a request's KV into a segment, and the worker's KV store leases it out
until a decode worker has taken it; on the same host the decode worker takes it by linking a name
of its own to the same memory, so nothing is copied and the lease can end at once.
`multiprocessing.shared_memory` would unlink a segment when its creator exits, so this uses the
POSIX shm directory directly. Names carry the creating process id so `sweep` can remove what a
crashed process left behind.

Segments live in /dev/shm unless `DYNAMO_GRPC_SHM_DIR` names another tmpfs, the same for every process of
a host. One mounted with `huge=always` backs segments with 2 MiB pages: writing a segment and freeing it
cost a page fault and a page free per 4 KiB otherwise, and bench/kv_transfer.py measures saves 2-3x and
loads ~2x faster there.
"""

from __future__ import annotations

import logging
import mmap
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path(os.environ.get("DYNAMO_GRPC_SHM_DIR") or "/dev/shm")
SEGMENT_PREFIX = "dynamo-grpc-kv-"
"""Every KV segment's name starts so, then the creating process id (see `new_segment_name`)."""
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def new_segment_name() -> str:
    """A fresh KV segment name that carries this process's id, so `sweep` can remove it if the process dies."""
    return f"{SEGMENT_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"


def _path(name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad shared-memory segment name {name!r}")
    return SHM_DIR / name


def create(name: str, size: int, *, populate: bool = False, shared: bool = False) -> mmap.mmap:
    """A new zero-filled, writable segment; fails if the name is taken, unless `shared` (see `create_file`).
    `populate` maps every page up front: one call instead of a fault per page when the whole segment is
    about to be written."""
    fd = create_file(name, size, shared=shared)
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | (_POPULATE if populate else 0))
    except BaseException:
        os.unlink(_path(name))
        raise
    finally:
        os.close(fd)


def create_file(name: str, size: int, *, shared: bool = False) -> int:
    """A new zero-filled segment, open for writing (`os.pwrite`: the kernel copies, nothing faults here);
    the caller closes the descriptor. A `shared` segment is written by several processes (one tensor-parallel
    rank each, disjoint ranges): whichever comes first creates it, the others open it."""
    exclusive = 0 if shared else os.O_EXCL
    fd = os.open(_path(name), os.O_CREAT | exclusive | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        os.unlink(_path(name))
        raise
    return fd


def attach(name: str) -> mmap.mmap:
    """An existing segment, read-only, its pages mapped up front (one fault per page costs more than the copy)."""
    fd = os.open(_path(name), os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


def link(name: str, new_name: str) -> None:
    """A second name for a segment: its memory lives until both names are unlinked and unmapped."""
    os.link(_path(name), _path(new_name))


def size_of(name: str) -> int | None:
    """The segment's size in bytes, or None when it does not exist."""
    try:
        return _path(name).stat().st_size
    except FileNotFoundError:
        return None


def unlink(name: str) -> bool:
    """Remove the name (mappings stay valid until closed); False when it was already gone."""
    try:
        os.unlink(_path(name))
    except FileNotFoundError:
        return False
    return True


_releaser: ThreadPoolExecutor | None = None


def release_soon(name: str = "", mapping: mmap.mmap | None = None) -> None:
    """Unlink `name` and close `mapping` on a thread of their own. Dropping a segment's last name or mapping
    frees its pages, ~20 ms per 64 MiB of 4 KiB pages here: an event loop serving other requests' tokens
    should not wait for that."""
    global _releaser
    if _releaser is None:
        _releaser = ThreadPoolExecutor(1, thread_name_prefix="shm-release")
    _releaser.submit(_release, name, mapping)


def wait_released() -> None:
    """Return once every release handed to `release_soon` so far has run (before exit, and in tests)."""
    if _releaser is not None:
        _releaser.submit(lambda: None).result()


def _release(name: str, mapping: mmap.mmap | None) -> None:
    try:
        if name:
            unlink(name)
        if mapping is not None:
            mapping.close()
    except (OSError, ValueError, BufferError) as error:
        log.warning("releasing shared-memory segment %s failed: %s", name or "(mapping)", error)


def owner_pid(name: str, prefix: str) -> int | None:
    """The creating process id encoded in `{prefix}{pid}-…` names."""
    pid, _, _ = name[len(prefix):].partition("-")
    return int(pid) if name.startswith(prefix) and pid.isdigit() else None


def sweep(prefix: str = SEGMENT_PREFIX) -> int:
    """Unlink segments named `{prefix}{pid}-…` whose creating process is gone; returns how many."""
    removed = 0
    for path in SHM_DIR.glob(f"{prefix}*"):
        pid = owner_pid(path.name, prefix)
        if pid is not None and not process_alive(pid):
            removed += unlink(path.name)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
