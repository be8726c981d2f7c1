"""Killed or out of disk: export, build and generate leave nothing behind and say so in one line.

The full disks are real: a tmpfs mounted by the test (the machine must allow mounts; CI runs as root), filled by a
second writer while the command runs, as happens when another job shares the disk. The kills are real SIGKILLs of
a `zimage-trt` process at several points of a tiny export and build.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zimage_trt.cli import main
from zimage_trt.common.errors import UserError
from zimage_trt.common.files import TargetLock, remove_debris

from .conftest import SIZE
from .test_user_errors import assert_one_line_error, run_cli

rtx = pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorrt_rtx") is None,
    reason="tensorrt-rtx is not installed (CI installs tensorrt-rtx-cu13 so this never skips there)",
)
FAST_EXPORT = ["--check", "never", "--precision", "fp32", "--width", str(SIZE), "--height", str(SIZE)]
RTX_BUILD = ["--backend", "tensorrt-rtx", "--target", "sm89"]


# ------------------------------------------------------------------------------------------ helpers
def mount_tmpfs(path: Path, size: str, *options: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}",) + options)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'mount failed'}); CI runs as root and can")
    return path


@pytest.fixture
def small_fs(tmp_path):
    """A 160 MB file system of its own (a tiny fp32 bundle needs ~70 MB, its engines ~120 MB, by the estimates)."""
    mnt = mount_tmpfs(tmp_path / "fs", "160m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Take the file system's free space down to `leave` bytes, as another writer would."""
    filler = folder / "filler"
    with open(filler, "ab") as f:
        chunk = b"\0" * (1 << 20)
        while True:
            free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
            if free <= leave:
                break
            try:
                f.write(chunk[: max(min(len(chunk), free - leave), 1)])
                f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    return filler


def fill_when(folder: Path, ready) -> threading.Thread:
    """Fill `folder`'s file system as soon as `ready()` is true (polled from a thread)."""

    def run():
        deadline = time.monotonic() + 300
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        fill(folder)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def hidden(folder: Path) -> list[str]:
    """The temporary names and locks left in a folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def start_cli(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zimage_trt.cli", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    """SIGKILL `proc` as soon as `ready()` is true; fail if it ends first."""
    deadline = time.monotonic() + 300
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------ debris and locks
def test_debris_of_dead_runs_is_removed_and_that_of_live_ones_kept(tmp_path):
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".b.partial-{dead}").mkdir()
        (tmp_path / f".b.partial-{dead}" / "transformer.onnx").write_bytes(b"x" * 100)
        (tmp_path / f".b.old-{dead}").mkdir()
        (tmp_path / f".t.engine.tmp-{dead}").write_bytes(b"x")
        (tmp_path / f".t.engine.json.tmp-{dead}-0a1b2c3d").write_bytes(b"x")
        (tmp_path / f".b.partial-{live.pid}").mkdir()  # a run in progress
        (tmp_path / f".c.partial-{dead}").mkdir()  # another target's
        (tmp_path / ".b.partial-notapid").mkdir()  # not a name of ours
        removed = remove_debris(tmp_path, {"b", "t.engine", "t.engine.json"})
        assert sorted(p.name for p in removed) == sorted(
            [f".b.partial-{dead}", f".b.old-{dead}", f".t.engine.tmp-{dead}", f".t.engine.json.tmp-{dead}-0a1b2c3d"])
        assert hidden(tmp_path) == sorted([f".b.partial-{live.pid}", f".c.partial-{dead}", ".b.partial-notapid"])
        assert [p.name for p in remove_debris(tmp_path)] == [f".c.partial-{dead}"]  # None: every target
    finally:
        live.kill()
        live.wait()


def test_a_held_lock_refuses_with_the_holders_pid_and_a_stale_one_is_taken_over(tmp_path):
    target = tmp_path / "engines"
    with TargetLock(target, "build"):
        assert (tmp_path / ".engines.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match=rf"another build \(PID {os.getpid()}\) is writing .*engines"):
            TargetLock(target, "build").__enter__()
    assert not (tmp_path / ".engines.lock").exists()  # the holder removes it
    (tmp_path / ".engines.lock").write_text(f"{dead_pid()}\n")  # left by a killed run
    with TargetLock(target, "build"):
        assert (tmp_path / ".engines.lock").read_text().strip() == str(os.getpid())
    assert not (tmp_path / ".engines.lock").exists()


def test_a_killed_export_is_cleaned_up_by_the_next_which_succeeds(capsys, tiny_model, tmp_path):
    out = tmp_path / "b"
    argv = ["export", "--model", str(tiny_model), "--out", str(out), *FAST_EXPORT]
    # 1: killed as soon as it starts writing (the partial folder exists)
    first = start_cli(*argv)
    kill_when(first, lambda: (tmp_path / f".b.partial-{first.pid}").is_dir(), "the partial folder")
    assert hidden(tmp_path) == sorted([".b.lock", f".b.partial-{first.pid}"])  # the debris of a killed export
    # 2: killed while the transformer graph is being written; while it runs, a second export is refused
    second = start_cli(*argv)
    partial = tmp_path / f".b.partial-{second.pid}"

    refused = []

    def writing_transformer():
        lock = tmp_path / ".b.lock"
        if not refused and lock.is_file() and lock.read_text().strip() == str(second.pid):
            refused.append(run_cli(capsys, *argv))  # a second export while this one runs
        return (partial / "transformer.onnx").exists()

    kill_when(second, writing_transformer, "the transformer graph")
    assert refused, "the second export was not tried while the first held the lock"
    assert_one_line_error(*refused[0], f"another export (PID {second.pid}) is writing {out}")
    # the second took over the first's lock and removed its partial folder; now it has left its own
    assert hidden(tmp_path) == sorted([".b.lock", f".b.partial-{second.pid}"])
    assert not out.exists()
    # 3: the next export removes that too, takes over the stale lock, and succeeds
    assert main(argv) == 0
    assert hidden(tmp_path) == [] and json.loads((out / "manifest.json").read_text())["networks"]


@rtx
def test_a_killed_build_keeps_finished_engines_and_the_next_build_cleans_up(fp32_bundle, tmp_path, capsys):
    out = tmp_path / "engines"
    argv = ["build", "--bundle", str(fp32_bundle), "--out", str(out), *RTX_BUILD]
    for network in ("text_encoder", "transformer"):  # killed while building each in turn
        proc = start_cli(*argv)
        kill_when(proc, lambda: (out / f".{network}.engine.tmp-{proc.pid}").exists(), f"the {network} build")
    assert hidden(out) and all(".tmp-" in name for name in hidden(out))
    assert (tmp_path / ".engines.lock").exists()  # stale: its holder is dead
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "text_encoder  current" in table and "transformer   built" in table and "vae_decoder   built" in table
    assert hidden(out) == [] and not (tmp_path / ".engines.lock").exists()


# ------------------------------------------------------------------------------------------ full disks
def test_export_refuses_before_writing_when_the_bundle_cannot_fit(capsys, tiny_model, small_fs):
    fill(small_fs, leave=8 << 20)
    code, err = run_cli(capsys, "export", "--model", str(tiny_model), "--out", str(small_fs / "b"), *FAST_EXPORT)
    assert_one_line_error(code, err, f"writing the bundle {small_fs / 'b'} needs about", f"in {small_fs} and", "MB is free")
    assert hidden(small_fs) == [] and not (small_fs / "b").exists()


@rtx
def test_build_refuses_before_building_when_the_engines_cannot_fit(capsys, fp32_bundle, small_fs):
    fill(small_fs, leave=8 << 20)
    code, err = run_cli(capsys, "build", "--bundle", str(fp32_bundle), "--out", str(small_fs / "e"), *RTX_BUILD)
    assert_one_line_error(code, err, "writing the engines (text_encoder, transformer, vae_decoder) needs about",
                          f"in {small_fs} and", "MB is free")
    assert hidden(small_fs) == [] and not (small_fs / "e").exists()


def test_a_disk_that_fills_during_export_is_one_line_and_nothing_stays(capsys, tiny_model, small_fs):
    partial = small_fs / f".b.partial-{os.getpid()}"
    fill_when(small_fs, lambda: (partial / "scheduler.json").exists())  # before the first graph
    code, err = run_cli(capsys, "export", "--model", str(tiny_model), "--out", str(small_fs / "b"), *FAST_EXPORT)
    assert_one_line_error(code, err, f"could not write {small_fs / 'b' / 'text_encoder.onnx'} (", "MB free there)",
                          "no space left on the device", "--out")
    assert hidden(small_fs) == [] and not (small_fs / "b").exists()


@rtx
def test_a_disk_that_fills_during_build_is_one_line_and_keeps_finished_engines(capsys, fp32_bundle, small_fs):
    out = small_fs / "engines"
    filler = fill_when(small_fs, lambda: (out / "text_encoder.engine.json").exists())
    argv = ["build", "--bundle", str(fp32_bundle), "--out", str(out), *RTX_BUILD]
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, f"could not write {out / 'transformer.engine'} (", "no space left on the device")
    assert hidden(out) == [] and hidden(small_fs) == []  # no temp engine, no lock
    filler.join()
    (small_fs / "filler").unlink()  # space again: the next build keeps the finished engine and makes the rest
    assert main(argv) == 0
    assert "text_encoder  current" in capsys.readouterr().out


def test_generate_on_a_full_disk_is_one_line_and_leaves_no_temp_png(capsys, fp32_bundle, small_fs):
    fill(small_fs)
    code, err = run_cli(capsys, "generate", "--bundle", str(fp32_bundle), "--prompt", "a fox", "--device", "cpu",
                        "--out", str(small_fs / "y.png"))
    assert_one_line_error(code, err, f"could not write {small_fs / 'y.png'}", "no space left on the device")
    assert hidden(small_fs) == [] and not (small_fs / "y.png").exists()


def test_generate_to_a_read_only_file_system_is_one_line(capsys, fp32_bundle, tmp_path):
    mnt = mount_tmpfs(tmp_path / "ro", "1m", "ro")
    try:
        code, err = run_cli(capsys, "generate", "--bundle", str(fp32_bundle), "--prompt", "a fox", "--device", "cpu",
                            "--out", str(mnt / "y.png"))
        assert_one_line_error(code, err, "read-only file system")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_make_tiny_into_a_read_only_file_system_is_one_line(capsys, tmp_path):
    mnt = mount_tmpfs(tmp_path / "ro", "1m", "ro")
    try:
        assert_one_line_error(*run_cli(capsys, "make-tiny", str(mnt / "m")), str(mnt / "m"), "read-only file system")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_an_os_error_names_the_file_the_user_knows_and_tells_reading_from_writing(tmp_path):
    from zimage_trt.common.files import os_error_line

    out = tmp_path / "b"
    in_partial = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".b.partial-7" / "t.onnx"))
    assert os_error_line(in_partial, out / "t.onnx", "pass another --out").startswith(f"could not write {out / 't.onnx'} (")
    inside = OSError(errno.EACCES, "Permission denied", str(out / "tokenizer" / "tokenizer.json"))
    assert os_error_line(inside, out) == (f"could not write {out / 'tokenizer' / 'tokenizer.json'}: permission denied; "
                                          "write to a folder you can write to")
    elsewhere = OSError(errno.EACCES, "Permission denied", str(tmp_path / "model" / "config.json"))
    assert os_error_line(elsewhere, out) == f"could not read {tmp_path / 'model' / 'config.json'}: permission denied"
    no_name = OSError(errno.EROFS, "Read-only file system")
    assert os_error_line(no_name, out / "y.png", "pass another --out") == (
        f"could not write {out / 'y.png'}: read-only file system; pass another --out")


def test_the_runtime_cache_on_a_full_disk_is_one_warning_and_no_temp_file(small_fs, caplog):
    from zimage_trt.runtime.runtime_cache import RuntimeCacheFile

    from .test_runtime_cache import Blob

    fill(small_fs)
    cache = RuntimeCacheFile(small_fs / "transformer.engine.runtime_cache", Blob(b"RTX" + b"k" * (1 << 20)))
    with caplog.at_level(logging.WARNING, logger="zimage_trt"):
        assert cache.save() is False
    assert len(caplog.records) == 1 and "no space left on the device" in caplog.text
    assert hidden(small_fs) == []


def test_a_png_left_by_a_killed_generate_is_removed_by_the_next(tmp_path):
    import numpy as np

    from zimage_trt.runtime.images import save_png

    left = tmp_path / f".y.png.tmp-{dead_pid()}"
    left.write_bytes(b"\x89PNG half")
    save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "y.png")
    assert hidden(tmp_path) == [] and (tmp_path / "y.png").stat().st_size > 0
