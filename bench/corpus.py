"""The benchmark's images, built at run time into bench/.corpus/ (never committed).

Real photos come from a Debian wallpaper package (`apt-get download`, no install) and a few
odd real files from Pillow's own test images (its source distribution on PyPI). From the
photos it synthesizes the mix issue 5 asks for: large JPEGs (baseline, progressive, CMYK,
EXIF-rotated), PNGs (RGB, RGBA, palette, 16-bit grey) and WebP. When a download fails the
same mix is generated from noise and gradients, and the log says so.

`build_mixed` is a second corpus, nothing synthesized: the wallpapers of GNOME, KDE
Plasma, MATE, UKUI and Debian's desktop themes as their packages ship them — baseline and
progressive JPEGs up to 18 MP, RGB and RGBA PNGs of 8-15 MP, WebPs of 4096x4096 — a folder
as people really have them. `kind` names each file's row in the per-format tables.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFilter
from pillow_heif import register_heif_opener

register_heif_opener()  # the HEIC sample is written with pillow-heif's encoder

logger = logging.getLogger("bench.corpus")

CORPUS = Path(__file__).resolve().parent / ".corpus"
WALLPAPER_PACKAGES = ("lomiri-wallpapers-20.04", "lomiri-wallpapers")
PILLOW_TEST_IMAGES = (
    "flower.jpg",
    "flower2.jpg",
    "hopper_orientation_6.jpg",
    "pil_sample_cmyk.jpg",
    "icc_profile_big.jpg",
    "flower.webp",
    "hopper.gif",
    "hopper.tif",
    "hopper.bmp",
    "exif_imagemagick_orientation.png",
    "16bit.cropped.tif",
)


# Every real file of these packages of at least MIXED_MIN_BYTES, one of each size (the
# packages ship the same picture under several names).
MIXED_PACKAGES = (
    "gnome-backgrounds",
    "plasma-workspace-wallpapers",
    "mate-backgrounds",
    "ukui-wallpapers",
    "desktop-base",
)
MIXED_MIN_BYTES = 150_000
MIXED_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
KINDS = ("baseline JPEG", "progressive JPEG", "PNG", "WebP", "other")


@dataclass(frozen=True)
class Corpus:
    files: tuple[Path, ...]
    big_jpeg: Path
    sources: tuple[str, ...]


def build(smoke: bool = False) -> Corpus:
    """Make (or reuse) the corpus and return its files; smoke makes a tiny generated one."""
    if smoke:
        folder = Path(tempfile.mkdtemp(prefix="parroter-bench-smoke-"))
        photos = [_generated_photo((900, 600), seed) for seed in range(2)]
        files = _synthesize(folder, photos, scale=1.0)
        big = folder / "big.jpg"
        _generated_photo((2000, 2000), 7).save(big, "JPEG", quality=90)
        return Corpus(tuple(files), big, ("generated (smoke)",))
    folder = CORPUS / "mix"
    manifest = CORPUS / "manifest.txt"
    if manifest.exists():
        lines = manifest.read_text().splitlines()
        files = tuple(Path(line) for line in lines[1:])
        if files and all(path.exists() for path in files):
            logger.info("reusing the corpus in %s", CORPUS)
            return Corpus(files, CORPUS / "big_100mp.jpg", tuple(lines[0].split(";")))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources = []
    photos = _debian_photos()
    if photos:
        sources.append(f"Debian {'/'.join(WALLPAPER_PACKAGES)} ({len(photos)} photos)")
    else:
        logger.warning("no Debian wallpapers could be had: generating photos instead")
        photos = [_generated_photo((6000, 4000), seed) for seed in range(3)]
        sources.append("generated photos (download failed)")
    files = _synthesize(folder, [Image.open(path) for path in photos], scale=1.0)
    # The photos themselves, untouched, are the most honest part of the mix.
    for path in photos:
        copy = folder / f"real_{path.name}"
        shutil.copyfile(path, copy)
        files.append(copy)
    extras = _pillow_test_images(folder)
    if extras:
        sources.append(f"Pillow {Image.__version__} test images ({len(extras)})")
    else:
        logger.warning("Pillow's test images could not be had: going on without them")
    files += extras
    big = CORPUS / "big_100mp.jpg"
    _tiled(photos, (12_000, 8_334)).save(big, "JPEG", quality=90)
    manifest.write_text("\n".join([";".join(sources), *map(str, files)]))
    return Corpus(tuple(files), big, tuple(sources))


def build_mixed(smoke: bool = False) -> Corpus:
    """The real mixed collection; smoke makes a tiny generated one of the same four kinds."""
    if smoke:
        folder = Path(tempfile.mkdtemp(prefix="parroter-bench-smoke-mixed-"))
        photo = _generated_photo((1200, 800), 3)
        files = []
        for name, params in (
            ("baseline.jpg", {"format": "JPEG", "quality": 90}),
            ("progressive.jpg", {"format": "JPEG", "quality": 90, "progressive": True}),
            ("rgb.png", {"format": "PNG"}),
            ("photo.webp", {"format": "WEBP", "quality": 85}),
        ):
            photo.save(folder / name, **params)
            files.append(folder / name)
        rgba = photo.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
        rgba.save(folder / "rgba.png")
        files.append(folder / "rgba.png")
        return Corpus(tuple(files), files[0], ("generated (smoke)",))
    target = CORPUS / "debian-mixed"
    manifest = CORPUS / "mixed-manifest.txt"
    if manifest.exists():
        lines = manifest.read_text().splitlines()
        files = tuple(Path(line) for line in lines[1:])
        if files and all(path.exists() for path in files):
            logger.info("reusing the mixed corpus in %s", target)
            return Corpus(files, files[0], tuple(lines[0].split(";")))
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise SystemExit("the mixed corpus needs apt-get and dpkg-deb (Debian packages)")
    downloads = _download_debs(MIXED_PACKAGES, CORPUS / "debs-mixed")
    shutil.rmtree(target, ignore_errors=True)
    for deb in sorted(downloads.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True, timeout=600)
    files, seen = [], set()
    for path in sorted(target.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.suffix.lower() not in MIXED_SUFFIXES:
            continue
        size = path.stat().st_size
        if size < MIXED_MIN_BYTES or size in seen:
            continue
        seen.add(size)
        files.append(path)
    if not files:
        raise SystemExit(f"no wallpapers could be had from {', '.join(MIXED_PACKAGES)}")
    # Flat, and named uniquely: KDE names its pictures by their size (5120x2880.png).
    flat = CORPUS / "mixed"
    shutil.rmtree(flat, ignore_errors=True)
    flat.mkdir()
    named = []
    for path in files:
        parts = [part for part in path.relative_to(target).parts[-4:] if part != "contents"]
        link = flat / "_".join(parts)
        os.link(path, link)
        named.append(link)
    files = named
    counts = dict.fromkeys(KINDS, 0)
    for path in files:
        counts[kind(path)] += 1
    sources = [
        f"Debian {', '.join(MIXED_PACKAGES)}: "
        + ", ".join(f"{count} {name}" for name, count in counts.items() if count)
    ]
    manifest.write_text("\n".join([";".join(sources), *map(str, files)]))
    return Corpus(tuple(files), files[0], tuple(sources))


def kind(path: Path) -> str:
    """The file's row in a per-format table, from its content."""
    try:
        with Image.open(path) as image:
            if image.format in ("JPEG", "MPO"):
                progressive = image.info.get("progressive") or image.info.get("progression")
                return "progressive JPEG" if progressive else "baseline JPEG"
            if image.format in ("PNG", "WEBP"):
                return {"PNG": "PNG", "WEBP": "WebP"}[image.format]
    except OSError:
        pass
    return "other"


def _synthesize(folder: Path, photos: list[Image.Image], scale: float) -> list[Path]:
    """The issue's mix, made from the given photos."""
    files = []

    def save(image: Image.Image, name: str, **params: object) -> None:
        path = folder / name
        image.save(path, **params)
        files.append(path)

    def sized(image: Image.Image, width: int) -> Image.Image:
        width = max(16, int(width * scale))
        height = max(16, round(image.height * width / image.width))
        return image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)

    first = photos[0].convert("RGB")
    last = photos[-1].convert("RGB")
    width = first.width
    save(first, "baseline.jpg", format="JPEG", quality=90)
    save(last, "progressive.jpg", format="JPEG", quality=90, progressive=True)
    save(first.convert("CMYK"), "cmyk_adobe.jpg", format="JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    save(
        last.transpose(Image.Transpose.ROTATE_90),
        "rotated_exif6.jpg",
        format="JPEG",
        quality=90,
        exif=exif.tobytes(),
    )
    medium = sized(first, min(width, 3000))
    save(medium, "rgb.png", format="PNG")
    rgba = medium.copy()
    alpha = Image.linear_gradient("L").resize(rgba.size)
    rgba.putalpha(alpha)
    save(rgba, "rgba.png", format="PNG")
    save(sized(last, min(width, 2000)).quantize(256), "palette.png", format="PNG")
    grey = sized(last, min(width, 2000)).convert("L").convert("I")
    save(grey.point(lambda value: value * 257).convert("I;16"), "grey16.png", format="PNG")
    save(sized(last, min(width, 3000)), "photo.webp", format="WEBP", quality=85)
    save(rgba.resize((rgba.width // 2, rgba.height // 2)), "rgba.webp", format="WEBP")
    # Phone formats.
    save(sized(first, min(width, 3000)), "phone.heic", format="HEIF", quality=85)
    save(sized(last, min(width, 3000)), "phone.avif", format="AVIF", quality=85, speed=8)
    return files


def _tiled(photos: list[Path], size: tuple[int, int]) -> Image.Image:
    """A large picture with a photo's detail everywhere: the photos tiled, not upscaled."""
    tiles = [Image.open(path).convert("RGB") for path in photos if path.suffix == ".jpg"]
    tiles = tiles or [_generated_photo((3000, 2000), seed) for seed in range(2)]
    canvas = Image.new("RGB", size)
    x = y = index = 0
    while y < size[1]:
        tile = tiles[index % len(tiles)]
        canvas.paste(tile, (x, y))
        index += 1
        x += tile.width
        if x >= size[0]:
            x, y = 0, y + min(t.height for t in tiles)
    return canvas


def _generated_photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Something photo-like enough for timing: smooth gradients with fine noise."""
    red = Image.linear_gradient("L").resize(size)
    green = Image.radial_gradient("L").resize(size)
    noise = Image.effect_noise(size, 40 + seed * 10).filter(ImageFilter.GaussianBlur(1))
    image = Image.merge("RGB", (red, green, noise))
    return image.rotate(seed * 13, resample=Image.Resampling.BILINEAR, expand=False)


def _download_debs(packages: Iterable[str], downloads: Path) -> Path:
    """`apt-get download` each package not downloaded yet into `downloads`; a package that
    cannot be had is logged and left out."""
    downloads.mkdir(parents=True, exist_ok=True)
    for package in packages:
        if list(downloads.glob(f"{package}_*.deb")):
            continue
        result = subprocess.run(
            ["apt-get", "download", package],
            cwd=downloads,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode:
            logger.warning("apt-get download %s failed: %s", package, result.stderr.strip())
    return downloads


def _debian_photos() -> list[Path]:
    target = CORPUS / "debian"
    photos = sorted(target.rglob("*.jpg")) + sorted(target.rglob("*.png"))
    if photos:
        return _unique(photos)
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        return []
    downloads = _download_debs(WALLPAPER_PACKAGES, CORPUS / "debs")
    for deb in downloads.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True, timeout=600)
    return _unique(sorted(target.rglob("*.jpg")) + sorted(target.rglob("*.png")))


def _unique(paths: list[Path]) -> list[Path]:
    """Regular files only (packages ship symlinks to the same picture), large ones."""
    seen, unique = set(), []
    for path in paths:
        if path.is_symlink() or not path.is_file():
            continue
        if path.stat().st_size in seen or path.stat().st_size < 200_000:
            continue
        seen.add(path.stat().st_size)
        unique.append(path)
    return unique


def _pillow_test_images(folder: Path) -> list[Path]:
    downloads = CORPUS / "pillow-sdist"
    archives = sorted(downloads.glob("pillow-*.tar.gz"))
    if not archives:
        downloads.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"pillow=={Image.__version__}",
                "-d",
                str(downloads),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode:
            logger.warning("pip download of Pillow's sources failed: %s", result.stderr[-500:])
            return []
        archives = sorted(downloads.glob("pillow-*.tar.gz"))
    if not archives:
        return []
    extracted = []
    with tarfile.open(archives[-1]) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and "/Tests/images/" in member.name and name in PILLOW_TEST_IMAGES:
                source = tar.extractfile(member)
                if source is None:
                    continue
                path = folder / f"pillow_{name}"
                path.write_bytes(source.read())
                extracted.append(path)
    return sorted(extracted)
