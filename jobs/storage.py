"""Every file-system effect of Parroter, and where every file goes.

A watched folder is a trust boundary: whoever can write into it can drop anything there,
symbolic links included, and can swap a folder for a link at any moment. So no path below
a configured root is ever opened by name. A root (a WATCH_ROOTS entry, an area of
MEDIA_ROOT) is trusted configuration: it is resolved and opened as a directory. Every
further component is opened relative to its parent's descriptor with O_NOFOLLOW, refusing
`..`, absolute parts and links: the RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS of openat2(2),
which Python 3.11 does not offer. Every later operation (stat, open, rename, unlink,
mkdir, listing) names one entry of a folder held open, so a folder swapped after it was
opened is not followed either: the operation still happens in the folder that was opened.

A claimed file is known by its inode, size and mtime (FileIdentity). What is found
at its path is checked against them before it is read or moved; a different file is not
touched.

A file appears under its real name only once complete: it is written under a temporary
name in the same folder, fsynced, renamed, and the rename made durable (atomic_write).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import re
import secrets
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO, NoReturn, Protocol

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone

from .pipeline import ImageRejected, safe_stem

if TYPE_CHECKING:
    from .models import Image

logger = logging.getLogger(__name__)

# The areas of MEDIA_ROOT: zips, originals of finished images, originals that failed (with
# a note beside each), and uploaded files waiting for their run.
ARCHIVES = "archives"
ORIGINALS = "originals"
FAILED = "failed"
UPLOADS = "uploads"
AREAS = (ARCHIVES, ORIGINALS, FAILED, UPLOADS)
NOTE_SUFFIX = ".error.txt"

# Names a person or a program leaves while a file is still arriving, and system clutter.
JUNK_PATTERNS = (".*", "~*", "*.part", "*.tmp", "*.crdownload", "*.download", "Thumbs.db")
JUNK_DIRECTORIES = ("__MACOSX",)
# What a browser writes a download into while it lasts. Firefox also saves the final name at
# once, empty, and renames the partial file over it when done.
PARTIAL_SUFFIXES = (".part", ".crdownload", ".download")
MAX_NAME_BYTES = 200
# The lengths of Image.name and Image.source_path.
MAX_STORED_NAME = 1024
MAX_STORED_PATH = 2048

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO dropped in the folder must not block the open.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class NotBeneath(Exception):
    """A path that would leave its configured root: it lies outside every root, has a `..`
    part, or a folder on the way is a symbolic link. Nothing was opened through it."""


class FileChanged(Exception):
    """What a claimed path holds now is not the file that was claimed (another inode, size
    or mtime): it was replaced, or written to, since."""


# --- Who a file is -------------------------------------------------------------------------


def _int64(value: int) -> int:
    """An unsigned 64-bit st_dev or st_ino as the signed number a BigIntegerField holds."""
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(frozen=True)
class FileIdentity:
    """Which file a claim is about. Device and inode are None on records made before they
    were kept: size and mtime alone decide then."""

    size: int
    mtime_ns: int
    device: int | None = None
    inode: int | None = None

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(status.st_size, status.st_mtime_ns, _int64(status.st_dev), _int64(status.st_ino))

    @classmethod
    def claimed(cls, image: Image) -> FileIdentity:
        return cls(image.file_size, image.mtime_ns, image.device, image.inode)

    def matches(self, status: os.stat_result) -> bool:
        found = FileIdentity.of(status)
        if (found.size, found.mtime_ns) != (self.size, self.mtime_ns):
            return False
        if self.inode is None:
            return True
        # Not st_dev: on NFS and SMB it is a number each client (each mount) gives the share,
        # so the host that claimed a file and the host that reads it see different ones. The
        # path fixes the file system (it is reached without links from its root); the inode
        # tells the file apart within it.
        return found.inode == self.inode


# --- Folders held open ---------------------------------------------------------------------


def _named(exc: OSError, path: Path) -> OSError:
    """The same error, naming the whole path rather than the one component it was given."""
    return type(exc)(exc.errno, exc.strerror, str(path))


def _check_name(name: str, folder: Path) -> None:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise NotBeneath(f"{folder / name} leaves its folder ({name!r} is not a plain name)")


class Folder:
    """A directory held open, reached from a trusted root one component at a time.

    Its operations name one entry of it, through its descriptor: whatever happens to the
    path it was reached by afterwards (a folder renamed, a link put in its place), they
    act in this folder and nowhere else. `path` is for messages and records only.
    Closing it closes the descriptors of the whole walk.
    """

    def __init__(self, path: Path, fds: list[int], names: list[str]):
        self.path = path
        self._fds = fds  # the root's first, this folder's last
        self._names = names  # the components walked below the root

    @property
    def fd(self) -> int:
        return self._fds[-1]

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stat(self, name: str) -> os.stat_result:
        """The entry itself (a link is not followed)."""
        _check_name(name, self.path)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError as exc:
            raise _named(exc, self.path / name) from None

    def find(self, name: str) -> os.stat_result | None:
        try:
            return self.stat(name)
        except FileNotFoundError:
            return None

    def open_read(self, name: str) -> int:
        """A descriptor to read the entry; ELOOP (an OSError) if it is a link."""
        _check_name(name, self.path)
        try:
            return os.open(name, _READ, dir_fd=self.fd)
        except OSError as exc:
            raise _named(exc, self.path / name) from None

    def unlink(self, name: str, missing_ok: bool = True) -> None:
        _check_name(name, self.path)
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError as exc:
            if not missing_ok:
                raise _named(exc, self.path / name) from None
        except OSError as exc:
            raise _named(exc, self.path / name) from None

    def entries(self) -> list[os.DirEntry[str]]:
        # scandir on a descriptor works on a duplicate of it; entries stat through it.
        return list(os.scandir(self.fd))

    def fsync(self) -> None:
        """Make the renames and unlinks in this folder durable."""
        os.fsync(self.fd)

    def remove(self) -> None:
        """Remove this (empty) folder from its parent."""
        if not self._names:
            raise NotBeneath(f"{self.path} is a root; roots are not removed")
        os.rmdir(self._names[-1], dir_fd=self._fds[-2])


def beneath(path: Path, roots: Iterable[Path]) -> tuple[Path, tuple[str, ...]]:
    """The root `path` lies under (resolved) and its components below that root.

    Lexical only: nothing is opened. The outermost matching root wins, so that the most
    components are walked without following links.
    """
    path = Path(path)
    if not path.is_absolute() or ".." in path.parts:
        raise NotBeneath(f"{path} is outside the configured folders")
    best: tuple[Path, Path] | None = None
    for root in roots:
        real = Path(root).resolve()
        for prefix in (Path(root), real):
            if path.is_relative_to(prefix) and (
                best is None or len(prefix.parts) < len(best[0].parts)
            ):
                best = (prefix, real)
    if best is None:
        raise NotBeneath(f"{path} is outside the configured folders")
    return best[1], path.relative_to(best[0]).parts


def open_folder(path: Path, roots: Iterable[Path], *, create: bool = False) -> Folder:
    """Open the folder `path`, beneath one of `roots`, without following any link.

    With `create`, missing folders are made on the way (the root too, which is trusted).
    Raises NotBeneath when the path leaves its root, OSError when a part is missing.
    """
    root, parts = beneath(path, roots)
    return _walk_down(root, parts, create=create)


def _walk_down(root: Path, parts: Sequence[str], *, create: bool) -> Folder:
    if create:
        os.makedirs(root, exist_ok=True)
    try:
        fds = [os.open(root, _DIRECTORY)]
    except OSError as exc:
        raise _named(exc, root) from None
    names: list[str] = []
    shown = root
    try:
        for name in parts:
            _check_name(name, shown)
            shown = shown / name
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, dir_fd=fds[-1])
            try:
                fds.append(os.open(name, _DIRECTORY, dir_fd=fds[-1]))
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(fds[-1], name):
                    raise NotBeneath(
                        f"{shown} is a symbolic link; links are not followed, so nothing "
                        "outside the folder is reached"
                    ) from None
                raise _named(exc, shown) from None
            names.append(name)
    except BaseException:
        for fd in reversed(fds):
            os.close(fd)
        raise
    return Folder(shown, fds, names)


def _is_link(parent: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


# --- Where files go ------------------------------------------------------------------------


def media_area(area: str) -> Path:
    """An area of MEDIA_ROOT: ARCHIVES, ORIGINALS, FAILED or UPLOADS."""
    return Path(settings.MEDIA_ROOT) / area


def source_roots(path: Path) -> list[Path]:
    """Where the original at `path` may be read from: the watch roots, or for a path in
    MEDIA_ROOT the upload area and where originals are kept (reprocessing reads them again;
    only we write there).

    Never both: a watch root may hold MEDIA_ROOT, and walked from there (the outermost root
    wins) an area that is a link to another disk would be refused.
    """
    media = Path(settings.MEDIA_ROOT)
    if path.is_relative_to(media) or path.is_relative_to(media.resolve()):
        return [media_area(area) for area in (UPLOADS, ORIGINALS, FAILED)]
    return [Path(root) for root in settings.WATCH_ROOTS]


def kept_roots() -> list[Path]:
    return [media_area(ORIGINALS), media_area(FAILED)]


def archive_path(image: Image) -> Path:
    """Where this run of an image writes its zip.

    Unique per image and the same on every try of its first run. An image that already has
    an archive (it is being reprocessed) gets a name of this run's own, so that the old zip
    stays whole and recorded until the new one is.
    """
    day = timezone.localtime(image.queued_at).strftime("%Y/%m/%d")
    name = f"{image.id}-{safe_stem(image.name)}"
    if image.archive and image.started_at:
        name += timezone.localtime(image.started_at).strftime("-%Y%m%d-%H%M%S-%f")
    return media_area(ARCHIVES) / day / f"{name}.zip"


def kept_path(image: Image) -> Path:
    """Where the original goes once its image is final: processed or failed area."""
    area = FAILED if image.status == "failed" else ORIGINALS  # Image.Status.FAILED
    day = timezone.localtime(image.queued_at).strftime("%Y/%m/%d")
    name = _truncate_name(Path(image.name).name)
    return media_area(area) / day / f"{image.id}-{name}"


def _truncate_name(name: str) -> str:
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) <= MAX_NAME_BYTES:
        return name
    suffix = Path(name).suffix[:16]
    stem = encoded[: MAX_NAME_BYTES - len(suffix.encode())].decode("utf-8", "ignore")
    return stem + suffix


# --- Writing files whole -------------------------------------------------------------------


# The longest file name the file systems we write to take (NAME_MAX on Linux), in bytes.
NAME_MAX_BYTES = 255
# What _temporary_name adds after its prefix: 8 random hex digits and ".part".
_TEMPORARY_TAIL_BYTES = len("0123abcd.part")


def _temporary_name(name: str, tag: str = "") -> str:
    # Named after the destination, so that one left by a killed process can be found.
    return _temporary_prefix(name, tag) + f"{secrets.token_hex(4)}.part"


def _temporary_prefix(name: str, tag: str = "") -> str:
    """`.<name>.<tag>.`, the name cut short (in UTF-8 bytes) so that the temporary name
    stays within NAME_MAX_BYTES: a long destination name (a 200-byte stem, an id, a
    reprocessing date) plus a run's 32-digit tag would not."""
    room = NAME_MAX_BYTES - _TEMPORARY_TAIL_BYTES - len(f"..{tag}." if tag else "..")
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) > room:
        name = encoded[:room].decode("utf-8", "ignore")
    return f".{name}." + (f"{tag}." if tag else "")


@contextlib.contextmanager
def atomic_write(folder: Folder, name: str, tag: str = "") -> Iterator[BinaryIO]:
    """A file to write that appears as `name` in `folder` only complete, or not at all.

    The temporary file is named after `name` and the writer's `tag`
    (`.<name>.<tag>.<random>.part`), so that one a killed process left can be found and
    removed, and only that one.
    """
    _check_name(name, folder.path)
    for _ in range(100):
        temporary = _temporary_name(name, tag)
        try:
            fd = os.open(temporary, _CREATE, 0o600, dir_fd=folder.fd)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise _named(exc, folder.path / temporary) from None
    else:
        raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder.path / name))
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.replace(temporary, name, src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
        except OSError as exc:
            raise _named(exc, folder.path / name) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary, dir_fd=folder.fd)
        raise
    folder.fsync()


@contextlib.contextmanager
def atomic_file(destination: Path, root: Path | None = None, tag: str = "") -> Iterator[BinaryIO]:
    """A file to write that appears at `destination` only complete, or not at all.

    The folders from `root` down are walked without following links and made when missing.
    They stay even if nothing is written: another process may be writing into the same new
    day folder at that moment, and removing it would fail that process. `root` defaults to
    the area of
    MEDIA_ROOT the destination lies in; a destination outside MEDIA_ROOT (a benchmark's
    own output) starts from the nearest folder above it that exists, taken as given.
    """
    if root is None:
        root = _default_root(destination)
    folder = open_folder(destination.parent, [root], create=True)
    with folder, atomic_write(folder, destination.name, tag) as handle:
        yield handle


def _default_root(destination: Path) -> Path:
    try:
        areas = [media_area(area) for area in AREAS]
    except ImproperlyConfigured:  # used without Django, by a benchmark
        areas = []
    for area in areas:
        if destination.is_relative_to(area) or destination.is_relative_to(area.resolve()):
            return area
    root = destination.parent
    while not root.is_dir() and root != root.parent:
        root = root.parent
    return root


# --- Finding files in a watched folder -----------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    path: Path
    name: str
    size: int
    mtime_ns: int
    device: int | None = None
    inode: int | None = None


@dataclass
class Scan:
    ready: list[Candidate] = field(default_factory=list)
    unstable: int = 0
    ignored: int = 0
    # Files whose names the database cannot hold (not UTF-8, or too long): left in place.
    unstorable: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Arrival:
    """A file renamed into a watched folder, as it was just after the rename (jobs/watcher.py).

    A rename moves a whole file at once: a writer that renames its finished file in (a
    browser, a sync client, rsync, a file manager on the same file system) is done when the
    name appears, so such a file need not wait SETTLE_SECONDS. It is taken early only while
    all of this is unchanged: a write after the rename moves mtime or ctime, and the file
    waits for the settle rule like any other. The device is carried but not compared: the
    watch's host and the sweep's may number a network share's mount differently.
    """

    device: int = field(compare=False)
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, status: os.stat_result) -> Arrival:
        return cls(
            status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns
        )

    @classmethod
    def parse(cls, items: object) -> list[Arrival]:
        """Arrivals from a sweep task's `arrived` argument: a list of five-number lists.

        Anything else is dropped with a warning, never an error: an arrival only lets a file
        skip the settle wait, so without it the file is still taken, a little later.
        """
        if not items:
            return []
        arrivals = []
        for item in items if isinstance(items, list) else [items]:
            if (
                isinstance(item, list | tuple)
                and len(item) == 5
                and all(isinstance(number, int) and not isinstance(number, bool) for number in item)
            ):
                arrivals.append(cls(*item))
            else:
                logger.warning("ignoring an arrival that is not five whole numbers: %.80r", item)
        return arrivals


# Whatever the case: Windows writes THUMBS.DB and FILE.TMP as readily. One expression for
# all the patterns: every sweep asks it of every name in the folder.
_JUNK_NAME = re.compile(
    "|".join(fnmatch.translate(pattern.casefold()) for pattern in JUNK_PATTERNS)
)
_JUNK_DIRECTORY_NAMES = frozenset(name.casefold() for name in JUNK_DIRECTORIES)


def is_junk_directory(name: str) -> bool:
    return name.casefold() in _JUNK_DIRECTORY_NAMES


def is_junk(name: str) -> bool:
    return _JUNK_NAME.match(name.casefold()) is not None


def scan(
    folder: Path,
    settle_seconds: float,
    exclude: Iterable[Path] = (),
    arrived: Iterable[Arrival] = (),
) -> Scan:
    """List files under folder; only those unchanged for settle_seconds are ready, and
    those renamed in and unchanged since (`arrived`, see Arrival).

    The folder is reached from its watch root, and every subfolder from its parent, without
    following links: a link is listed as a file (so that it fails with a reason rather
    than sitting there unexplained), never entered.
    """
    result = Scan()
    excluded = {Path(path) for path in exclude}
    complete = set(arrived)
    # ctime moves on every write and on every rename into the folder, and cannot be set
    # back by the writer (unlike mtime, which `cp -p` preserves): "unchanged since" uses it.
    now = time.time_ns()
    settled_before = now - int(settle_seconds * 1e9)
    try:
        top = open_folder(folder, settings.WATCH_ROOTS)
    except OSError as exc:
        logger.warning("cannot list %s: %s", folder, exc)
        return result
    with top:
        for name, status in _walk(top, folder, excluded, result):
            changed = status.st_ctime_ns
            if status.st_mtime_ns <= now:
                # An mtime ahead of now is no sign of a write, which stamps the writer's now:
                # a camera's clock set ahead, FAT's local times read as UTC, kept by `cp -p`.
                changed = max(changed, status.st_mtime_ns)
            if changed > settled_before and Arrival.of(status) not in complete:
                result.unstable += 1
                continue
            path = folder / name
            if not _storable(str(path), name):
                result.ignored += 1
                result.unstorable.append(os.fsencode(name).decode("utf-8", "backslashreplace"))
                continue
            identity = FileIdentity.of(status)
            result.ready.append(
                Candidate(
                    path=path,
                    name=name,
                    size=identity.size,
                    mtime_ns=identity.mtime_ns,
                    device=identity.device,
                    inode=identity.inode,
                )
            )
    return result


def _storable(path: str, name: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return len(name) <= MAX_STORED_NAME and len(path) <= MAX_STORED_PATH


def _walk(
    top: Folder, folder: Path, excluded: set[Path], result: Scan
) -> Iterator[tuple[str, os.stat_result]]:
    """(relative name, lstat) of every file and link below `top`, depth first.

    One descriptor per level is held, so a wide folder does not run out of them.
    """
    # Each level: its descriptor, its name below the top ("" or "a/b/"; strings, not paths:
    # every sweep joins it with every name in the folder), and its subfolders still to do.
    stack: list[tuple[int, str, Iterator[str]]] = []
    fd = os.dup(top.fd)
    relative = ""
    try:
        while True:
            subfolders: list[str] = []
            try:
                entries = list(os.scandir(fd))
            except OSError as exc:
                logger.warning("cannot list %s: %s", folder / relative, exc)
                entries = []
            downloads: set[str] | None = None  # read only once an empty file is met
            for entry in entries:
                if is_junk(entry.name):
                    result.ignored += 1
                elif entry.is_dir(follow_symlinks=False):
                    if is_junk_directory(entry.name) or folder / relative / entry.name in excluded:
                        result.ignored += 1
                    else:
                        subfolders.append(entry.name)
                elif entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    try:
                        status = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if status.st_size == 0:
                        if downloads is None:
                            downloads = _partial_downloads(entries)
                        if _downloading(entry.name, downloads):
                            result.unstable += 1  # a placeholder: its download still arrives
                            continue
                    yield relative + entry.name, status
                else:
                    result.ignored += 1
            stack.append((fd, relative, iter(subfolders)))
            fd = -1
            while stack and fd < 0:
                parent, parent_relative, remaining = stack[-1]
                name = next(remaining, None)
                if name is None:
                    os.close(parent)
                    stack.pop()
                    continue
                try:
                    # A folder swapped for a link since it was listed is refused here.
                    fd = os.open(name, _DIRECTORY, dir_fd=parent)
                except OSError as exc:
                    logger.warning("not entering %s: %s", folder / parent_relative / name, exc)
                    continue
                relative = f"{parent_relative}{name}/"
            if fd < 0:
                return
    finally:
        if fd >= 0:
            os.close(fd)
        for level, _, _ in stack:
            os.close(level)


def _partial_downloads(entries: list[os.DirEntry[str]]) -> set[str]:
    """The names of a folder's partial downloads, casefolded."""
    return {
        folded
        for folded in (entry.name.casefold() for entry in entries)
        if folded.endswith(PARTIAL_SUFFIXES)
    }


def _downloading(name: str, downloads: set[str]) -> bool:
    """Whether a partial download of `name` sits beside it."""
    folded = name.casefold()
    return any(folded + suffix in downloads for suffix in PARTIAL_SUFFIXES)


# --- Reading and moving originals ----------------------------------------------------------


def read_original(path: Path, claimed: FileIdentity | None, max_bytes: int) -> bytes:
    """The bytes of a claimed file, reached from its root without following any link.

    Raises NotBeneath when the path leaves the configured folders (outside them, or a
    folder on the way is a link now) and FileChanged when the file there is not the one
    claimed, or it changed size while being read: in both cases nothing is returned.
    ImageRejected when it is itself a link (symbolic or hard), not a regular file, or over
    max_bytes.
    """
    with open_folder(path.parent, source_roots(path)) as folder:
        try:
            fd = folder.open_read(path.name)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            if claimed is not None and not claimed.matches(folder.stat(path.name)):
                raise FileChanged(f"{path} is not the file that was claimed") from None
            raise ImageRejected(
                "symbolic link: links are not followed, so nothing outside the folder is read"
            ) from None
    with os.fdopen(fd, "rb") as handle:
        status = os.fstat(handle.fileno())
        if claimed is not None and not claimed.matches(status):
            raise FileChanged(f"{path} is not the file that was claimed")
        if not stat.S_ISREG(status.st_mode):
            raise ImageRejected("not a regular file")
        if status.st_nlink > 1:
            # Another name of the same file may be anywhere on this file system, outside the
            # folders: O_NOFOLLOW cannot tell, so no file with more than one name is read.
            raise ImageRejected(
                f"hard link: this file has {status.st_nlink} names, and another may be "
                "outside the folder, so it is not read; copy the file in instead of linking it"
            )
        if status.st_size > max_bytes:
            raise ImageRejected(f"file is {status.st_size:,} bytes, over the {max_bytes:,} limit")
        # Never more than was checked: a writer still appending cannot make this read grow.
        data = handle.read(status.st_size + 1)
        if len(data) != status.st_size:
            raise FileChanged(f"{path} changed size while it was being read")
        return data


def move_original(
    source: Path, claimed: FileIdentity, destination: Path, note: str | None = None
) -> Path | None:
    """Move a claimed original to `destination`, in the originals or failed area.

    Returns where the original is now, or None when it is gone. Idempotent, and safe when
    a worker and a sweep's repair both get here: whoever comes second finds it at its
    destination already. With `note`, a text file saying why is written beside it.
    Raises NotBeneath or FileChanged, having touched nothing, when the source path now
    leads through a link or holds another file than the one claimed.
    """
    try:
        origin = open_folder(source.parent, source_roots(source))
    except FileNotFoundError:
        return destination if _kept_exists(destination) else None
    except NotBeneath:
        # Put away by the other hand before the folder was swapped: that stands.
        if _kept_exists(destination):
            return destination
        raise
    with origin:
        status = origin.find(source.name)
        if status is None or not claimed.matches(status):
            if _kept_exists(destination):
                return destination
            if status is None:
                return None
            raise FileChanged(f"{source} is not the file that was claimed")
        with open_folder(destination.parent, kept_roots(), create=True) as target:
            try:
                _move(origin, source.name, claimed, target, destination.name)
            except FileNotFoundError:
                # Moved by the other hand between our look and our rename.
                return destination if target.find(destination.name) else None
            if note is not None:
                _write_note(target, destination.name, note)
    return destination


def _kept_exists(destination: Path) -> bool:
    try:
        with open_folder(destination.parent, kept_roots()) as folder:
            return folder.find(destination.name) is not None
    except (OSError, NotBeneath):
        return False


def _move(origin: Folder, name: str, claimed: FileIdentity, target: Folder, new: str) -> None:
    """Rename, or copy-fsync-unlink across file systems; the source goes only when safe."""
    try:
        os.rename(name, new, src_dir_fd=origin.fd, dst_dir_fd=target.fd)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise _named(exc, origin.path / name) from None
        _copy_across(origin, name, claimed, target, new)
    else:
        moved = target.find(new)
        if moved is not None and not claimed.matches(moved):
            _move_back(origin, name, target, new)
    target.fsync()


def _move_back(origin: Folder, name: str, target: Folder, new: str) -> NoReturn:
    """Undo a rename that took another file than the one claimed (it replaced the claimed
    one between the look and the rename): back to where it was found, never over a file
    put there since (a link cannot replace a name, a rename could). Raises FileChanged."""
    try:
        os.link(new, name, src_dir_fd=target.fd, dst_dir_fd=origin.fd, follow_symlinks=False)
    except OSError as exc:
        target.fsync()
        raise FileChanged(
            f"{origin.path / name} was replaced just before it was moved, and the new file "
            f"could not be put back ({exc.strerror}): it is at {target.path / new}"
        ) from None
    target.unlink(new, missing_ok=False)
    origin.fsync()
    target.fsync()
    raise FileChanged(f"{origin.path / name} is not the file that was claimed")


def _copy_across(
    origin: Folder, name: str, claimed: FileIdentity, target: Folder, new: str
) -> None:
    status = origin.stat(name)
    if stat.S_ISLNK(status.st_mode):
        # A link is kept as the link it was (its target is never opened).
        link = os.readlink(name, dir_fd=origin.fd)
        temporary = _temporary_name(new)
        os.symlink(link, temporary, dir_fd=target.fd)
        try:
            os.replace(temporary, new, src_dir_fd=target.fd, dst_dir_fd=target.fd)
        except BaseException:
            target.unlink(temporary)
            raise
    else:
        with os.fdopen(origin.open_read(name), "rb") as handle:
            opened = os.fstat(handle.fileno())
            if not claimed.matches(opened):
                raise FileChanged(f"{origin.path / name} is not the file that was claimed")
            if opened.st_nlink > 1:
                # A rename moves only this name; a copy would read the file, whose other
                # name may be outside the folders. It stays until it has one name.
                raise OSError(
                    errno.EXDEV,
                    f"hard link: this file has {opened.st_nlink} names, and moving it to "
                    "another file system would copy it; it stays in the folder",
                    str(origin.path / name),
                )
            with atomic_write(target, new) as out:
                shutil.copyfileobj(handle, out, 1 << 20)
                out.flush()
                os.fchmod(out.fileno(), stat.S_IMODE(status.st_mode))
                os.utime(out.fileno(), ns=(status.st_atime_ns, status.st_mtime_ns))
    again = origin.find(name)
    if again is None or not claimed.matches(again):
        # Written to while it was copied, or replaced: it stays; the copy goes.
        target.unlink(new)
        raise FileChanged(f"{origin.path / name} changed while it was copied")
    origin.unlink(name, missing_ok=False)
    origin.fsync()


def _write_note(folder: Folder, kept_name: str, text: str) -> None:
    """A note beside a failed original saying why it failed."""
    try:
        with atomic_write(folder, kept_name + NOTE_SUFFIX) as out:
            out.write(text.encode("utf-8", "surrogateescape"))
    except OSError as exc:
        # The reason is in the database already; the note beside the file is a kindness.
        logger.warning("cannot write the note beside %s: %s", folder.path / kept_name, exc)


def kept_original(path: Path) -> os.stat_result:
    """The entry of a kept original (in originals/ or failed/), reached without links.

    Raises NotBeneath when it is not in those areas, OSError when it cannot be found.
    """
    with open_folder(path.parent, kept_roots()) as folder:
        return folder.stat(path.name)


def remove_kept_originals(paths: Iterable[str]) -> list[str]:
    """Delete kept originals (in originals/ or failed/) and the notes beside them, opening
    each folder once. Returns those gone, now or before; one that cannot be deleted is
    left, with a warning (its record should keep pointing at it)."""
    return _remove_by_folder(
        paths,
        lambda parent: open_folder(Path(parent), kept_roots()),
        "kept original",
        also=(NOTE_SUFFIX,),
    )


def _remove_by_folder(
    paths: Iterable[str],
    open_parent: Callable[[str], Folder],
    what: str,
    also: Sequence[str] = (),
) -> list[str]:
    """Delete files (and `name + suffix` for each of `also`) opening each folder once.

    Returns those gone, now or before (a whole folder gone counts); one that cannot be
    deleted is left, with a warning.
    """
    gone: list[str] = []
    for parent, names in _by_folder(paths).items():
        try:
            folder = open_parent(parent)
        except FileNotFoundError:
            gone.extend(f"{parent}/{name}" for name in names)  # the whole folder is gone
            continue
        except (OSError, NotBeneath) as exc:
            logger.warning("cannot delete %d %s(s) in %s: %s", len(names), what, parent, exc)
            continue
        with folder:
            for name in names:
                try:
                    folder.unlink(name)
                    for suffix in also:
                        folder.unlink(name + suffix)
                except (OSError, NotBeneath) as exc:
                    logger.warning("cannot delete %s %s/%s: %s", what, parent, name, exc)
                    continue
                gone.append(f"{parent}/{name}")
    return gone


def _by_folder(paths: Iterable[str]) -> dict[str, list[str]]:
    """Names grouped by their folder. Plain string splits: the folder is opened and each
    name checked as one entry of it before anything is touched."""
    folders: dict[str, list[str]] = {}
    for path in paths:
        parent, _, name = path.rpartition("/")
        folders.setdefault(parent, []).append(name)
    return folders


def free_bytes(path: Path | None = None) -> int:
    """Bytes that may still be written on the file system of `path` (default MEDIA_ROOT).

    Before MEDIA_ROOT is made, the nearest folder above it that exists is asked. Counts
    what an unprivileged process may use, so the space kept for root is not counted.
    """
    path = Path(path or settings.MEDIA_ROOT)
    while not path.exists() and path != path.parent:
        path = path.parent
    status = os.statvfs(path)
    return status.f_bavail * status.f_frsize


def media_free_bytes() -> tuple[Path, int]:
    """The least free space where images are written, and where: MEDIA_ROOT, or an area of
    it that is a link to another disk (archives, originals, failed)."""
    places = [Path(settings.MEDIA_ROOT), *map(media_area, (ARCHIVES, ORIGINALS, FAILED))]
    return min(((place, free_bytes(place)) for place in places), key=lambda found: found[1])


def remove_note(kept: Path) -> None:
    """Remove the note beside a failed original (it is being processed again)."""
    try:
        with open_folder(kept.parent, kept_roots()) as folder:
            folder.unlink(kept.name + NOTE_SUFFIX)
    except FileNotFoundError:
        pass


# --- Uploads -------------------------------------------------------------------------------


class Upload(Protocol):
    def chunks(self) -> Iterable[bytes]: ...


@dataclass(frozen=True)
class SavedFile:
    name: str
    path: Path
    identity: FileIdentity


@dataclass(frozen=True)
class SavedUploads:
    """Uploaded files written to their own new folder of the upload area, not yet claimed."""

    folder: Path
    files: list[SavedFile]


def save_uploads(files: Sequence[tuple[str, Upload]]) -> SavedUploads:
    """Write (name, upload) pairs into a new folder of the upload area; all or none."""
    day = timezone.localtime().strftime("%Y/%m/%d")
    saved = SavedUploads(media_area(UPLOADS) / day / uuid.uuid4().hex, [])
    with open_folder(saved.folder, [media_area(UPLOADS)], create=True) as folder:
        try:
            for name, upload in files:
                with atomic_write(folder, name) as out:
                    for chunk in upload.chunks():
                        out.write(chunk)
                identity = FileIdentity.of(folder.stat(name))
                saved.files.append(SavedFile(name, saved.folder / name, identity))
        except BaseException:
            _empty_upload_folder(folder, saved)
            raise
    return saved


def discard_uploads(saved: SavedUploads) -> None:
    """Remove saved uploads that were never claimed, and their folder."""
    try:
        with open_folder(saved.folder, [media_area(UPLOADS)]) as folder:
            _empty_upload_folder(folder, saved)
    except (OSError, NotBeneath) as exc:
        logger.warning("cannot remove upload folder %s: %s", saved.folder, exc)


def _empty_upload_folder(folder: Folder, saved: SavedUploads) -> None:
    for saved_file in saved.files:
        folder.unlink(saved_file.name)
    try:
        folder.remove()
    except OSError as exc:
        logger.warning("cannot remove upload folder %s: %s", saved.folder, exc)


# --- Archives ------------------------------------------------------------------------------


def _archive_parts(relative: str) -> tuple[Path, Path]:
    """(the archives area, the zip's path) for an archive recorded relative to MEDIA_ROOT."""
    parts = PurePosixPath(relative).parts
    if len(parts) < 2 or parts[0] != ARCHIVES:
        raise NotBeneath(f"{relative} is not in the {ARCHIVES} area")
    area = media_area(ARCHIVES)
    return area, area.joinpath(*parts[1:])


def open_archive(relative: str) -> BinaryIO | None:
    """A recorded zip (relative to MEDIA_ROOT), opened to read; None when there is none."""
    if not relative:
        return None
    try:
        area, path = _archive_parts(relative)
        with open_folder(path.parent, [area]) as folder:
            fd = folder.open_read(path.name)
    except (OSError, NotBeneath):
        return None
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        return None
    return handle


def remove_archive(relative: str) -> None:
    """Delete a recorded zip (relative to MEDIA_ROOT); gone already is fine."""
    try:
        area, path = _archive_parts(relative)
        with open_folder(path.parent, [area]) as folder:
            folder.unlink(path.name)
    except FileNotFoundError:
        pass
    except (OSError, NotBeneath) as exc:
        logger.warning("cannot delete archive %s: %s", relative, exc)


def remove_archives(relatives: Iterable[str]) -> list[str]:
    """Delete recorded zips (relative to MEDIA_ROOT), opening each folder once. Returns
    those gone, now or before; one that cannot be deleted is left, with a warning."""
    area = media_area(ARCHIVES)

    def open_parent(parent: str) -> Folder:
        head, _, below = parent.partition("/")
        if head != ARCHIVES:
            raise NotBeneath(f"{parent} is not in the {ARCHIVES} area")
        return open_folder(area / below if below else area, [area])

    return _remove_by_folder(
        (relative for relative in relatives if relative), open_parent, "archive"
    )


def discard_dead_run_archives(image: Image, requeued: bool) -> None:
    """Remove what the run of `image.token` left in the archives when it died: its temporary
    zips (their names are only that run's), and the zip it renamed into place before the
    database heard of it, which no record names.

    That zip stays when the image is `requeued` and its next run writes the very same name
    (a first run retried the same day): that run replaces it, and may be writing it by then.
    A reprocessing run's zip, or one of a day gone by, has a name no later run writes.
    """
    if image.token is None:
        return
    destination = archive_path(image)
    prefix = _temporary_prefix(destination.name, image.token.hex)
    today = timezone.localtime().strftime("%Y/%m/%d")
    replaced = requeued and not image.archive and destination.parent == media_area(ARCHIVES) / today
    unrecorded = "" if replaced else destination.name
    try:
        folder = open_folder(destination.parent, [media_area(ARCHIVES)])
    except FileNotFoundError:
        return
    with folder:
        for entry in folder.entries():
            partial = entry.name.startswith(prefix) and entry.name.endswith(".part")
            if partial or entry.name == unrecorded:
                folder.unlink(entry.name)
                logger.info("removed %s, left by a run that died", folder.path / entry.name)
