"""Writing an output folder without ever losing a user's files.

:func:`atomic_output_dir` is how every pactmerge output (a merged model, an adapter, an analysis
report) is written. The rules:

* **Not an input.** The target is refused if it is, contains, or lies inside one of the inputs
  (the config file, the base model, every model), compared after resolving symlinks -- also the
  symlinked files inside an input folder (a Hugging Face cache snapshot points into ``blobs/``).
  ``.``, ``..``, ``/`` and any folder holding the current directory are refused too.
* **Only pactmerge outputs are replaced.** Every output carries a marker file, ``.pactmerge-output``.
  An existing target is an error; with ``overwrite`` it is replaced only if it carries the marker
  (or is an empty folder); anything else needs ``force``.
* **Atomic.** The output is written into a temporary folder beside the target,
  ``.<name>.tmp-<host>-<pid>-<random>``, and renamed into place only when complete. The rename
  never deletes what it did not see at the start: a target that did not exist is created with
  ``renameat2(RENAME_NOREPLACE)`` (an entry that appeared meanwhile makes the run fail and is left
  alone); one being replaced is swapped atomically (``RENAME_EXCHANGE``) after checking that it is
  still the same folder (device and inode). Elsewhere than Linux, a check and plain renames.
* **Nothing left behind.** On any failure, exception or SIGINT/SIGTERM (see :mod:`pactmerge.signals`)
  the temporary folder, and any parent folders the run created, are removed. A SIGKILL leaves the
  temporary folder: it is safe to delete, and the next run on the same target removes those of
  processes of this host that are no longer running (:func:`reap_stale_temporaries`).
* **One-line errors.** An ``OSError`` while writing (a full disk, no permission, a read-only
  disk) becomes a :class:`PactMergeError` naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pactmerge.errors import PactMergeError
from pactmerge.signals import Interrupted, deferred_signals

MARKER = ".pactmerge-output"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_TMP_TAIL = re.compile(r"(?P<host>.+)-(?P<pid>\d+)-(?P<rand>[0-9a-f]{8})")


@dataclass(frozen=True)
class OutputTarget:
    """A checked output path.

    ``path`` is absolute with its parent's symlinks resolved (the last component is kept: a
    symlink there is replaced, not followed). ``replaces`` is ``(st_dev, st_ino)`` of the entry
    the output will replace, or None when the path is free.
    """

    path: Path
    replaces: tuple[int, int] | None


def host_tag() -> str:
    """This host's name as it appears in temporary folder names (safe characters only)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def _tmp_prefix(name: str) -> str:
    return f".{name[:150]}.tmp-"


def _input_locations(ref: str | os.PathLike) -> Iterator[Path]:
    p = Path(ref).expanduser()
    yield p.absolute()
    yield p.resolve()
    if p.is_dir():
        with contextlib.suppress(OSError):
            for f in p.iterdir():
                if f.is_symlink():
                    yield f.resolve()


def check_not_an_input(display: str, target: Path, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse a target that is, contains or lies inside an input (after resolving symlinks)."""
    outs = {target, target.resolve()}
    for ref in inputs:
        for loc in _input_locations(ref):
            for out in outs:
                if out == loc:
                    how = "is"
                elif loc.is_relative_to(out):
                    how = "contains"
                elif out.is_relative_to(loc):
                    how = "lies inside"
                else:
                    continue
                raise PactMergeError(
                    f"{display}: the output folder {how} the input {ref}"
                    f"{f' ({loc})' if str(loc) != str(ref) else ''}; choose an output folder outside every input"
                )


def prepare_target(
    target: str | os.PathLike, *, overwrite: bool = False, force: bool = False, inputs: Iterable = ()
) -> OutputTarget:
    """Check an output path before any work; nothing is created or changed.

    Args:
        target: the output folder.
        overwrite: replace an existing target if it is a pactmerge output (marker) or an empty folder.
        force: replace an existing target whatever it is (implies ``overwrite``); never an input.
        inputs: paths of every input (config file, models); in-memory inputs are skipped.

    Raises:
        PactMergeError: one line naming the target and what to do.
    """
    display = str(target)
    raw = Path(target).expanduser()
    if raw.name in ("", ".", ".."):
        raise PactMergeError(
            f"{display}: the output must be a folder of its own, not the current directory, a parent or the root;"
            " give a new folder name, e.g. merged/"
        )
    path = raw.absolute().parent.resolve() / raw.name
    cwd = Path.cwd().resolve()
    if cwd == path.resolve() or path.resolve() in cwd.parents:
        raise PactMergeError(f"{display}: the output folder contains the current directory; choose another folder")
    check_not_an_input(display, path, [p for p in inputs if isinstance(p, str | os.PathLike)])

    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PactMergeError(
            f"{display}: cannot create the output folder: {ancestor} is a file, not a folder; choose another path"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PactMergeError(
            f"{display}: cannot create the output folder in {ancestor} (permission denied); choose a folder you can"
            " write to"
        )

    if not os.path.lexists(path):
        return OutputTarget(path, None)
    if not (overwrite or force):
        raise PactMergeError(
            f"{display}: output folder already exists (pass --overwrite to replace a previous pactmerge output)"
        )
    if not force:
        if path.is_symlink() and not path.exists():
            raise PactMergeError(f"{display}: is a broken symbolic link; remove it or pass --force to replace it")
        if not path.is_dir():
            raise PactMergeError(
                f"{display}: is a file, not a pactmerge output; --overwrite only replaces earlier pactmerge outputs"
                " (remove it yourself, choose another path, or pass --force to replace it)"
            )
        if not (path / MARKER).is_file() and any(path.iterdir()):
            raise PactMergeError(
                f"{display}: exists and is not a pactmerge output (no {MARKER} marker); --overwrite only replaces"
                " earlier pactmerge outputs (remove it yourself, choose another folder, or pass --force to replace it)"
            )
    st = os.lstat(path)
    return OutputTarget(path, (st.st_dev, st.st_ino))


def reap_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary folders of earlier runs on ``path`` whose process (on this host) is gone.

    Returns:
        The folders removed.
    """
    if os.name != "posix":
        return []
    prefix, host, removed = _tmp_prefix(path.name), host_tag(), []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = _TMP_TAIL.fullmatch(entry.name[len(prefix) :]) if entry.name.startswith(prefix) else None
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_symlink() or not p.is_dir():
            p.unlink()
        else:
            shutil.rmtree(p)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, outermost first."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        created.append(d)
    return created


def _new_tmp(path: Path) -> Path:
    """Create the temporary folder beside ``path`` (mode 0o777 less the umask, like any new folder)."""
    for _ in range(100):
        tmp = path.with_name(f"{_tmp_prefix(path.name)}{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        return tmp
    raise PactMergeError(f"{path}: cannot create a temporary folder beside it")


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False if this system or filesystem does not support it."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists (whatever it is)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _commit(tmp: Path, target: OutputTarget, display: str) -> Path | None:
    """Publish ``tmp`` as ``target.path``; return the path now holding the replaced entry, if any."""
    path = target.path
    appeared = (
        f"{display}: appeared while the merge ran (created by another program?); it was left untouched and this"
        " run's output discarded: remove it or choose another output folder"
    )
    if target.replaces is None:
        try:
            _rename_noreplace(tmp, path)
        except (FileExistsError, IsADirectoryError, NotADirectoryError):
            raise PactMergeError(appeared) from None
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise PactMergeError(appeared) from None
            raise
        return None
    try:
        st = os.lstat(path)
    except FileNotFoundError:  # removed meanwhile: nothing to replace
        _rename_noreplace(tmp, path)
        return None
    if (st.st_dev, st.st_ino) != target.replaces:
        raise PactMergeError(
            f"{display}: was replaced by something else while the merge ran; it was left untouched and this run's"
            " output discarded"
        )
    if _renameat2(tmp, path, _RENAME_EXCHANGE):
        return tmp  # the old entry now sits at the temporary name
    aside = _new_tmp(path)
    aside.rmdir()
    os.rename(path, aside)
    try:
        _rename_noreplace(tmp, path)
    except BaseException:
        os.rename(aside, path)
        raise
    return aside


def describe_os_error(e: OSError, display: str, tmp: Path | None = None) -> str:
    """One line for an ``OSError`` while writing an output: the file, the reason, what to do."""
    where = display
    if e.filename:
        f = Path(os.fsdecode(e.filename))
        where = str(Path(display) / f.relative_to(tmp)) if tmp is not None and f.is_relative_to(tmp) else str(f)
    code = e.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        hint = "free space on that disk or write the output to another disk"
    elif code in (errno.EACCES, errno.EPERM):
        hint = "choose an output folder you can write to"
    elif code == errno.EROFS:
        hint = "the disk is read-only: choose another output folder"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        hint = "a file is in the way: choose another output path"
    else:
        hint = "check the output folder and its disk"
    return f"{where}: cannot write the output ({e.strerror or type(e).__name__}); {hint}"


@contextlib.contextmanager
def atomic_output_dir(
    target: str | os.PathLike,
    overwrite: bool = False,
    *,
    force: bool = False,
    inputs: Iterable = (),
) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; publish it as ``target`` only if the block succeeds.

    Args:
        target: the output folder.
        overwrite: replace an existing pactmerge output (marker) or empty folder at ``target``.
        force: replace whatever is at ``target`` (never an input).
        inputs: the inputs' paths, which ``target`` may not be, contain or lie inside.

    On any exception (and SIGINT/SIGTERM under :func:`pactmerge.signals.exit_on_signals`) the
    temporary folder and the parent folders this call created are removed and ``target`` is
    untouched; an ``OSError`` is re-raised as a one-line :class:`PactMergeError`. See the module doc.
    """
    display = str(target)
    checked = prepare_target(target, overwrite=overwrite, force=force, inputs=inputs)
    reap_stale_temporaries(checked.path)
    try:
        created = _make_parents(checked.path.parent)
        tmp = _new_tmp(checked.path)
    except OSError as e:
        raise PactMergeError(describe_os_error(e, display)) from None
    committed, old = False, None
    try:
        yield tmp
        from pactmerge import __version__

        (tmp / MARKER).write_text(json.dumps({"written_by": "pactmerge", "version": __version__}) + "\n")
        try:
            with deferred_signals():
                old = _commit(tmp, checked, display)
                committed = True
        except Interrupted as e:  # held during the rename, delivered after it
            if committed:
                e.output_complete = checked.path
            raise
    except BaseException as e:
        if not committed:
            _remove(tmp)
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()
        if isinstance(e, OSError):
            raise PactMergeError(describe_os_error(e, display, tmp)) from None
        raise
    finally:
        if old is not None:  # the replaced output, now at a temporary name
            _remove(old)
