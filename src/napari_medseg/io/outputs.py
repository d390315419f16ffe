"""The one policy every writer follows for its output folder (predict, convert, train, tune-threshold).

* Temp files: a file is written as ``.<name>.<host>-<pid>.<hex>.part`` beside its target and renamed
  over it when complete (``temp_path``); a killed run leaves one behind, so a writer calls
  ``remove_stale_temps`` on its folders first, which removes only files of that pattern whose
  process is gone from this machine (``<host>-<pid>``: another machine's run may be writing).
* Never into an input: an output folder that is a dataset folder, or that would overwrite one of
  the inputs, is refused (``check_not_input``).
* One stem, one output: two inputs with the same stem would write the same output file
  (``check_unique_stems``), and neither would one input named twice (``check_given_once``).
* ``classes.json`` is never silently replaced by other classes (``claim_classes``).
* Disk full: ``reserve`` allocates a file's bytes up front, so a memory map never meets a full
  disk half-way (SIGBUS) and the message names the file.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from ..errors import MedsegError

# ``.<name>.<host>-<pid>.<hex>.part`` (older runs wrote no host)
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.(?:(?P<host>[A-Za-z0-9-]+)-)?(?P<pid>\d+)\.(?P<hex>[0-9a-f]{8,32})\.part$")


class OutputFolderError(MedsegError, ValueError):
    """An output folder would overwrite an input or another run's results."""


class OutputWriteError(MedsegError, OSError):
    """A file could not be written (disk full, no permission, ...); the message names the target."""


# the longest file name (bytes) the usual file systems take (ext4, XFS, APFS, NTFS in UTF-16 units)
NAME_MAX = 255


def temp_path(path: Path) -> Path:
    """The hidden name ``path`` is written under before its rename (see ``remove_stale_temps``).
    A long target name is cut in it, so that the temp name is never too long for a name that is
    not (it adds ~60 bytes; a 230-character name had been refused as "File name too long")."""
    tail = f".{_host_tag()}-{os.getpid()}.{uuid.uuid4().hex[:12]}.part"
    room = NAME_MAX - len(tail.encode()) - 1
    name = path.name.encode()[:room].decode("utf-8", "ignore")  # a character cut in half is dropped
    return path.parent / f".{name}{tail}"


def _host_tag() -> str:
    """This machine's name as a temp name carries it: a process id means something only on the
    machine that runs it (jobs of a cluster or containers sharing one output folder)."""
    import socket

    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(*folders: str | os.PathLike) -> list[Path]:
    """Removes the temp files (and temp folders: zarr stores) that killed runs left in ``folders``
    (ours only: the ``temp_path`` pattern, of a process that no longer runs); returns what it removed."""
    removed = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            match = TEMP_PATTERN.match(entry.name)
            here = match is not None and match["host"] in (None, _host_tag())  # another machine's: it may be writing
            if here and not entry.is_symlink() and not _pid_alive(int(match["pid"])):
                try:  # a folder too: a zarr store is written under a temp name as a whole
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                    removed.append(entry)
                except OSError:
                    pass  # not ours to fight over: the next run tries again
    return removed


def write_error(path: Path, exc: BaseException) -> OutputWriteError:
    """An error about writing ``path`` (the target, never its hidden temp file), saying what to do."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        why = "No space left on device: free some space or choose another output folder"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"{os.strerror(code)}: choose a folder you can write to"
    else:
        why = getattr(exc, "strerror", None) or text
    return OutputWriteError(f"Cannot write {path}: {why}. Nothing was written there.")


def reserve(fd: int, path: Path, size: int) -> None:
    """Allocates ``size`` bytes to the open file ``fd`` now, or raises naming ``path``."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)):
            raise write_error(path, exc) from None
        free = shutil.disk_usage(path.parent).free  # no fallocate here: check what is free
        if free < size:
            raise write_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from None


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def check_not_input(out: str | os.PathLike, inputs: list[Path], writes: tuple[str, ...], flag: str = "--out") -> None:
    """Refuses an output folder that is an input dataset folder or whose ``writes`` subfolders
    hold one of ``inputs``: the results would overwrite what they were made from."""
    out = _resolved(Path(out))
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{flag} {out} is a file, not a folder. Choose an empty or new folder.")
    if (out / "images").is_dir():
        raise OutputFolderError(
            f"{flag} {out} is a dataset folder (it has images/): writing there would overwrite its "
            "labels. Choose an empty or new folder.")
    targets = [out / sub for sub in writes]
    for item in inputs:
        item = _resolved(Path(item))
        if any(item == t or t in item.parents for t in targets):
            raise OutputFolderError(
                f"{flag} {out} would overwrite the input {item}. Choose an empty or new folder.")


# what a dataset or prediction folder holds that commands read: never replaced by a command's output
READ_FOLDERS = ("images", "labels", "instances", "probabilities")


def _read_from(path: Path, item: Path) -> bool:
    """Whether ``path`` is the input ``item`` or a file of it a command reads (its images, label
    maps, nuclei, probabilities or classes.json); a report beside them is not."""
    if path == item:
        return True
    if item not in path.parents:
        return False
    inner = path.relative_to(item).parts
    return inner[0] in READ_FOLDERS or inner == ("classes.json",)


def check_file_target(out: str | os.PathLike, inputs: list, flag: str = "--out", overwrite: bool = False) -> None:
    """Refuses a file to write that is a folder, that would replace a file of ``inputs`` the command
    reads (``medseg evaluate --json`` had written over the ground truth it read, and a tuner over a
    dataset's classes.json), even with ``overwrite``, or (without it) that exists. A new file in an
    input folder, or a report there written before (``results/scores.json``), is another matter:
    it replaces nothing read."""
    path = _resolved(Path(out))
    if path.is_dir():
        raise OutputFolderError(f"{flag} {out} is a folder: give the file to write.")
    for item in inputs:
        item = _resolved(Path(item))
        if path.exists() and _read_from(path, item):
            raise OutputFolderError(f"{flag} {out} is {'' if path == item else 'a file of '}the input {item}: "
                                    "writing it would replace what was read. Choose a file elsewhere.")
    if path.exists() and not overwrite:
        raise OutputFolderError(f"{flag} {out} exists: choose another file or pass --overwrite to replace it.")


def check_unique_stems(files: list[Path], stem) -> None:
    """Refuses two inputs that would write the same output file (``stem(file)`` equal)."""
    seen: dict[str, Path] = {}
    for file in files:
        key = stem(file)
        if key in seen and _resolved(seen[key]) != _resolved(file):
            raise OutputFolderError(
                f"{seen[key]} and {file} share the name '{key}', so their results would overwrite each other. "
                "Rename one of them or segment them into different output folders.")
        seen.setdefault(key, file)


def check_given_once(files: list[Path], out: Path, stem, what: str = "file") -> None:
    """Refuses a file named twice (as written, or by two paths to it) before any work: the second
    had been refused, or segmented again, only once the first was done (whole slides: hours)."""
    seen: dict[Path, Path] = {}
    for file in files:
        first = seen.setdefault(_resolved(file), file)
        if first is file:
            continue
        if str(first) == str(file):
            raise OutputFolderError(f"{file} is given twice: both would write {out / stem(file)}*. "
                                    f"Give each {what} once.")
        raise OutputFolderError(f"{first} and {file} are the same file ({_resolved(file)}): it would be segmented "
                                f"twice. Give each {what} once.")


def claim_classes(out: Path, classes: list[str], results: tuple[str, ...], flag: str = "--out") -> bool:
    """Checks that ``out`` may hold results under ``classes``: a folder whose ``classes.json``
    names other classes (or cannot be read), or that holds results without one, is refused.
    Returns whether ``classes.json`` still needs writing."""
    file = out / "classes.json"
    if file.exists():
        try:
            data = json.loads(file.read_text())
            existing = data.get("classes") if isinstance(data, dict) else None
        except (OSError, ValueError):
            existing = None
        if existing == list(classes):
            return False
        described = f"the classes {existing}" if isinstance(existing, list) else "a classes.json it cannot read"
        raise OutputFolderError(
            f"{flag} {out} holds results with {described}, not {list(classes)}: writing there would mix "
            "them. Choose an empty or new folder.")
    held = [f"{sub}/" for sub in results  # hidden files (a killed run's temp files) are no results
            if (out / sub).is_dir() and any(not p.name.startswith(".") for p in (out / sub).iterdir())]
    if held:
        raise OutputFolderError(
            f"{flag} {out} already holds {', '.join(held)} without a classes.json: their classes are unknown. "
            "Choose an empty or new folder.")
    return True
