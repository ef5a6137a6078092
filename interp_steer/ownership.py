"""Which directories are interp-steer's to replace or remove: proven by a manifest, never by file names.

Every directory the project writes (an artifact, a checkpoint, an export, an eval or demo run) gets a manifest,
``.interp-steer-manifest.json``, written last: the name the directory was written as, and the size and SHA-256
of every file under it. A directory is the project's only while its manifest is readable, lists every entry
under it and every listed file is unchanged; only then may it be replaced or removed, and then only the listed
files are. A symbolic link is never the project's. ``claim`` makes two writers of one path exclude each other.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

MANIFEST = ".interp-steer-manifest.json"
_CHUNK = 1 << 20


def umask() -> int:
    """The process umask (read without changing it for longer than two system calls)."""
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(path: Path, directory: bool) -> None:
    """Give ``path`` the mode a plain ``mkdir``/``open`` would have (``mkdtemp``/``mkstemp`` make them private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _walk(directory: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative path, lstat)`` of every entry under ``directory``, never following a link."""
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        st = entry.stat(follow_symlinks=False)
        rel = entry.name
        yield rel, st
        if stat.S_ISDIR(st.st_mode):
            for sub, sst in _walk(Path(entry.path)):
                yield f"{rel}/{sub}", sst


def _skipped(rel: str, skip: Iterable[str]) -> bool:
    """Whether ``rel`` is a lock file (``.NAME.lock``, ``claim``'s) or lies in a top-level entry of ``skip``."""
    name = rel.rsplit("/", 1)[-1]
    return (name.startswith(".") and name.endswith(".lock")) or rel.split("/", 1)[0] in skip


def write_manifest(directory: Path, name: str | None = None, skip: Sequence[str] = ()) -> None:
    """List every file under ``directory`` in its manifest (written last; replaces an earlier one).

    ``name``: what the directory is written as (default: its name now), so a renamed copy (``X.prev``) still
    says it was ``X``. ``skip``: top-level entries this manifest does not govern (a study's ``cells/``, each
    cell with its own manifest, written by other processes meanwhile); they are neither listed nor checked,
    and never removed through this manifest. Raises ``ValueError`` if something under it is neither a file
    nor a directory.
    """
    files = {}
    for rel, st in _walk(directory):
        if rel == MANIFEST or stat.S_ISDIR(st.st_mode) or _skipped(rel, skip):
            continue
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{directory / rel} is not a plain file; interp-steer writes only plain files")
        files[rel] = {"size": st.st_size, "sha256": sha256(directory / rel)}
    doc = {"written_by": "interp-steer", "name": name or directory.name, "files": files, "skip": list(skip)}
    tmp = directory / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST)


def _read_manifest(directory: Path) -> dict | str:
    m = directory / MANIFEST
    if m.is_symlink() or not m.is_file():
        return "it has no interp-steer manifest (interp-steer did not write it, or wrote it before manifests)"
    try:
        doc = json.loads(m.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return f"its manifest {m} is unreadable"
    files = doc.get("files") if isinstance(doc, dict) else None
    skip = doc.get("skip", []) if isinstance(doc, dict) else None
    if not (isinstance(skip, list) and all(isinstance(x, str) and x and "/" not in x for x in skip)):
        return f"its manifest {m} is not one interp-steer writes"
    if not (isinstance(files, dict) and isinstance(doc.get("name"), str) and all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("size"), int)
            and isinstance(v.get("sha256"), str) for k, v in files.items())):
        return f"its manifest {m} is not one interp-steer writes"
    return doc


def why_not_owned(directory: Path, name: str | None = None) -> str | None:
    """None if ``directory`` is provably the project's (and was written as ``name``, if given); else why not."""
    if directory.is_symlink():
        return "it is a symbolic link"
    if not directory.is_dir():
        return "it is not a directory"
    doc = _read_manifest(directory)
    if isinstance(doc, str):
        return doc
    if name is not None and doc["name"] != name:
        return f"its manifest says it was written as {doc['name']!r}, not {name!r}"
    files = doc["files"]
    parents = {p for rel in files for p in _prefixes(rel)}
    skip = doc.get("skip", [])
    for rel, st in _walk(directory):
        if rel in (MANIFEST, f"{MANIFEST}.tmp") or _skipped(rel, skip):
            continue
        if stat.S_ISDIR(st.st_mode) and rel in parents:
            continue
        if rel not in files:
            return f"it holds {rel!r}, which interp-steer did not write there"
        if not stat.S_ISREG(st.st_mode):
            return f"{rel!r} is no longer a plain file"
        rec = files[rel]
        if st.st_size != rec["size"] or sha256(directory / rel) != rec["sha256"]:
            return f"{rel!r} has changed since interp-steer wrote it"
    return None


def _prefixes(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def remove_owned(directory: Path, name: str | None = None) -> bool:
    """Delete ``directory`` if it is provably the project's: its listed files, then the folders they leave
    empty. Anything else is left alone. True if it was removed."""
    if why_not_owned(directory, name) is not None:
        return False
    files = _read_manifest(directory)["files"]  # type: ignore[index]
    for rel in files:
        (directory / rel).unlink(missing_ok=True)
    (directory / MANIFEST).unlink(missing_ok=True)
    for rel in sorted({p for r in files for p in _prefixes(r)}, key=lambda p: -p.count("/")):
        try:
            (directory / rel).rmdir()
        except OSError:
            pass
    try:
        directory.rmdir()
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- claims

_held: dict[str, int] = {}  # lock path -> how many nested claims this process holds on it
_fds: dict[str, int] = {}


@contextmanager
def claim(path: Path) -> Iterator[None]:
    """Hold the only right to write ``path`` (and its ``.prev``/``.ckpt`` siblings) among processes, for the
    ``with`` block: a second writer gets ``FileExistsError`` at once. Re-entrant within one process.

    The lock is ``.NAME.lock`` beside ``path`` (an advisory ``flock``, released by the kernel if the process
    dies), removed when the last claim ends.
    """
    path = Path(path)
    lock = path.with_name(f".{path.name}.lock")
    key = str(lock.parent.resolve() / lock.name)
    if key in _held:
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    made = [p for p in [lock.parent, *lock.parent.parents] if not p.exists()]  # created here; removed on failure
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise FileExistsError(f"another process is writing {path} right now (it holds {lock}); wait for it "
                                      "to finish or choose another output path") from None
            raise
        try:  # the file we locked must still be the one at that name (a finishing holder may have removed it)
            if os.fstat(fd).st_ino == os.stat(lock, follow_symlinks=False).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _held[key], _fds[key] = 1, fd
    ok = False
    try:
        yield
        ok = True
    finally:
        _held[key] -= 1
        if _held[key] == 0:
            del _held[key]
            try:
                os.unlink(lock)
            except FileNotFoundError:
                pass
            os.close(_fds.pop(key))
            for p in made if not ok else []:  # a failed command leaves no directory it created
                try:
                    p.rmdir()
                except OSError:
                    break
