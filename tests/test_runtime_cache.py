"""TensorRT-RTX's runtime cache file: saved from several threads without a torn or stray file, refused caches
rebuilt, and the exit hook never keeping a session alive. TensorRT-RTX runs no engine here (it refuses the only
GPU this project has), so the IRuntimeCache is stood in by `Blob`, which keeps the same three calls; the file
handling under test is the real one."""

from __future__ import annotations

import gc
import logging
import threading

from zimage_trt.runtime import runtime_cache
from zimage_trt.runtime.runtime_cache import RuntimeCacheFile


class Blob:
    """serialize/deserialize/reset as IRuntimeCache has them; `accepts` decides what deserialize takes."""

    def __init__(self, data: bytes = b"", accepts=lambda data: data.startswith(b"RTX")):
        self.data, self.accepts, self.resets = data, accepts, 0

    def serialize(self):
        return memoryview(self.data)

    def deserialize(self, data: bytes) -> bool:
        if not self.accepts(data):
            return False
        self.data = bytes(data)
        return True

    def reset(self):
        self.data, self.resets = b"", self.resets + 1


def test_concurrent_saves_leave_one_whole_file_and_no_temporaries(tmp_path):
    path = tmp_path / "transformer.engine.runtime_cache"
    writers = [RuntimeCacheFile(path, Blob(b"RTX" + bytes([i]) * 200_000)) for i in range(2)]
    threads = [threading.Thread(target=lambda w=w: [w.save() for _ in range(40)]) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in {w.cache.data for w in writers}  # one writer's whole payload, never a mix
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # every temporary was renamed or removed


def test_a_refused_cache_is_logged_once_and_rebuilt(tmp_path, caplog):
    path = tmp_path / "te.engine.runtime_cache"
    path.write_bytes(b"written by another GPU")
    cache = RuntimeCacheFile(path, Blob())
    with caplog.at_level(logging.WARNING, logger="zimage_trt"):
        assert cache.load() is False
    assert cache.cache.resets == 1 and len(caplog.records) == 1 and "was refused" in caplog.text
    cache.cache.data = b"RTX kernels for this GPU"
    cache.save()  # the next save replaces the foreign file
    assert path.read_bytes() == b"RTX kernels for this GPU"
    fresh = RuntimeCacheFile(path, Blob())
    assert fresh.load() is True and fresh.cache.data == b"RTX kernels for this GPU"


def test_the_exit_hook_holds_caches_weakly_and_reports_a_failed_write(tmp_path, caplog):
    kept = RuntimeCacheFile(tmp_path / "kept.runtime_cache", Blob(b"RTX kept"))
    dropped = RuntimeCacheFile(tmp_path / "dropped.runtime_cache", Blob(b"RTX dropped"))
    broken = RuntimeCacheFile(tmp_path / "no-such-folder" / "x.runtime_cache", Blob(b"RTX"))
    for c in (kept, dropped, broken):
        runtime_cache.save_at_exit(c)
    del dropped
    gc.collect()
    with caplog.at_level(logging.WARNING, logger="zimage_trt"):
        runtime_cache.save_all()  # what atexit runs
    assert (tmp_path / "kept.runtime_cache").read_bytes() == b"RTX kept"
    assert not (tmp_path / "dropped.runtime_cache").exists()  # a collected session is not saved, nor kept alive
    assert "runtime cache not saved" in caplog.text and "no-such-folder" in caplog.text and "Traceback" not in caplog.text
    runtime_cache.forget(kept)
    runtime_cache.forget(broken)
