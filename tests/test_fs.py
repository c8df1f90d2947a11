"""cellst.fs: the one file lock (exclusive / shared / try-only), across real processes."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cellst.fs import LockHeld, file_lock, is_locked, staged_dir
from conftest import held_in_another_process


def _hold(path: Path, shared: bool) -> subprocess.Popen:
    """Another process holding ``path``'s lock until its stdin closes."""
    return held_in_another_process(
        "from cellst.fs import file_lock", f"file_lock({str(path)!r}, shared={shared})"
    )


def test_exclusive_shared_and_try_locks_between_processes(tmp_path):
    lock = tmp_path / "sub" / ".lock"
    assert not is_locked(lock) and not lock.exists()  # asking creates nothing
    other = _hold(lock, shared=False)
    try:
        assert is_locked(lock)
        with pytest.raises(LockHeld), file_lock(lock, wait=False):
            pass
    finally:
        other.communicate("")
    assert not is_locked(lock)
    reader = _hold(lock, shared=True)
    try:
        with file_lock(lock, shared=True, wait=False):  # shared holders coexist
            pass
        with pytest.raises(LockHeld), file_lock(lock, wait=False):  # a writer waits
            pass
    finally:
        reader.communicate("")
    with file_lock(lock, wait=False):
        pass


def test_a_staged_folder_that_cannot_be_swapped_in_is_removed(tmp_path):
    final = tmp_path / "ckpt"
    final.symlink_to(tmp_path / "gone")  # a dangling link where the folder goes
    with pytest.raises(OSError), staged_dir(final) as stage:
        (stage / "model.pt").write_bytes(b"weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folder left
    with staged_dir(tmp_path / "ok") as stage:
        (stage / "a").write_text("1")
    assert (tmp_path / "ok" / "a").read_text() == "1"


def test_a_locked_file_waiter_gets_the_file_that_replaced_the_one_it_waited_on(tmp_path):
    """``locked_file``: a writer that rewrites the file atomically while another waits for
    its lock hands the waiter the new file, so appends are never made to an unlinked one."""
    import threading

    from cellst.fs import atomic_write_text, locked_file

    data = tmp_path / "pending.jsonl"
    with locked_file(data, create=False) as fh:
        assert fh is None and not data.exists()  # nothing created when not asked
    seen: list[str] = []
    with locked_file(data, create=True) as fh:
        fh.write("old\n")
        fh.flush()

        def waiter() -> None:
            with locked_file(data, create=True) as other:
                other.seek(0)
                seen.append(other.read())
                other.write("appended\n")

        t = threading.Thread(target=waiter)
        t.start()
        t.join(0.3)
        assert t.is_alive()  # blocked by this holder's flock
        atomic_write_text(data, "new\n")  # replaced under the waiter
    t.join(10)
    assert seen == ["new\n"]
    assert data.read_text() == "new\nappended\n"


def test_a_locked_file_removed_after_a_look_is_not_created_again(tmp_path, monkeypatch):
    """``locked_file(create=False)`` on a file that another process removes right after it
    was seen (a flusher that sent everything) gives None and leaves no empty file behind."""
    from pathlib import Path

    from cellst.fs import locked_file

    gone = tmp_path / "pending.jsonl"
    real_exists = Path.exists
    # "it is there" for any existence check, as it was a moment before its removal
    monkeypatch.setattr(Path, "exists", lambda p: True if p == gone else real_exists(p))
    with locked_file(gone, create=False) as fh:
        assert fh is None
    assert not real_exists(gone)


def test_temp_dirs_of_processes_that_died_are_removed_and_no_others(tmp_path, monkeypatch):
    """A training worker killed mid-checkpoint cannot remove its temporary checkpoint
    folder; the next training on that node does (``remove_orphan_temp_dirs``), leaving the
    folders of live processes and of other hosts."""
    import socket
    import subprocess
    import sys
    import tempfile

    from cellst.fs import process_temp_dir, remove_orphan_temp_dirs

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = process_temp_dir("cellst-ckpt-")
    (mine / "checkpoint").mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True).stdout.strip()  # fmt: skip
    orphan = tmp_path / f"cellst-ckpt-{socket.gethostname()}-{dead}-abc123"
    (orphan / "checkpoint").mkdir(parents=True)
    elsewhere = tmp_path / f"cellst-ckpt-another-host-{dead}-abc123"
    elsewhere.mkdir()
    old_style = tmp_path / "cellst-ckpt-x1y2z3"  # written before the pid was in the name
    old_style.mkdir()
    assert remove_orphan_temp_dirs("cellst-ckpt-") == [orphan]
    assert mine.is_dir() and elsewhere.is_dir() and old_style.is_dir() and not orphan.exists()


def test_copies_of_a_checkpoint_left_by_a_killed_writer_are_removed_at_the_next_publish(tmp_path):
    """A rank 0 killed while copying ``best`` left ``checkpoints/.best.<hex>`` for ever, and
    ``checkpoints.json`` listed it. The next publish of that name removes it; names that
    only look alike (another checkpoint's, a user's) stay."""
    from cellst.fs import stale_siblings, temp_sibling
    from cellst.model import ModelConfig, build_model, save_checkpoint
    from cellst.train.checkpoints import RunPaths, keep_checkpoints

    mcfg = ModelConfig(name="hovernet-lite", width=8)
    src = save_checkpoint(tmp_path / "epoch", build_model(mcfg), mcfg)
    paths = RunPaths(tmp_path / "run")
    paths.checkpoints.mkdir(parents=True)
    killed = [temp_sibling(paths.best, ""), temp_sibling(paths.best, ".publishing")]
    kept = [paths.checkpoints / ".best.notes", temp_sibling(paths.last, ".other")]
    for folder in [*killed, *kept]:
        folder.mkdir()
    assert stale_siblings(paths.best, "") == [killed[0]]
    assert stale_siblings(paths.best, ".publishing") == [killed[1]]
    keep_checkpoints(paths, src, 1, is_best=True, is_snapshot=False, keep_last=2)
    assert not any(p.exists() for p in killed) and all(p.exists() for p in kept)
    assert sorted(p.name for p in paths.checkpoints.iterdir() if p.name[0] != ".") == [
        "best",
        "epoch_001",
        "last",
    ]
    assert not stale_siblings(tmp_path / "absent" / "x")


def test_a_training_attempt_replaced_by_a_newer_one_publishes_nothing(tmp_path):
    """The Ray Train workers of a killed ``cellst train`` go on for seconds after their
    driver, while a re-run (with ``--force``, of another config) takes the run over: once
    the new attempt claims the run, the old one's epochs, best/last copies and resume
    state are refused, and nothing of them is left; the new attempt's land."""
    from cellst.fs import WriterReplaced, temp_sibling, writer_record
    from cellst.model import ModelConfig, build_model, save_checkpoint
    from cellst.train.checkpoints import (
        TRAIN_STATE_FILE,
        RunPaths,
        keep_checkpoints,
        keep_resume_state,
        publish_best,
    )

    mcfg = ModelConfig(name="hovernet-lite", width=8)
    src = save_checkpoint(tmp_path / "epoch", build_model(mcfg), mcfg)
    (src / TRAIN_STATE_FILE).write_bytes(b"state")
    old = RunPaths(tmp_path / "run").claim("old")
    keep_checkpoints(old, src, 1, is_best=True, is_snapshot=False, keep_last=2)
    new = RunPaths(tmp_path / "run").claim("new")  # the re-run, under the run's lock
    assert writer_record(new.root).read_text().strip() == "new"
    copying = temp_sibling(new.best, ".publishing")  # the new attempt's copy in progress
    copying.mkdir()
    before = sorted(p.name for p in new.checkpoints.iterdir())
    for publish in (
        lambda: keep_checkpoints(old, src, 2, is_best=True, is_snapshot=True, keep_last=2),
        lambda: publish_best(old, src),
        lambda: keep_resume_state(old, src),
    ):
        with pytest.raises(WriterReplaced, match="now written by run new"):
            publish()
    # nothing of the old attempt's left, and the new one's copy not taken for a dead one's
    assert sorted(p.name for p in new.checkpoints.iterdir()) == before and copying.is_dir()
    copying.rmdir()
    assert not new.resume_state.exists()
    keep_checkpoints(new, src, 2, is_best=False, is_snapshot=False, keep_last=2)
    keep_resume_state(new, src)
    assert (new.checkpoints / "epoch_002").is_dir() and new.resume_state.is_file()
    RunPaths(tmp_path / "run").check_writer()  # a reader names no writer: never refused


def test_environ_sets_variables_for_the_block_and_restores_them(monkeypatch):
    """``cellst.procenv.environ`` (Ray Train's start-up wait, MLflow's HTTP limits)."""
    import os

    from cellst.procenv import environ

    monkeypatch.setenv("CELLST_T_SET", "before")
    monkeypatch.delenv("CELLST_T_UNSET", raising=False)
    with pytest.raises(RuntimeError), environ({"CELLST_T_SET": "a", "CELLST_T_UNSET": "b"}):
        assert os.environ["CELLST_T_SET"] == "a" and os.environ["CELLST_T_UNSET"] == "b"
        raise RuntimeError  # restored on the way out of a failing block too
    assert os.environ["CELLST_T_SET"] == "before" and "CELLST_T_UNSET" not in os.environ


def test_a_file_that_does_not_fit_on_the_disk_is_named_and_the_old_one_kept(tmp_path):
    """A full disk's error from a write names no file, so ``cellst`` could only say
    "File too large" without saying which file. ``atomic_write`` now names the file it
    was writing, and leaves the earlier file whole. (The full disk is real: the child
    process runs under a file-size limit, ``RLIMIT_FSIZE``.)"""
    target = tmp_path / "record.bin"
    target.write_bytes(b"old")
    code = textwrap.dedent(
        f"""
        import resource, signal
        from cellst.fs import atomic_write_bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            atomic_write_bytes({str(target)!r}, b"x" * 100_000)
        except OSError as exc:
            print(exc.errno, exc.filename)
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == [str(errno.EFBIG), str(target)], res.stdout + res.stderr
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.bin"]  # no temporary left


def test_a_runs_worker_group_sizes_are_recorded_once_per_change(tmp_path):
    """``worker_groups.json``: what `cellst train` reads to say an elastic group
    shrank (and grew back); a restart of the same size is no change."""
    from cellst.train.checkpoints import RunPaths

    paths = RunPaths(tmp_path / "run")
    assert paths.group_sizes() == []
    for n in (2, 2, 1, 2):  # a restart after a failure, a lost node, a node back
        paths.record_group_size(n)
    assert paths.group_sizes() == [2, 1, 2]
    paths.group_sizes_file.write_text("{not json")
    assert paths.group_sizes() == []


_AS_ANOTHER_USER = """
import os, sys
sys.path.insert(0, {platform!r})
from cellst.fs import check_writing, claim_writing, writer_record, writing_folder
if os.geteuid() == 0:  # imported first: the interpreter may be readable by root alone
    os.setgid(65534); os.setuid(65534)
folder = {folder!r}
with writing_folder(folder, "test"):
    claim_writing(folder, "run-1")
    check_writing(folder, "run-1")
    print(writer_record(folder))
print(sorted(os.listdir(folder)))
"""


@pytest.fixture
def open_tmp():
    """A temporary folder other users can pass through (pytest's are closed to them)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="cellst-test-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_an_output_folder_in_a_read_only_parent_keeps_its_lock_and_writer_record_inside(
    open_tmp,
):
    """The lock of an output folder and the record of its writer sit beside it, or both
    inside it where its parent takes no file (a writable image folder in a read-only
    parent), one rule for both. Run as an unprivileged user (root writes anywhere)."""
    import os

    from cellst.fs import claim_writing, writer_record, writing_folder

    parent = open_tmp / "readonly"
    folder = parent / "images"
    folder.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(folder, 65534, 65534)  # the folder is nobody's, its parent is not
    parent.chmod(0o555)
    code = _AS_ANOTHER_USER.format(
        platform=str(Path(__file__).parents[1] / "platform"), folder=str(folder)
    )
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    finally:
        parent.chmod(0o755)
    assert out.returncode == 0, out.stderr
    record, listing = out.stdout.splitlines()
    assert Path(record) == folder.resolve() / ".cellst-writer"
    assert listing == "['.cellst-writer', '.cellst-writing.lock']"
    assert not list(parent.glob(".images.*"))  # nothing beside, where it could not go
    # a writable parent: both beside the folder, with one stem
    claim_writing(folder, "run-2")
    assert writer_record(folder) == parent / ".images.writer"
    with writing_folder(folder, "test"):
        assert (parent / ".images.lock").is_file()
