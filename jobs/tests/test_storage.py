"""The file-system module: files appear whole or not at all, and nothing outside the
configured folders is ever reached, whatever is swapped for a link and when."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest

from jobs import runner, storage, sweeper, uploads
from jobs.models import Image
from jobs.storage import atomic_file
from jobs.tasks import sweep_folder

from .conftest import disk_of_its_own, image_bytes
from .processes import wait_for


def write_half_then_fail(destination):
    with atomic_file(destination) as out:
        out.write(b"half")
        raise RuntimeError("the disk caught fire")


def test_atomic_file_leaves_nothing_when_the_writer_fails(tmp_path):
    destination = tmp_path / "a.zip"
    with pytest.raises(RuntimeError, match="caught fire"):
        write_half_then_fail(destination)
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_keeps_the_old_file_when_the_rename_fails(tmp_path):
    destination = tmp_path / "a.zip"
    destination.mkdir()
    with pytest.raises(OSError, match="directory"), atomic_file(destination) as out:
        out.write(b"a")
    assert [path.name for path in tmp_path.iterdir()] == ["a.zip"]
    assert destination.is_dir()


def test_atomic_file_passes_a_full_disk_on_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    destination = tmp_path / "out" / "a.zip"
    with pytest.raises(OSError, match="No space left"), atomic_file(destination) as out:
        out.write(b"data")
    # The folder made for it stays: another writer may be using it already.
    assert list(destination.parent.iterdir()) == []


def test_atomic_file_creates_the_folder_and_replaces_an_old_file(tmp_path):
    destination = tmp_path / "deep" / "er" / "a.zip"
    with atomic_file(destination) as out:
        out.write(b"old")
    with atomic_file(destination) as out:
        out.write(b"hello")
    assert destination.read_bytes() == b"hello"
    assert [path.name for path in destination.parent.iterdir()] == ["a.zip"]


# --- The anchored walk ----------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path):
    """A folder outside every configured root, holding a file nobody may touch."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "x.jpg").write_bytes(b"outside bytes, not to be read or moved")
    return folder


def untouched(path):
    """What must not change about a file outside the folders: bytes, inode, mtime."""
    status = os.lstat(path)
    return path.read_bytes(), status.st_dev, status.st_ino, status.st_mtime_ns


def test_open_folder_refuses_a_symlinked_intermediate_folder(tmp_path, outside):
    root = tmp_path / "root"
    root.mkdir()
    (outside / "deeper").mkdir()
    (root / "inbox").symlink_to(outside, target_is_directory=True)
    with pytest.raises(storage.NotBeneath, match="inbox is a symbolic link"):
        storage.open_folder(root / "inbox" / "deeper", [root])
    with pytest.raises(storage.NotBeneath, match="inbox is a symbolic link"):
        storage.open_folder(root / "inbox", [root], create=True)


def test_open_folder_refuses_dot_dot_and_paths_outside_its_roots(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    for path in (root / "sub" / ".." / "..", tmp_path / "other", Path("root/sub")):
        with pytest.raises(storage.NotBeneath, match="outside the configured folders"):
            storage.open_folder(path, [root])
    folder = storage.open_folder(root / "sub", [root])
    with folder, pytest.raises(storage.NotBeneath, match="not a plain name"):
        folder.stat("..")


def test_open_folder_starts_from_the_outermost_root(tmp_path, outside):
    # WATCH_ROOTS may name a folder and its parent: the walk starts from the parent, so a
    # link put in the place of the inner one is refused too.
    root = tmp_path / "root"
    root.mkdir()
    (root / "watch").symlink_to(outside, target_is_directory=True)
    with pytest.raises(storage.NotBeneath, match="watch is a symbolic link"):
        storage.open_folder(root / "watch", [root / "watch", root])


def test_folder_acts_where_it_was_opened_after_its_path_is_swapped(tmp_path, outside):
    root = tmp_path / "root"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "x.jpg").write_bytes(b"the claimed file")
    claimed = os.lstat(inbox / "x.jpg")
    before = untouched(outside / "x.jpg")
    with storage.open_folder(inbox, [root]) as folder:
        inbox.rename(root / "moved")
        inbox.symlink_to(outside, target_is_directory=True)
        assert folder.stat("x.jpg").st_ino == claimed.st_ino
        folder.unlink("x.jpg")
    assert not (root / "moved" / "x.jpg").exists()
    assert untouched(outside / "x.jpg") == before
    with pytest.raises(storage.NotBeneath):
        storage.open_folder(inbox, [root])


def test_atomic_file_refuses_a_symlinked_folder_on_the_way(folders, outside):
    archives = folders["media"] / "archives"
    archives.mkdir()
    (archives / "2026").symlink_to(outside, target_is_directory=True)
    with (
        pytest.raises(storage.NotBeneath, match="2026 is a symbolic link"),
        atomic_file(archives / "2026" / "01" / "a.zip") as out,
    ):
        out.write(b"zip")
    assert sorted(path.name for path in outside.iterdir()) == ["x.jpg"]


# --- Scanning -------------------------------------------------------------------------------


def test_scan_lists_a_symlinked_folder_as_a_link_and_never_enters_it(folders, drop, outside):
    drop(folders["watch"], "real/a.jpg")
    (folders["watch"] / "linked").symlink_to(outside, target_is_directory=True)
    found = storage.scan(folders["watch"], settle_seconds=0)
    assert sorted(candidate.name for candidate in found.ready) == ["linked", "real/a.jpg"]
    link = next(candidate for candidate in found.ready if candidate.name == "linked")
    assert link.inode == os.lstat(folders["watch"] / "linked").st_ino


def test_scan_does_not_follow_a_folder_swapped_while_it_lists(folders, drop, outside, monkeypatch):
    drop(folders["watch"], "inbox/a.jpg")
    inbox = folders["watch"] / "inbox"
    real_is_junk = storage.is_junk

    def swap_when_listed(name):
        # Called while the parent is listed: the folder is swapped after its listing said
        # "directory" and before the walk opens it.
        if name == "inbox" and not inbox.is_symlink():
            inbox.rename(folders["root"] / "stash")
            inbox.symlink_to(outside, target_is_directory=True)
        return real_is_junk(name)

    monkeypatch.setattr(storage, "is_junk", swap_when_listed)
    found = storage.scan(folders["watch"], settle_seconds=0)
    assert inbox.is_symlink()
    assert found.ready == []


def test_scan_refuses_a_folder_that_became_a_link_and_skips_one_that_is_gone(folders, outside):
    (folders["watch"] / "sub").symlink_to(outside, target_is_directory=True)
    with pytest.raises(storage.NotBeneath, match="sub is a symbolic link"):
        storage.scan(folders["watch"] / "sub", settle_seconds=0)
    assert storage.scan(folders["watch"] / "gone", settle_seconds=0).ready == []


def test_scan_records_the_device_and_inode_of_each_file(folders, drop):
    path = drop(folders["watch"], "a.jpg")
    [candidate] = storage.scan(folders["watch"], settle_seconds=0).ready
    status = os.lstat(path)
    assert (candidate.device, candidate.inode) == (status.st_dev, status.st_ino)
    assert (candidate.size, candidate.mtime_ns) == (status.st_size, status.st_mtime_ns)


# --- Identity ---------------------------------------------------------------------------------


def same_size_and_mtime(path, other, data):
    """Write `data` at `other` with the size and mtime of `path`: only the inode tells."""
    other.write_bytes(data)
    status = os.lstat(path)
    os.utime(other, ns=(status.st_atime_ns, status.st_mtime_ns))
    assert len(data) == status.st_size


def test_read_original_refuses_another_file_with_the_same_size_and_mtime(folders, drop):
    path = drop(folders["watch"], "x.jpg", b"claimed bytes")
    claimed = storage.FileIdentity.of(os.lstat(path))
    same_size_and_mtime(path, folders["watch"] / "new.jpg", b"another file!")
    os.replace(folders["watch"] / "new.jpg", path)
    with pytest.raises(storage.FileChanged):
        storage.read_original(path, claimed, max_bytes=1000)
    # A record from before device and inode were kept: size and mtime alone decide.
    old_record = storage.FileIdentity(claimed.size, claimed.mtime_ns)
    assert storage.read_original(path, old_record, max_bytes=1000) == b"another file!"


def test_read_original_reads_no_more_than_the_size_it_checked(folders, drop, monkeypatch):
    path = drop(folders["watch"], "x.jpg", b"claimed bytes")
    claimed = storage.FileIdentity.of(os.lstat(path))
    checked = os.fstat
    grown = []

    def check_then_grow(fd):
        # A writer appends right after the size was checked against the limit.
        status = checked(fd)
        if not grown:
            grown.append(os.truncate(path, 64 << 20))
        return status

    opened = os.fdopen
    read: list[int] = []

    def counting(fd, *args, **kwargs):
        handle = opened(fd, *args, **kwargs)
        reading = handle.read
        handle.read = lambda *size: read.append(len(data := reading(*size))) or data
        return handle

    monkeypatch.setattr(storage.os, "fstat", check_then_grow)
    monkeypatch.setattr(storage.os, "fdopen", counting)
    with pytest.raises(storage.FileChanged, match="changed size while it was being read"):
        storage.read_original(path, claimed, max_bytes=1000)
    assert grown
    assert sum(read) <= claimed.size + 1, "read past the size checked against max_bytes"


def test_temporary_names_fit_in_a_file_name_whatever_the_destination():
    tag = "f" * 32
    for name in ("a.zip", "1000-" + "é" * 100 + "-20261128-120000-123456.zip", "x" * 255):
        temporary = storage._temporary_name(name, tag)
        assert len(temporary.encode()) <= 255
        # A killed run's temporary file is found by its prefix (discard_dead_run_archives).
        assert temporary.startswith(storage._temporary_prefix(name, tag))
        assert temporary.startswith("." + name[:40])
    assert storage._temporary_name("a.zip", tag).startswith(f".a.zip.{tag}.")


def test_read_original_refuses_a_folder_swapped_for_a_link_after_the_claim(folders, drop, outside):
    path = drop(folders["watch"], "inbox/x.jpg", b"claimed bytes")
    same_size_and_mtime(path, outside / "x.jpg", b"outside bytes")
    claimed = storage.FileIdentity.of(os.lstat(path))
    before = untouched(outside / "x.jpg")
    (folders["watch"] / "inbox").rename(folders["root"] / "stash")
    (folders["watch"] / "inbox").symlink_to(outside, target_is_directory=True)
    for identity in (claimed, storage.FileIdentity(claimed.size, claimed.mtime_ns)):
        with pytest.raises(storage.NotBeneath, match="inbox is a symbolic link"):
            storage.read_original(path, identity, max_bytes=1000)
    assert untouched(outside / "x.jpg") == before


def test_move_original_leaves_a_file_reached_through_a_swapped_folder(folders, drop, outside):
    path = drop(folders["watch"], "inbox/x.jpg", b"claimed bytes")
    same_size_and_mtime(path, outside / "x.jpg", b"outside bytes")
    # As a record from before device and inode were kept: only the walk protects it.
    claimed = storage.FileIdentity(len(b"claimed bytes"), os.lstat(path).st_mtime_ns)
    before = untouched(outside / "x.jpg")
    (folders["watch"] / "inbox").rename(folders["root"] / "stash")
    (folders["watch"] / "inbox").symlink_to(outside, target_is_directory=True)
    destination = folders["media"] / "failed" / "2026" / "1-x.jpg"
    with pytest.raises(storage.NotBeneath):
        storage.move_original(path, claimed, destination, note="why")
    assert untouched(outside / "x.jpg") == before
    assert sorted(path.name for path in outside.iterdir()) == ["x.jpg"]
    assert not [path for path in folders["media"].rglob("*") if not path.is_dir()]


def test_move_original_leaves_another_file_at_the_claimed_path(folders, drop):
    path = drop(folders["watch"], "x.jpg", b"claimed bytes")
    claimed = storage.FileIdentity.of(os.lstat(path))
    same_size_and_mtime(path, folders["watch"] / "new.jpg", b"another file!")
    os.replace(folders["watch"] / "new.jpg", path)
    destination = folders["media"] / "originals" / "1-x.jpg"
    with pytest.raises(storage.FileChanged):
        storage.move_original(path, claimed, destination)
    assert path.read_bytes() == b"another file!"
    assert not destination.exists()


@pytest.fixture
def originals_on_another_disk(folders):
    """A real tmpfs mounted where originals go, so that moving there crosses file systems."""
    with disk_of_its_own(folders, "originals", "1m") as path:
        yield path


def test_move_original_across_file_systems_copies_then_removes(
    folders, drop, originals_on_another_disk
):
    path = drop(folders["watch"], "x.jpg", b"claimed bytes")
    path.chmod(0o640)
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    claimed = storage.FileIdentity.of(os.lstat(path))
    destination = originals_on_another_disk / "2026" / "1-x.jpg"
    assert storage.move_original(path, claimed, destination, note="a reason\n") == destination
    assert not path.exists()
    assert destination.read_bytes() == b"claimed bytes"
    status = os.lstat(destination)
    assert status.st_dev != claimed.device
    assert (status.st_mtime_ns, status.st_mode & 0o777) == (2_000_000_000, 0o640)
    assert (destination.parent / "1-x.jpg.error.txt").read_text() == "a reason\n"
    assert sorted(p.name for p in destination.parent.iterdir()) == ["1-x.jpg", "1-x.jpg.error.txt"]


def test_move_original_across_file_systems_keeps_a_link_as_a_link(
    folders, outside, originals_on_another_disk
):
    link = folders["watch"] / "escape.jpg"
    link.symlink_to(outside / "x.jpg")
    before = untouched(outside / "x.jpg")
    claimed = storage.FileIdentity.of(os.lstat(link))
    destination = originals_on_another_disk / "1-escape.jpg"
    assert storage.move_original(link, claimed, destination) == destination
    assert not os.path.lexists(link)
    assert os.readlink(destination) == str(outside / "x.jpg")
    assert untouched(outside / "x.jpg") == before


def test_move_original_across_file_systems_never_copies_a_hard_link(
    folders, outside, originals_on_another_disk
):
    # Its other name is outside the folders: a rename would move this name only, a copy
    # would read the outside file into MEDIA_ROOT.
    link = folders["watch"] / "innocent.jpg"
    os.link(outside / "x.jpg", link)
    before = untouched(outside / "x.jpg")
    claimed = storage.FileIdentity.of(os.lstat(link))
    destination = originals_on_another_disk / "1-innocent.jpg"
    with pytest.raises(OSError, match="hard link: this file has 2 names"):
        storage.move_original(link, claimed, destination, note="a reason\n")
    assert os.path.samefile(link, outside / "x.jpg")
    assert not [path for path in originals_on_another_disk.rglob("*") if path.is_file()]
    assert untouched(outside / "x.jpg") == before


@pytest.fixture
def failed_on_another_disk(folders):
    """A real tmpfs mounted where failed originals go."""
    with disk_of_its_own(folders, "failed", "1m") as path:
        yield path


@pytest.mark.django_db
def test_a_hard_link_failed_across_file_systems_stays_in_the_folder_unread(
    folders, outside, failed_on_another_disk, settings
):
    settings.MIN_FREE_MB = 0  # the small disk would hold the sweep back
    link = folders["watch"] / "innocent.jpg"
    os.link(outside / "x.jpg", link)
    before = untouched(outside / "x.jpg")
    for image_id in sweeper.sweep_folder(str(folders["watch"]), ["64x64"]).to_queue:
        runner.process_image(image_id)
    image = Image.objects.get()
    assert (image.status, image.in_folder, image.original_path) == ("failed", True, "")
    assert image.error.startswith("hard link: this file has 2 names"), image.error
    # A repair tries again, and still does not copy it.
    sweeper.sweep_folder(str(folders["watch"]), ["64x64"])
    assert Image.objects.get().in_folder
    assert os.path.samefile(link, outside / "x.jpg")
    assert not [path for path in failed_on_another_disk.rglob("*") if path.is_file()]
    assert untouched(outside / "x.jpg") == before


class Upload:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def chunks(self):
        yield self.data


@pytest.mark.django_db
def test_areas_linked_to_another_disk_are_read_under_a_watch_root_holding_media_root(
    folders, settings, tmp_path, django_user_model
):
    # Both allowed: a watch root may hold MEDIA_ROOT, an area may be a link to another disk.
    settings.WATCH_ROOTS = [folders["watch"], tmp_path]
    for area in (storage.UPLOADS, storage.ORIGINALS):
        (tmp_path / "disk2" / area).mkdir(parents=True)
        (folders["media"] / area).symlink_to(tmp_path / "disk2" / area)
    saved = storage.save_uploads([("photo.jpg", Upload(image_bytes()))])
    user = django_user_model.objects.create(username="alice")
    _, ids = uploads.claim_uploads(saved, ["64x64"], user)
    assert runner.process_image(ids[0]) == Image.Status.DONE, Image.objects.get().error
    kept = Path(Image.objects.get().original_path)
    assert kept.is_relative_to(folders["media"] / storage.ORIGINALS)
    # Read again, as reprocessing does.
    assert storage.read_original(kept, None, max_bytes=10**9) == image_bytes()


# --- Archives ---------------------------------------------------------------------------------


def test_archive_look_ups_stay_in_the_archives_area(folders, outside):
    kept = folders["media"] / "failed" / "x.jpg"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"kept original")
    day = folders["media"] / "archives" / "2026"
    day.mkdir(parents=True)
    (day / "link.zip").symlink_to(outside / "x.jpg")
    (day / "a.zip").write_bytes(b"zip")
    for relative in ("archives/../failed/x.jpg", "failed/x.jpg", "/etc/passwd"):
        assert storage.open_archive(relative) is None
        storage.remove_archive(relative)
    assert kept.read_bytes() == b"kept original"
    assert storage.open_archive("archives/2026/link.zip") is None
    storage.remove_archives(["archives/2026/link.zip", "archives/2026/a.zip", ""])
    assert not os.path.lexists(day / "link.zip")
    assert not (day / "a.zip").exists()
    assert (outside / "x.jpg").exists()


# --- A folder swapped for a link, in a real worker (running as whoever runs the tests: root
# on CI, which may read and move any file on the machine) -------------------------------------

FAULT_APP = "jobs.tests.fault_app"
PICTURE = image_bytes((320, 240))
NOT_A_PICTURE = b"this is not an image, whatever its name says\n" * 20


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("stage", "data"),
    [
        pytest.param("claim", PICTURE, id="between-scan-and-claim"),
        pytest.param("read", PICTURE, id="between-claim-and-processing"),
        pytest.param("put_away", PICTURE, id="between-processing-and-moving-the-original"),
        pytest.param("put_away", NOT_A_PICTURE, id="before-moving-a-bad-file-to-failed"),
    ],
)
def test_a_folder_swapped_for_a_link_leaves_the_file_outside_untouched(
    system, folders, redis_server, tmp_path, outside, stage, data
):
    markers = tmp_path / "markers"
    markers.mkdir()
    system.environment.update(
        PARROTER_FAULT_PAUSE_AT=stage, PARROTER_FAULT_MARKERS=str(markers), SETTLE_SECONDS="0"
    )
    # watch/inbox/x.jpg and elsewhere/x.jpg: same name, size and mtime, other bytes.
    inbox = folders["watch"] / "inbox"
    inbox.mkdir()
    dropped = inbox / "x.jpg"
    dropped.write_bytes(data)
    same_size_and_mtime(dropped, outside / "x.jpg", bytes(reversed(data)))
    before = untouched(outside / "x.jpg")
    system.worker(app=FAULT_APP)
    # One sweep, run by the worker; no beat, so no later sweep repairs anything meanwhile.
    with sweep_folder.app.connection_for_write(redis_server.url) as connection:
        sweep_folder.apply_async(kwargs={"folder": str(folders["watch"])}, connection=connection)
    wait_for(lambda: (markers / f"paused-{stage}").exists(), what=f"the worker at {stage!r}")
    if stage == "put_away":
        image = Image.objects.get()
        assert image.is_final, "paused after the result was recorded"
        assert image.in_folder, "paused before the original moved"

    inbox.rename(tmp_path / "stash")  # the real folder leaves; a link takes its place
    inbox.symlink_to(outside, target_is_directory=True)
    (markers / f"resume-{stage}").touch()

    wait_for(
        lambda: Image.objects.filter(status__in=Image.FINAL_STATUSES, in_folder=False).exists(),
        what="the image to be finished with",
    )
    image = Image.objects.get()
    assert untouched(outside / "x.jpg") == before
    assert sorted(path.name for path in outside.iterdir()) == ["x.jpg"]
    outside_bytes, outside_device, outside_inode, _ = before
    for path in folders["media"].rglob("*"):
        status = os.lstat(path)
        assert (status.st_dev, status.st_ino) != (outside_device, outside_inode), path
        if stat.S_ISREG(status.st_mode):
            assert path.read_bytes() != outside_bytes, path
            if path.suffix == ".zip":
                with zipfile.ZipFile(path) as archive:
                    assert outside_bytes not in [archive.read(name) for name in archive.namelist()]
    assert image.original_path == ""
    assert "inbox is a symbolic link" in image.error, image.error
    if stage in ("claim", "read"):
        # Nothing was read: the claim fails, and the file is left for whoever sorts it out.
        assert image.status == Image.Status.FAILED
        assert "left untouched, unread" in image.error
        assert not image.archive
    elif data == PICTURE:
        assert image.status == Image.Status.DONE
        assert image.error.startswith("the original was left where it was found")
        with zipfile.ZipFile(folders["media"] / image.archive) as archive:
            assert archive.read("x.jpg") == PICTURE  # read before the swap, from the real file
    else:
        assert image.status == Image.Status.FAILED
        assert image.error.startswith("not an image")
        assert "; the original was left where it was found" in image.error
        assert not list((folders["media"] / "failed").rglob("*"))
    assert (tmp_path / "stash" / "x.jpg").read_bytes() == data
