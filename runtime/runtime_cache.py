"""TensorRT-RTX's runtime cache and the file it lives in beside its engine (NAME.engine.runtime_cache).

TensorRT-RTX compiles kernels for the GPU it runs on at first use and keeps them in an `IRuntimeCache`; saved to
disk, the next process starts warm. The file is read once when the session opens (a cache from another GPU,
driver or library version is refused by `deserialize`: logged once, the cache starts empty and the next save
replaces the file), and written when a new shape's kernels were compiled, when the session closes and at exit.
A save that fails is a warning line: the cache only saves compile time.

Saving is safe from several threads (the server's worker and the exit hook): one lock per file, and each write goes
through a temporary file of its own that is renamed into place. The exit hook holds the caches weakly, so it never
keeps an engine alive; a closed or collected session simply drops out.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from pathlib import Path

from zimage_trt.common.files import os_error_line, write_atomic

log = logging.getLogger("zimage_trt")


class RuntimeCacheFile:
    def __init__(self, path: Path, cache):
        """cache: the IRuntimeCache (deserialize(bytes) -> bool, serialize() -> buffer, reset())."""
        self.path, self.cache = Path(path), cache
        self.lock = threading.Lock()

    def load(self) -> bool:
        """Read the file into the cache; False (and an empty cache) if there is none or it was refused."""
        if not self.path.is_file():
            return False
        if self.cache.deserialize(self.path.read_bytes()):
            return True
        log.warning("runtime cache %s was refused (another GPU, driver or version); it is rebuilt", self.path)
        self.cache.reset()
        return False

    def save(self) -> bool:
        """Write the cache; a write that fails (full disk, read-only folder) is one warning line, never an error:
        the cache only saves compile time, and a request or an exit must not fail for it."""
        with self.lock:
            try:
                write_atomic(self.path, bytes(memoryview(self.cache.serialize())))
                return True
            except OSError as exc:
                log.warning("runtime cache not saved (the next start compiles its kernels again): %s",
                            os_error_line(exc, self.path, "free space there"))
                return False


_SAVED_AT_EXIT: "weakref.WeakSet[RuntimeCacheFile]" = weakref.WeakSet()


def save_at_exit(cache_file: RuntimeCacheFile) -> None:
    _SAVED_AT_EXIT.add(cache_file)


def forget(cache_file: RuntimeCacheFile) -> None:
    _SAVED_AT_EXIT.discard(cache_file)


@atexit.register
def save_all() -> None:
    """Save every cache still open (a write that fails is one warning line, never a traceback at exit)."""
    for cache_file in list(_SAVED_AT_EXIT):
        cache_file.save()
