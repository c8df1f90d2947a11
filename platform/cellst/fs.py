"""Crash-safe file writes: the one owner of cellst's atomic-write, directory-swap and
file-lock rules.

Every file cellst writes for a user or for a later run goes through a temporary sibling and
an atomic ``os.replace``, so a reader sees either the old file or the new one, never half of
one, and an interrupted write leaves the previous version in place. Only the standard
library is imported here, so any module (configs, the CLI) may use it cheaply.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def temp_sibling(path: str | os.PathLike[str], suffix: str = ".tmp") -> Path:
    """A fresh hidden name beside ``path``, on the same file system (so a rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{suffix}")


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Hard-link ``src`` at ``dst``, or copy it (with its times) where the file system
    cannot link (another device, no hard links): the ``copy_function`` of a cheap
    :func:`shutil.copytree` of files that are never modified in place."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def remove_dir(path: str | os.PathLike[str]) -> None:
    """Delete folder ``path`` (nothing happens if it does not exist) so that it never
    stays half-deleted under its own name: it is renamed to a hidden
    :func:`temp_sibling` (``.removing``) first, which :func:`stale_siblings` finds if the
    deletion is interrupted."""
    path = Path(path)
    for stale in stale_siblings(path, ".removing"):
        shutil.rmtree(stale, ignore_errors=True)
    if not path.exists():
        return
    aside = temp_sibling(path, suffix=".removing")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def stale_siblings(path: str | os.PathLike[str], suffix: str = ".tmp") -> list[Path]:
    """The :func:`temp_sibling` names of ``path`` with ``suffix`` that exist: left by a
    process killed before its clean-up (call it where no other writer of ``path`` runs)."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{8}}{re.escape(suffix)}")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name))


class NotWritableError(ValueError):
    """A folder cellst must write into cannot take files; one line naming it."""


def process_temp_dir(prefix: str, parent: str | os.PathLike[str] | None = None) -> Path:
    """A new folder in ``parent`` (default: the system's temporary folder), named for this
    host and process (``PREFIX<host>-<pid>-<random>``), so that
    :func:`remove_orphan_temp_dirs` can tell when its owner is gone. For scratch space a
    process removes itself when done."""
    own = f"{prefix}{socket.gethostname()}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=own, dir=None if parent is None else str(parent)))


def remove_orphan_temp_dirs(
    prefix: str, parent: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Remove this host's :func:`process_temp_dir` folders (in ``parent``, default the
    system's temporary folder) whose process no longer runs (killed before its own
    clean-up, e.g. a training worker lost mid-checkpoint); those of live processes and of
    other hosts (a shared folder) are left alone."""
    own = f"{prefix}{socket.gethostname()}-"
    removed = []
    where = Path(tempfile.gettempdir() if parent is None else parent)
    for folder in where.glob(f"{own}*"):
        pid = folder.name[len(own) :].split("-", 1)[0]
        if not pid.isdigit() or not folder.is_dir():
            continue
        if not process_alive(int(pid)):  # a live one may be a reused pid: left alone
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine (one this process may not
    signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def check_writable(folder: str | os.PathLike[str]) -> None:
    """Raise :class:`NotWritableError` when :func:`unwritable_reason` finds a reason."""
    reason = unwritable_reason(folder)
    if reason:
        raise NotWritableError(reason)


def unwritable_reason(folder: str | os.PathLike[str]) -> str | None:
    """Why files cannot be created in ``folder``, in one line naming it; None when they can.

    A folder that does not exist yet is judged by its nearest existing parent (where it
    would be created). The check creates and removes one hidden file, so it sees what a
    write would meet: permissions, a read-only file system, an immutable folder, or a file
    where the folder should be. Nothing is left behind.
    """
    folder = Path(folder)
    where = folder
    while not where.exists() and where.parent != where:
        where = where.parent
    if not where.is_dir():
        return f"{where} is a file, not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".cellst-probe-", dir=where)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return f"{where} is not writable ({exc.strerror or type(exc).__name__})"
    return None


class CorruptFileError(ValueError):
    """A file cellst wrote cannot be parsed any more (edited, truncated); names the file."""


_REQUIRED: Any = object()


def read_json(path: str | os.PathLike[str], missing: Any = _REQUIRED, expect: type = dict) -> Any:
    """The JSON document in ``path``; :class:`CorruptFileError` naming the file when it is
    not valid JSON (a truncated or hand-edited record), or not of the ``expect``ed type
    (cellst's records are JSON objects: ``[]`` in one gave an AttributeError traceback).
    With ``missing``, a file that does not exist reads as that value (e.g. ``{}`` for a
    record not written yet). ``expect=object`` takes any document."""
    path = Path(path)
    if missing is not _REQUIRED and not path.is_file():
        return missing
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: not valid JSON ({exc}); restore or remove it") from None
    if not isinstance(doc, expect):
        what = "a JSON object" if expect is dict else f"a JSON {expect.__name__}"
        found = {list: "an array", str: "a string", type(None): "null"}.get(type(doc), "a value")
        raise CorruptFileError(f"{path}: expected {what}, found {found}; restore or remove it")
    return doc


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[Path], object],
    before_rename: Callable[[], object] | None = None,
) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place.

    Parameters
    ----------
    path : path-like
        The final file. Its folder is created if needed.
    write : callable
        Writes the whole file at the path it is given (``df.to_parquet``, ``fig.savefig``...).
    before_rename : callable, optional
        Called once the file is written, right before the rename; what it raises cancels
        the write (e.g. :func:`check_writing`).

    Returns
    -------
    Path
        ``path``. On any error the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, suffix=path.suffix or ".tmp")
    try:
        with _naming(path):
            write(tmp)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Give an OSError that names no file (a full disk's, from a write) ``path``'s name,
    so that the user is told which file could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def atomic_write_texts(files: dict[Path, str]) -> list[Path]:
    """Write several UTF-8 files that belong together (a report's JSON and CSVs): each is
    written whole to a temporary sibling first, and only once all are written are they
    renamed into place, one right after the other. A full disk or an error while writing
    leaves every earlier file as it was, never one report's JSON beside another's CSV.
    """
    tmps: dict[Path, Path] = {}
    try:
        for path, text in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmps[path] = temp_sibling(path, suffix=path.suffix or ".tmp")
            with _naming(path):
                tmps[path].write_text(text, encoding="utf-8")
        for path, tmp in tmps.items():
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        raise
    return list(tmps)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any, **dump_kwargs: Any) -> Path:
    """Write ``data`` as indented JSON atomically (``dump_kwargs`` go to :func:`json.dumps`)."""
    dump_kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(data, **dump_kwargs) + "\n")


def atomic_write_parquet(df: Any, path: str | os.PathLike[str]) -> Path:
    """Write a pandas DataFrame as Parquet atomically (no index column)."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Build a folder under a temporary name and swap it into place on success.

    Yields the staging folder; when the block exits normally the staging folder replaces
    ``final`` (an existing one is moved aside first and removed only after the swap, so a
    crash at any point leaves either the old or the new folder). On error the staging
    folder is removed and ``final`` is untouched.

    Raises
    ------
    FileExistsError
        If ``final`` exists and ``overwrite`` is false.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = temp_sibling(final, suffix=".staging")
    stage.mkdir()
    try:
        yield stage
        replace_dir(stage, final)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def replace_dir(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move folder ``src`` to ``dst``, replacing an existing ``dst`` with the least exposure.

    ``os.replace`` cannot replace a non-empty folder, so the old one (a folder, or a file
    at that name) is renamed aside first, the new one renamed in, and only then the old
    one deleted.
    """
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = temp_sibling(dst, suffix=".old")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:  # a file or link where the folder goes: rmtree would leave it behind
            old.unlink(missing_ok=True)


#: seconds a writer retries a held lock before refusing: a status probe (:func:`is_locked`)
#: holds it for an instant, and a writer starting then must not be refused
PROBE_GRACE_S = 1.0


class LockHeld(RuntimeError):
    """:func:`file_lock` with ``wait=False`` found the lock held by another process."""


@contextlib.contextmanager
def file_lock(
    path: str | os.PathLike[str], *, shared: bool = False, wait: bool = True, grace_s: float = 0
) -> Iterator[None]:
    """An advisory ``flock`` on the file ``path`` (created, with its folder, if needed),
    held for the block: exclusive, or ``shared`` with other shared holders. Released when
    the block exits, and by the kernel if the process dies.

    With ``wait=False``, ``grace_s`` retries for that long first: :func:`is_locked` holds
    the lock for an instant to look, and a writer starting then must not be refused.

    Raises
    ------
    LockHeld
        With ``wait=False``, when another process holds it (raised on entering the block).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    deadline = time.monotonic() + grace_s
    with open(path, "a") as fh:
        while True:
            try:
                fcntl.flock(fh, mode)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockHeld(str(path)) from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def locked_file(path: str | os.PathLike[str], *, create: bool) -> Iterator[Any]:
    """``path`` opened for reading and appending (UTF-8) under an exclusive ``flock`` on the
    file itself, for data files that several processes append to and rewrite atomically
    (:func:`atomic_write`). Yields None when the file does not exist and ``create`` is
    False. Re-opens when another process replaced or removed the file while this one
    waited for the lock, so the lock is always on the file now at ``path``.
    """
    path = Path(path)
    # without O_CREAT unless asked: a file removed between a check and the open (another
    # process finished with it) must stay removed, not come back empty ("a+" creates)
    flags = os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0)
    while True:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, flags, 0o666)
        except FileNotFoundError:
            if create:
                continue  # its folder went away meanwhile: make it again
            yield None
            return
        fh = os.fdopen(fd, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                current = os.path.samestat(os.fstat(fh.fileno()), os.stat(path))
            except FileNotFoundError:
                current = False
            if current:
                yield fh
                return
        finally:
            fh.close()


def lock_beside(folder: str | os.PathLike[str]) -> Path:
    """The lock file that guards ``folder``: ``.NAME.lock`` beside it, found through
    symbolic links, so that a folder reached by two paths (a link to a store, a run folder
    under a linked run_dir) has one lock, not one per path. Beside, not inside, so that
    removing and re-creating the folder keeps it."""
    real = Path(folder).resolve()
    return real.parent / f".{real.name}.lock"


@contextlib.contextmanager
def held_by_one(
    path: str | os.PathLike[str], refusal: Exception, *, shared: bool = False
) -> Iterator[None]:
    """An exclusive :func:`file_lock` on ``path`` for the block, or ``refusal`` raised at
    once when another process holds it (one writer of a set, one training of a run).
    With ``shared``, the lock of one of several readers, refused while one holds it
    exclusively (a training reading a set that no one may write meanwhile).
    Only the lock's refusal becomes ``refusal``; errors of the block pass as they are."""
    held = contextlib.ExitStack()
    try:
        held.enter_context(file_lock(path, shared=shared, wait=False, grace_s=PROBE_GRACE_S))
    except LockHeld:
        raise refusal from None
    with held:
        yield


@contextlib.contextmanager
def writing_folder(folder: str | os.PathLike[str], what: str) -> Iterator[None]:
    """The write lock of an output folder of label files (``cellst predict --out``,
    ``cellst segment``), held for the block: a second run writing the same folder at the
    same time is refused at once (:class:`FolderBusy`), so that two models never mix their
    labels in one folder, nor does one remove the other's files in progress.

    The lock is :func:`lock_beside` the folder; where its parent cannot take a file (a
    writable image folder in a read-only parent), a hidden file inside the folder."""
    lock = _beside_or_inside(folder, ".lock", ".cellst-writing.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    refusal = FolderBusy(
        f"{folder} is being written by another {what} run; wait for it to end, or give "
        "another output folder"
    )
    with held_by_one(lock, refusal):
        yield


class FolderBusy(RuntimeError):
    """Another process writes the output folder now (:func:`writing_folder`); one line."""


def writer_record(folder: str | os.PathLike[str]) -> Path:
    """Where the run that writes ``folder`` is named (:func:`claim_writing`): ``.NAME.writer``
    beside the folder, as its lock (:func:`lock_beside`), or ``.cellst-writer`` inside it
    where the parent cannot take a file (an output folder in a read-only parent)."""
    return _beside_or_inside(folder, ".writer", ".cellst-writer")


def _beside_or_inside(folder: str | os.PathLike[str], suffix: str, inside: str) -> Path:
    """``.NAME<suffix>`` beside ``folder`` (as :func:`lock_beside`), or the hidden file
    ``inside`` in it where the parent cannot take a file (a writable output folder in a
    read-only parent). One rule for the lock and the writer record of an output folder, so
    that both sit on the same side; a parent still to be made counts as writable."""
    beside = lock_beside(folder)
    if not beside.parent.is_dir() or os.access(beside.parent, os.W_OK):
        return beside.with_name(beside.name.removesuffix(".lock") + suffix)
    return Path(folder).resolve() / inside


def claim_writing(folder: str | os.PathLike[str], run_id: str) -> None:
    """Name ``run_id`` as the one run that may write into ``folder`` from now on.

    A folder's lock (:func:`held_by_one`, :func:`writing_folder`) is held by the driver
    process of a run, but the files are written by its Ray tasks and actors in other
    processes. When the driver dies (killed, its node lost), the lock is released at once
    while Ray takes seconds to stop those tasks, so a new run could start while the old
    one's tasks still write. The new run claims the folder first thing under the lock; the
    old run's writes then fail :func:`check_writing` and are dropped, never mixed in.
    """
    atomic_write_text(writer_record(folder), run_id + "\n")


class WriterReplaced(RuntimeError):
    """The folder has been claimed by a newer run (:func:`check_writing`); one line."""


def check_writing(folder: str | os.PathLike[str], run_id: str) -> None:
    """Raise :class:`WriterReplaced` unless ``run_id`` is still the run that claimed
    ``folder`` (:func:`claim_writing`). Called right before a write is renamed into place,
    so a write of a run whose driver died lands only in the short gap before a new run's
    claim, while the folder holds the dead run's own items, which the new run resumes."""
    try:
        current = writer_record(folder).read_text(encoding="utf-8").strip()
    except OSError:
        current = ""
    if current != run_id:
        raise WriterReplaced(
            f"{folder} is now written by run {current or '(none)'}, not by this run "
            f"({run_id}), whose driver has ended; this write is dropped"
        )


def is_locked(path: str | os.PathLike[str]) -> bool:
    """Whether anyone holds a :func:`file_lock` on ``path`` now, shared or exclusive, this
    process included (``flock`` locks belong to each opened file); a missing file is not
    locked and nothing is created."""
    if not Path(path).is_file():
        return False
    try:
        with file_lock(path, wait=False):
            return False
    except LockHeld:
        return True
