"""Which directories are interp-steer's to replace or remove: proven by a manifest, never by file names.

Every directory the project writes (an artifact, a checkpoint, an export, an eval or demo run, a study and its
cells) gets a manifest, ``.interp-steer-manifest.json``, written last: its kind, the name it was written as,
the run it belongs to (``identity``) and the size and SHA-256 of every file under it. A manifest is data, read
with the rules archive extractors follow (the ``data`` filter of Python's ``tarfile``, PEP 706; git's refusal
of ``..`` entries): every key is a relative, normalised POSIX path inside the directory, no ``..``, no ``.``,
no empty component, listed once. A directory is the project's only while its manifest obeys those rules, every
entry under it is listed and every listed entry is there, unchanged, as the plain file it claims, with no
symbolic link on the way. Only then may it be replaced or removed, and removal goes through directory file
descriptors opened without following links, so nothing outside the directory is reachable, even by a race.
``claim`` makes two writers of one path exclude each other; its lock is created exclusively and a user's file
of that name is never opened for writing, moved or deleted.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

MANIFEST = ".interp-steer-manifest.json"
FORMAT = 2  # manifests without "format" (written before kinds and identities) are read as format 1
KINDS = ("artifact", "checkpoint", "export", "run", "study", "cell")
MAX_MANIFEST_BYTES = 16 << 20  # a study's manifest is a few kB; a larger one is not one interp-steer wrote
MAX_DEPTH = 64  # folders the project nests: a handful
MAX_KEY = 4096  # PATH_MAX
_CHUNK = 1 << 20
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO never blocks the open
_HEX = set("0123456789abcdef")


def umask() -> int:
    """The process umask (read without changing it for longer than two system calls)."""
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(path: Path, directory: bool) -> None:
    """Give ``path`` the mode a plain ``mkdir``/``open`` would have (``mkdtemp``/``mkstemp`` make them private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def sha256(path: Path) -> str:
    fd = os.open(path, _READ)
    try:
        return _hash_fd(fd)
    finally:
        os.close(fd)


def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------- the manifest as data

class _Refused(Exception):
    """Why a directory is not the project's (its message); raised inside, returned as text."""


def key_problem(key: object) -> str | None:
    """Why ``key`` cannot name a file inside a directory (None if it can): a relative, normalised POSIX path."""
    if not isinstance(key, str) or not key:
        return "is empty"
    if len(key) > MAX_KEY:
        return f"is longer than {MAX_KEY} characters"
    try:
        raw = os.fsencode(key)
    except UnicodeEncodeError:
        return "is not a file name (a lone surrogate escape)"
    if b"\0" in raw or "\\" in key:
        return "holds a NUL or a backslash"
    if key.startswith("/"):
        return "is an absolute path"
    parts = key.split("/")
    for bad, what in (("..", "a '..' component (it would leave the directory)"), (".", "a '.' component"),
                      ("", "an empty component")):
        if bad in parts:
            return f"has {what}"
    if any(len(os.fsencode(p)) > 255 for p in parts):
        return "has a component longer than 255 bytes"
    if key == MANIFEST:
        return "names the manifest itself"
    return None


def _no_repeats(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Refused(f"it lists {k!r} twice")
        out[k] = v
    return out


@dataclass(frozen=True)
class Manifest:
    """A manifest, read and checked as data (``read_manifest``)."""

    name: str
    kind: str | None  # None: written before kinds (format 1)
    identity: str | None  # the run it belongs to (``train.run_identity``), where one is known
    files: dict  # key -> {"size", "sha256"}
    skip: tuple[str, ...]  # top-level entries it does not govern (a study's cells/, each with its own manifest)
    local: tuple[str, ...]  # top-level entries that may be absent as a whole (kept where it was written)
    format: int


def _parse(raw: bytes, where: str) -> Manifest:
    bad = f"its manifest {where} is not one interp-steer writes"
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeats)
    except _Refused:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
        raise _Refused(f"its manifest {where} is unreadable") from None
    if not isinstance(doc, dict) or doc.get("written_by") != "interp-steer":
        raise _Refused(bad)
    fmt = doc.get("format", 1)
    if isinstance(fmt, bool) or fmt not in (1, FORMAT):
        raise _Refused(f"its manifest {where} has format {fmt!r}; this interp-steer reads 1 and {FORMAT}")
    name, files = doc.get("name"), doc.get("files")
    kind, identity = doc.get("kind"), doc.get("identity")
    skip, local = doc.get("skip", []), doc.get("local", [])
    if not (isinstance(name, str) and isinstance(files, dict) and isinstance(skip, list) and isinstance(local, list)
            and (identity is None or isinstance(identity, str))):
        raise _Refused(bad)
    if fmt == FORMAT and kind not in KINDS or fmt == 1 and kind is not None:
        raise _Refused(f"{bad} (kind {kind!r})")
    for group in (skip, local):
        for top in group:
            if not isinstance(top, str) or "/" in top or key_problem(top):
                raise _Refused(f"{bad}: its entry {top!r} is not one file name")
    for key, rec in files.items():
        why = key_problem(key)
        if why:
            raise _Refused(f"its manifest lists {key!r}, which {why}: a manifest names files inside its "
                           "directory only")
        if key.split("/", 1)[0] in skip:
            raise _Refused(f"its manifest lists {key!r} inside {key.split('/', 1)[0]!r}, which it says it does "
                           "not "
                           "govern")
        size, digest = (rec.get("size"), rec.get("sha256")) if isinstance(rec, dict) else (None, None)
        if (isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(digest, str)
                or len(digest) != 64 or not set(digest) <= _HEX):
            raise _Refused(f"{bad}: the entry {key!r} needs a size and a SHA-256")
    dirs = {p for key in files for p in _prefixes(key)}
    both = sorted(dirs & set(files))
    if both:
        raise _Refused(f"its manifest lists {both[0]!r} both as a file and as a folder")
    return Manifest(name, kind, identity, files, tuple(skip), tuple(local), fmt)


def _read(dfd: int, where: Path) -> Manifest:
    try:
        fd = os.open(MANIFEST, _READ, dir_fd=dfd)
    except FileNotFoundError:
        raise _Refused("it has no interp-steer manifest (interp-steer did not write it, or wrote it before "
                       "manifests)") from None
    except OSError:
        raise _Refused(f"its manifest {where / MANIFEST} is not a plain file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"its manifest {where / MANIFEST} is not a plain file")
        if st.st_size > MAX_MANIFEST_BYTES:
            raise _Refused(f"its manifest {where / MANIFEST} is {st.st_size} bytes, larger than any interp-steer "
                           f"writes ({MAX_MANIFEST_BYTES})")
        raw = os.read(fd, MAX_MANIFEST_BYTES + 1)
    finally:
        os.close(fd)
    return _parse(raw, str(where / MANIFEST))


def _prefixes(rel: str) -> list[str]:
    parts = rel.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _scan(dfd: int, skip: Sequence[str], hash_: bool) -> dict[str, tuple[os.stat_result, str | None]]:
    """``{relative path: (lstat, sha256 of a plain file or None)}`` of every entry under the open directory
    ``dfd`` but the top-level manifest and ``skip``: read through descriptors, never following a link, at most
    ``MAX_DEPTH`` folders deep (``_Refused`` beyond)."""
    out: dict[str, tuple[os.stat_result, str | None]] = {}
    stack = [("", os.dup(dfd), 0)]
    try:
        while stack:
            prefix, fd, depth = stack.pop()
            try:
                for name in sorted(os.listdir(fd)):
                    rel = prefix + name
                    if not prefix and (name == MANIFEST or name in skip):
                        continue
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    digest = None
                    if stat.S_ISDIR(st.st_mode):
                        if depth + 1 > MAX_DEPTH:
                            raise _Refused(f"it nests folders deeper than {MAX_DEPTH} levels ({rel[:80]}…), which "
                                           "interp-steer never writes")
                        stack.append((rel + "/", os.open(name, _DIR, dir_fd=fd), depth + 1))
                    elif stat.S_ISREG(st.st_mode) and hash_:
                        ffd = os.open(name, _READ, dir_fd=fd)
                        try:
                            if os.fstat(ffd).st_ino != st.st_ino:
                                raise _Refused(f"{rel!r} changed while it was read")
                            digest = _hash_fd(ffd)
                        finally:
                            os.close(ffd)
                    out[rel] = (st, digest)
            finally:
                os.close(fd)
    finally:
        for _, fd, _ in stack:
            os.close(fd)
    return out


def _check(dfd: int, where: Path, name: str | None, kinds: Sequence[str] | None) -> Manifest:
    """The manifest of the open directory ``dfd`` if the directory is provably the project's, else ``_Refused``."""
    m = _read(dfd, where)
    if name is not None and m.name != name:
        raise _Refused(f"its manifest says it was written as {m.name!r}, not {name!r}")
    if kinds is not None and m.kind is not None and m.kind not in kinds:
        raise _Refused(f"it is {_a(m.kind)} interp-steer wrote, not {' or '.join(_a(k) for k in kinds)}")
    found = _scan(dfd, m.skip, hash_=True)
    parents = {p for rel in m.files for p in _prefixes(rel)}
    for rel, (st, digest) in found.items():
        if stat.S_ISDIR(st.st_mode) and rel in parents:
            continue
        if rel not in m.files:
            raise _Refused(f"it holds {rel!r}, which interp-steer did not write there")
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"{rel!r} is no longer a plain file")
        if st.st_nlink != 1:
            raise _Refused(f"{rel!r} has {st.st_nlink - 1} other hard link(s); interp-steer writes none")
        rec = m.files[rel]
        if st.st_size != rec["size"] or digest != rec["sha256"]:
            raise _Refused(f"{rel!r} has changed since interp-steer wrote it")
    tops = {rel.split("/", 1)[0] for rel in found}
    for rel in m.files:
        if rel in found:
            continue
        top = rel.split("/", 1)[0]
        # what a committed study leaves out (its cells' adapters): only a whole top-level entry, never part of one
        absent_whole = top not in tops and (m.format == 1 or top in m.local)
        if not absent_whole:
            raise _Refused(f"its manifest lists {rel!r}, which is not there (or not as the plain file it claims)")
    return m


def _a(kind: str) -> str:
    return {"artifact": "an artifact", "export": "an export", "run": "a run directory", "study": "a study",
            "cell": "a study cell", "checkpoint": "a checkpoint"}.get(kind, kind)


@contextmanager
def _opened(directory: Path) -> Iterator[tuple[int, int, str]]:
    """``(parent fd, directory fd, name)``: the directory opened without following a link (``_Refused`` if it is
    one, or not a directory)."""
    directory = Path(directory)
    name = directory.name
    if name in ("", ".", ".."):
        directory = Path(os.path.abspath(directory))
        name = directory.name
    try:
        pfd = os.open(directory.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _Refused("it does not exist") from None
    try:
        try:
            dfd = os.open(name, _DIR, dir_fd=pfd)
        except OSError as e:
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                raise _Refused("it does not exist") from None
            raise _Refused("it is a symbolic link" if stat.S_ISLNK(st.st_mode) else "it is not a directory") from e
        try:
            yield pfd, dfd, name
        finally:
            os.close(dfd)
    finally:
        os.close(pfd)


def read_manifest(directory: Path, name: str | None = None, kinds: Sequence[str] | None = None) -> Manifest | str:
    """The manifest of ``directory`` if the directory is provably the project's (written as ``name`` and of one
    of ``kinds``, where given), else why it is not."""
    try:
        with _opened(directory) as (_, dfd, _n):
            return _check(dfd, Path(directory), name, kinds)
    except _Refused as e:
        return str(e)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"


def why_not_owned(directory: Path, name: str | None = None, kinds: Sequence[str] | None = None) -> str | None:
    """None if ``directory`` is provably the project's (written as ``name``, of one of ``kinds``, if given); else
    why not."""
    m = read_manifest(directory, name, kinds)
    return m if isinstance(m, str) else None


def write_manifest(directory: Path, name: str | None = None, skip: Sequence[str] = (), *, kind: str,
                   identity: str | None = None, local: Sequence[str] = ()) -> None:
    """List every file under ``directory`` in its manifest (written last; replaces an earlier one).

    ``kind``: one of ``KINDS``. ``name``: what the directory is written as (default: its name now), so a renamed
    copy (``X.prev``) still says it was ``X``. ``identity``: the run it belongs to. ``skip``: top-level entries
    this manifest does not govern (a study's ``cells/``, each cell with its own manifest, written by other
    processes meanwhile); they are neither listed nor checked, and never removed through this manifest.
    ``local``: top-level entries that may later be absent as a whole (what a committed study leaves out). Raises
    ``ValueError`` if something under it is neither a plain file nor a directory. The manifest goes to a fresh,
    randomly named file first (created exclusively), then is renamed over the old one: nothing is written
    through a name that exists.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    directory = Path(directory)
    try:
        with _opened(directory) as (_, dfd, dname):
            found = _scan(dfd, tuple(skip), hash_=True)
            files = {}
            for rel, (st, digest) in found.items():
                if stat.S_ISDIR(st.st_mode):
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    raise ValueError(f"{directory / rel} is not a plain file of its own (a link, a device or a "
                                     "file "
                                     "with other hard links); interp-steer writes only plain files")
                files[rel] = {"size": st.st_size, "sha256": digest}
            doc = {"written_by": "interp-steer", "format": FORMAT, "kind": kind, "name": name or dname,
                   "identity": identity, "files": files, "skip": list(skip), "local": list(local)}
            tmp = f".interp-steer-manifest.{secrets.token_hex(8)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                         dir_fd=dfd)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(doc, indent=1) + "\n")
                os.replace(tmp, MANIFEST, src_dir_fd=dfd, dst_dir_fd=dfd)
            except BaseException:
                os.unlink(tmp, dir_fd=dfd)
                raise
    except _Refused as e:
        raise ValueError(f"{directory}: {e}") from None


def remove_owned(directory: Path, name: str | None = None, kinds: Sequence[str] | None = None) -> bool:
    """Delete ``directory`` if it is provably the project's: its listed files, then the folders they leave
    empty, every one reached through directory descriptors opened without following links. Anything else is
    left alone. True if it was removed."""
    try:
        with _opened(directory) as (pfd, dfd, dname):
            m = _check(dfd, Path(directory), name, kinds)
            for rel in sorted(m.files):
                _unlink_within(dfd, rel)
            _unlink_within(dfd, MANIFEST)
            for rel in sorted({p for r in m.files for p in _prefixes(r)}, key=lambda p: -p.count("/")):
                _unlink_within(dfd, rel, folder=True)
            try:
                os.rmdir(dname, dir_fd=pfd)
            except OSError:
                return False
            return True
    except (_Refused, OSError):
        return False


def _unlink_within(dfd: int, rel: str, folder: bool = False) -> None:
    """Remove the plain file (or empty folder) ``rel`` under the open directory ``dfd``; anything else, or a link
    on the way, is left alone."""
    *parents, leaf = rel.split("/")
    fds = []
    try:
        cur = dfd
        for p in parents:
            cur = os.open(p, _DIR, dir_fd=cur)
            fds.append(cur)
        st = os.stat(leaf, dir_fd=cur, follow_symlinks=False)
        if folder and stat.S_ISDIR(st.st_mode):
            os.rmdir(leaf, dir_fd=cur)
        elif not folder and stat.S_ISREG(st.st_mode):
            os.unlink(leaf, dir_fd=cur)
    except OSError:
        pass
    finally:
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------------------------------- claims

LOCK_MARK = b"interp-steer lock: held while a process writes the path beside it\n"
_held: dict[str, int] = {}  # lock path -> how many nested claims this process holds on it
_fds: dict[str, tuple[int, int, str]] = {}  # lock path -> (parent fd, lock fd, lock name)


def lock_path(path: Path) -> Path:
    return Path(path).with_name(f".{Path(path).name}.lock")


def _in_the_way(lock: Path, path: Path, what: str) -> FileExistsError:
    return FileExistsError(f"{lock} is in the way: interp-steer uses that name as the lock for writing {path}, "
                           "and "
                           f"it is {what}, not a lock interp-steer made; it will not open, move or delete it. "
                           "Move "
                           "it away or choose another output path.")


def _busy(lock: Path, path: Path) -> FileExistsError:
    return FileExistsError(f"another process is writing {path} right now (it holds {lock}); wait for it to finish "
                           "or choose another output path")


def _create_lock(pfd: int, name: str) -> int | None:
    """A new lock at ``name``, already holding its ``flock``, with its mark written before the name exists (a
    randomly named file created exclusively, then hard-linked to ``name``: exclusive too); None if ``name``
    appeared meanwhile."""
    tmp = f"{name}.{secrets.token_hex(8)}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=pfd)
    try:
        os.write(fd, LOCK_MARK)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        try:
            os.link(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileExistsError:
            os.close(fd)
            return None
        return fd
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.unlink(tmp, dir_fd=pfd)


def _take_lock(pfd: int, name: str, lock: Path, path: Path) -> int:
    """The lock ``name`` in the open directory ``pfd``, created or (a project lock left there) opened, flocked."""
    while True:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            fd = _create_lock(pfd, name)
            if fd is not None:
                return fd
            continue
        if stat.S_ISLNK(st.st_mode):
            raise _in_the_way(lock, path, "a symbolic link")
        if stat.S_ISDIR(st.st_mode):
            raise _in_the_way(lock, path, "a directory")
        if not stat.S_ISREG(st.st_mode):
            raise _in_the_way(lock, path, "not a plain file")
        try:
            fd = os.open(name, _READ, dir_fd=pfd)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise _in_the_way(lock, path, f"a file interp-steer cannot read ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise _busy(lock, path) from None
            raise
        # held: whoever made it has finished making it; it must be a lock of ours, still at that name
        now = os.fstat(fd)
        try:
            same = os.stat(name, dir_fd=pfd, follow_symlinks=False).st_ino == now.st_ino
        except FileNotFoundError:
            same = False
        if not same:  # a finishing holder removed it: start again
            os.close(fd)
            continue
        if now.st_nlink != 1 or now.st_size != len(LOCK_MARK) or os.pread(fd, len(LOCK_MARK) + 1, 0) != LOCK_MARK:
            os.close(fd)
            raise _in_the_way(lock, path, "a file interp-steer did not make")
        return fd


@contextmanager
def claim(path: Path) -> Iterator[None]:
    """Hold the only right to write ``path`` (and its ``.prev``/``.ckpt`` siblings) among processes, for the
    ``with`` block: a second writer gets ``FileExistsError`` at once. Re-entrant within one process.

    The lock is ``.NAME.lock`` beside ``path`` (an advisory ``flock``, released by the kernel if the process
    dies), created exclusively with its mark and removed when the last claim ends; a user's file, directory or
    link of that name is left as it is and the claim refused.
    """
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise FileExistsError(f"{path} names no directory of its own; give an output path such as runs/x")
    lock = lock_path(path)
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
    pfd = os.open(lock.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _take_lock(pfd, lock.name, lock, path)
    except BaseException:
        os.close(pfd)
        _remove_made(made)
        raise
    _held[key], _fds[key] = 1, (pfd, fd, lock.name)
    ok = False
    try:
        yield
        ok = True
    finally:
        _held[key] -= 1
        if _held[key] == 0:
            del _held[key]
            pfd, fd, name = _fds.pop(key)
            try:  # only the lock this claim holds, if it is still at that name
                if os.stat(name, dir_fd=pfd, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    os.unlink(name, dir_fd=pfd)
            except FileNotFoundError:
                pass
            os.close(fd)
            os.close(pfd)
            if not ok:  # a failed command leaves no directory it created
                _remove_made(made)


def _remove_made(made: list[Path]) -> None:
    for p in made:
        try:
            p.rmdir()
        except OSError:
            break
