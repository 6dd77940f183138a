"""Publishing a built directory (a stand-in model, synthetic data) into a cache that other processes may read
and write at the same time: the ranks of a run, and other machines on a shared filesystem.

A writer builds in a private staging directory beside the target (`staging_dir`: same filesystem, so the
publish is one rename), then `publish`es it:
- target missing: the staging directory is renamed into place (atomic: a reader sees nothing or all of it);
- target already holds a current build (another writer was first): the staging directory is dropped and the
  target left alone, so nobody deletes or replaces a build another process may be reading;
- target holds an earlier build (another spec): it is renamed aside (`.NAME.old-<time>-<id>`) and the new one
  renamed in. Old builds and abandoned staging directories are deleted only after a day.
The check and the renames run under an exclusive lock (`.NAME.lock`, flock, also taken over NFSv4); where the
filesystem refuses locks, a lost race is still detected (the rename onto a non-empty directory fails and the
winner's build is checked), only an earlier build replaced by two writers at once is then unguarded.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

STALE_S = 24 * 3600  # abandoned staging directories and replaced builds older than this are deleted


def staging_dir(out: Path) -> Path:
    """A new private directory beside out (same filesystem) to build into."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


def publish(staged: Path, out: Path, is_current: Callable[[Path], bool]) -> Path:
    """Make the finished build `staged` visible at `out` atomically; returns out.

    is_current(path): path holds a complete build of what `staged` holds (its spec marker matches).
    """
    with _locked(out):
        if is_current(out):  # another writer published the same build first: keep theirs
            shutil.rmtree(staged, ignore_errors=True)
            return out
        with contextlib.suppress(OSError):
            out.rmdir()  # an empty directory (nobody reads it); fails on anything else
        if out.exists() or out.is_symlink():  # an earlier build: moved aside, not deleted under a reader
            out.rename(out.parent / f".{out.name}.old-{int(time.time())}-{uuid.uuid4().hex[:8]}")
        try:
            staged.rename(out)
        except OSError:  # no lock here, and another writer's rename came first
            if not is_current(out):
                raise
            shutil.rmtree(staged, ignore_errors=True)
        _prune(out)
    return out


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive lock on out's lock file for the duration (none where the filesystem has no locks)."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            locked = True
        except OSError:  # e.g. ENOLCK: a filesystem mounted without locks
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


def _prune(out: Path) -> None:
    """Delete out's builds replaced more than STALE_S ago (the time is in the name: a rename keeps the mtime)
    and staging directories untouched for as long (an abandoned build)."""
    now = time.time()
    for path in out.parent.glob(f".{out.name}.old-*"):
        replaced = path.name.removeprefix(f".{out.name}.old-").split("-")[0]
        if replaced.isdigit() and now - int(replaced) > STALE_S:
            shutil.rmtree(path, ignore_errors=True)
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > STALE_S:
                shutil.rmtree(path, ignore_errors=True)
