"""Benchmark of jobs.pipeline against the tutorial way, vipsthumbnail and the decode floor.

    .venv/bin/python bench/pipeline.py            # real corpus in bench/.corpus/, 3 reps
    .venv/bin/python bench/pipeline.py --smoke    # tiny generated corpus, 1 rep, seconds

After a warm-up pass, each method runs over the whole corpus in turn, once per repetition,
in one process (so one core): figures are comparable within a run, not across machines.
"tutorial" is what the Pillow tutorial suggests: open, copy(), thumbnail() per size, save
each to a temporary file, add them to a zip with the default DEFLATE. "decode floor" only
decodes every image, JPEGs at the smallest draft scale that still covers the largest
thumbnail: no thumbnail can be made faster with Pillow. "vipsthumbnail" (when installed)
makes the thumbnails only, as JPEG, without a zip, one thread.

Two corpora (`--corpus`): "bench", the synthesized mix of bench/corpus.py, and "mixed", real
wallpapers as Debian's desktop packages ship them (corpus.build_mixed). For each, a table per
format (baseline JPEG, progressive JPEG, PNG, WebP) sets the pipeline's CPU seconds against
the tutorial's and against two reduced-scale decode floors: Pillow's (JPEG draft; PNG and
WebP have no reduced-scale decode in Pillow) and libvips' (`pyvips`, one thread: JPEG
shrink-on-load, WebP scale-on-load, PNG through libspng at full size), each decoding only.
"bare minimum" adds to the best floor's decode only what no pipeline avoids (bare_minimum):
its ratio to the floor is the most any pipeline reaches with these libraries.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageChops, ImageOps, ImageStat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import corpus

from jobs import pipeline, storage

logger = logging.getLogger("bench")
# libvips is a bench dependency only: imported in main(), not by the memory measurement.
pyvips = None

HEADER = (
    f"{'method':<15}{'images':>7}{'failed':>7}{'wall s':>9}{'img/s':>8}{'MP/s':>8}"
    f"{'CPU s':>8}{'img/CPU s':>10}"
)
RUNNER = Callable[[Path, Path], "Path | None"]


@dataclass
class Tally:
    images: int = 0
    failed: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    megapixels: float = 0.0
    errors: set[str] = field(default_factory=set)
    # CPU seconds and files per corpus.kind, for the per-format table.
    kind_cpu: dict[str, float] = field(default_factory=dict)
    kind_files: dict[str, int] = field(default_factory=dict)

    def line(self, name: str) -> str:
        return (
            f"{name:<15}{self.images:>7}{self.failed:>7}{self.wall:>9.2f}"
            f"{self.images / self.wall:>8.1f}{self.megapixels / self.wall:>8.1f}"
            f"{self.cpu:>8.2f}{self.images / self.cpu:>10.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny generated corpus, 1 rep")
    parser.add_argument("--reps", type=int, default=3, help="measured passes (default 3)")
    parser.add_argument("--sizes", default="128x128,256x256,512x512")
    parser.add_argument("--no-vips", action="store_true", help="leave vipsthumbnail out")
    parser.add_argument(
        "--corpus",
        choices=("bench", "mixed", "both"),
        default="both",
        help="the synthesized bench corpus, the real mixed one, or both (default)",
    )
    parser.add_argument("--measure-memory", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="pipeline", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("pyvips").setLevel(logging.WARNING)
    sizes = pipeline.parse_sizes(args.sizes)
    if args.measure_memory:
        return _measure_memory_here(args.measure_memory, sizes, args.method)

    reps = 1 if args.smoke else args.reps
    global pyvips
    try:
        import pyvips
    except (ImportError, OSError):  # then the libvips columns are left out
        pyvips = None
    if pyvips is not None:
        # Per core, like every other method here.
        pyvips.concurrency_set(1)
        pyvips.cache_set_max(0)
    names = ("bench", "mixed") if args.corpus == "both" else (args.corpus,)
    for number, name in enumerate(names):
        if number:
            sys.stdout.write("\n\n")
        build = corpus.build if name == "bench" else corpus.build_mixed
        _bench(build(smoke=args.smoke), name, sizes, reps, args)
    return 0


def _bench(built: corpus.Corpus, corpus_name: str, sizes, reps: int, args) -> None:
    files = list(built.files)
    kinds = {path: corpus.kind(path) for path in files}
    megapixels = {path: _megapixels(path) for path in files}
    out = Path(tempfile.mkdtemp(prefix="parroter-bench-"))
    try:
        runners: dict[str, RUNNER] = {
            "tutorial": lambda path, folder: tutorial(path, folder, sizes),
            "pipeline": lambda path, folder: run_pipeline(path, folder, sizes),
            "decode floor": lambda path, folder: decode_floor(path, sizes),
        }
        if pyvips is not None:
            runners["libvips floor"] = lambda path, folder: vips_decode_floor(path, sizes)
            runners["pipe+libvips"] = lambda path, folder: run_pipeline(
                path, folder, sizes, libvips=True
            )
            runners["bare minimum"] = lambda path, folder: bare_minimum(path, sizes)
        vips = None if args.no_vips else shutil.which("vipsthumbnail")
        tallies = {name: Tally() for name in [*runners, *(["vipsthumbnail"] if vips else [])]}
        logger.info(
            "corpus: %d files, %.0f MP, from %s",
            len(files),
            sum(megapixels.values()),
            ", ".join(built.sources),
        )
        logger.info("warm-up pass")
        for runner in runners.values():
            _run(runner, files, megapixels, out, Tally(), kinds)
        if vips:
            _run_vips(vips, files, megapixels, out, sizes, Tally())
        for rep in range(reps):
            logger.info("pass %d of %d", rep + 1, reps)
            for name, runner in runners.items():
                _run(runner, files, megapixels, out, tallies[name], kinds)
            if vips:
                _run_vips(vips, files, megapixels, out, sizes, tallies["vipsthumbnail"])
        quality = _quality(files, out, sizes)
        phones = _phone_rows(files, out, sizes) if corpus_name == "bench" else []
        memory = (
            {
                method: _measure_memory(built.big_jpeg, sizes, method)
                for method in ("pipeline", "tutorial")
            }
            if corpus_name == "bench"
            else {}
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if args.smoke:
            shutil.rmtree(built.files[0].parent, ignore_errors=True)

    _report(built, files, megapixels, sizes, reps, tallies, quality, memory)
    _report_kinds(tallies, reps)
    _report_phones(phones)


# --- the methods ------------------------------------------------------------------------


def tutorial(path: Path, out: Path, sizes: tuple[pipeline.ThumbnailSize, ...]) -> Path:
    """The Pillow tutorial's way, as most code does it."""
    destination = out / f"{path.stem}.tutorial.zip"
    with (
        # Pillow alone: pillow-heif's opener, which jobs.pipeline registers in this process,
        # is not the tutorial's.
        Image.open(path, formats=_pillow_formats()) as image,
        tempfile.TemporaryDirectory(dir=out) as temp,
        zipfile.ZipFile(destination, "w", zipfile.ZIP_DEFLATED) as archive,
    ):
        archive.write(path, path.name)
        for size in sizes:
            thumb = image.copy()
            thumb.thumbnail((size.width, size.height))
            target = Path(temp) / f"{path.stem}_{size.label}{path.suffix}"
            thumb.save(target)
            archive.write(target, target.name)
    return destination


def _pillow_formats() -> list[str]:
    Image.init()
    return [name for name in Image.OPEN if name != "HEIF"]


def run_pipeline(
    path: Path, out: Path, sizes: tuple[pipeline.ThumbnailSize, ...], libvips: bool = False
) -> Path:
    destination = out / f"{path.stem}.zip"
    with storage.atomic_file(destination) as archive:
        pipeline.write_archive(path.read_bytes(), path.name, archive, sizes, libvips=libvips)
    return destination


def decode_floor(path: Path, sizes: tuple[pipeline.ThumbnailSize, ...]) -> None:
    """Only decode: JPEGs at the smallest draft scale covering the largest thumbnail."""
    with Image.open(path) as image:
        if image.format in ("JPEG", "MPO"):
            turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            width, height = image.size[::-1] if turned else image.size
            largest = max(size.fit(width, height) for size in sizes)
            image.draft(None, largest[::-1] if turned else largest)
        image.load()


def vips_decode_floor(path: Path, sizes: tuple[pipeline.ThumbnailSize, ...]) -> None:
    """Only decode, with libvips: JPEG shrunk on load by 2, 4 or 8 and WebP scaled on load,
    each still covering the largest thumbnail; PNG (libspng) and the rest at full size."""
    data = path.read_bytes()
    image = pyvips.Image.new_from_buffer(data, "", access="sequential")
    loader = image.get("vips-loader")
    largest = max(size.fit(image.width, image.height) for size in sizes)
    ratio = min(image.width / largest[0], image.height / largest[1])
    if loader == "jpegload_buffer":
        shrink = next((step for step in (8, 4, 2) if ratio >= step), 1)
        image = pyvips.Image.new_from_buffer(data, "", access="sequential", shrink=shrink)
    elif loader == "webpload_buffer" and ratio > 1:
        image = pyvips.Image.new_from_buffer(data, "", access="sequential", scale=1 / ratio)
    image.avg()  # pulls every pixel through the decoder


def bare_minimum(path: Path, sizes: tuple[pipeline.ThumbnailSize, ...]) -> None:
    """What no way of making these thumbnails avoids, done the cheapest way available here:
    the best floor's decode (Pillow's JPEG draft; libvips for the rest, WebP scaled on
    load), Lanczos-3 to each size in turn in libvips (the cheapest Lanczos here: 3.4 times
    Pillow's on a JPEG draft), each thumbnail encoded as the pipeline encodes it, in
    memory, alpha premultiplied as a correct resize needs. Nothing else: no header checks,
    orientation, colour, metadata, original, zip or file. The pipeline / best floor target
    cannot be met where this alone costs more than the floor / 0.85."""
    with Image.open(path) as opened:
        input_format = opened.format
    if input_format in ("JPEG", "MPO"):
        with Image.open(path) as image:
            largest = max(size.fit(*image.size) for size in sizes)
            image.draft(None, largest)
            image.load()
            bands = len(image.getbands())
            decoded = pyvips.Image.new_from_memory(
                image.tobytes(), image.width, image.height, bands, "uchar"
            )
    else:
        data = path.read_bytes()
        decoded = pyvips.Image.new_from_buffer(data, "", access="sequential")
        largest = max(size.fit(decoded.width, decoded.height) for size in sizes)
        ratio = min(decoded.width / largest[0], decoded.height / largest[1])
        if decoded.get("vips-loader") == "webpload_buffer" and ratio > 1:
            decoded = pyvips.Image.new_from_buffer(data, "", access="sequential", scale=1 / ratio)
    output_format = pipeline.output_format_for(input_format)
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[decoded.bands]
    if output_format == "JPEG" and mode != "RGB":
        decoded = (
            decoded.extract_band(0, n=3) if decoded.bands == 4 else decoded.colourspace("srgb")
        )
        mode = "RGB"
    source = (decoded / 257).cast("uchar") if decoded.format == "ushort" else decoded
    alpha = mode in ("LA", "RGBA")
    for size in sorted(set(sizes), reverse=True):
        width, height = size.fit(source.width, source.height)
        # The pipeline's own: premultiplied in 8 bits (or transparent pixels' colours bleed
        # into the edges), then reduced and Lanczos, all in 8 bits.
        source = pipeline._libvips_lanczos(source, (width, height), alpha=alpha).copy_memory()
        thumbnail = Image.frombuffer(mode, (width, height), source.write_to_memory(), "raw")
        pipeline.encode(thumbnail, output_format, pipeline.EncodeOptions())


def _run(
    runner: RUNNER, files, megapixels, out: Path, tally: Tally, kinds: dict[Path, str]
) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    for path in files:
        started = time.process_time()
        try:
            runner(path, out)
        except Exception as exc:  # a bench counts failures, it does not stop
            tally.failed += 1
            tally.errors.add(f"{path.name}: {type(exc).__name__}: {exc}"[:160])
        else:
            tally.images += 1
            tally.megapixels += megapixels[path]
            kind = kinds[path]
            tally.kind_cpu[kind] = tally.kind_cpu.get(kind, 0.0) + time.process_time() - started
            tally.kind_files[kind] = tally.kind_files.get(kind, 0) + 1
    tally.wall += time.perf_counter() - wall
    tally.cpu += time.process_time() - cpu
    for leftover in out.glob("*.zip"):
        leftover.unlink()


def _run_vips(vips: str, files, megapixels, out: Path, sizes, tally: Tally) -> None:
    environment = {**os.environ, "VIPS_CONCURRENCY": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    made = 0
    for size in sizes:
        result = subprocess.run(
            [vips, "--size", f"{size.label}>", "-o", f"{out}/%s_{size.label}.jpg[Q=85]"]
            + [str(path) for path in files],
            env=environment,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode:
            tally.errors.add(result.stderr.strip().splitlines()[0][:160])
        made += len(list(out.glob(f"*_{size.label}.jpg")))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tally.wall += time.perf_counter() - wall
    tally.cpu += (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    done = [path for path in files if (out / f"{path.stem}_{sizes[-1].label}.jpg").exists()]
    tally.images += len(done)
    tally.failed += len(files) - len(done)
    tally.megapixels += sum(megapixels[path] for path in done)
    for leftover in out.glob("*.jpg"):
        leftover.unlink()


# --- quality ----------------------------------------------------------------------------


@dataclass
class Quality:
    differences: list[float] = field(default_factory=list)
    misoriented: int = 0
    failed: int = 0

    def line(self, name: str) -> str:
        mean = sum(self.differences) / len(self.differences) if self.differences else float("nan")
        worst = max(self.differences, default=float("nan"))
        return (
            f"  {name:<10} mean abs diff {mean:5.2f} (worst {worst:5.2f}) over "
            f"{len(self.differences)} thumbnails; wrongly oriented {self.misoriented}, "
            f"failed {self.failed}"
        )


def _report_kinds(tallies: dict[str, Tally], reps: int) -> None:
    """CPU seconds per pass, per format: the pipeline against the tutorial and the floors."""
    write = sys.stdout.write
    pipe, tut, floor = tallies["pipeline"], tallies["tutorial"], tallies["decode floor"]
    vips = tallies.get("libvips floor")
    with_vips = tallies.get("pipe+libvips")
    bare = tallies.get("bare minimum")
    write(
        "\nper format, CPU s per pass (one core); floors decode only, at reduced scale where "
        "the library can:\n"
    )
    write(
        f"{'format':<18}{'files':>6}{'pipeline':>10}{'tutorial':>10}{'ratio':>7}"
        f"{'Pillow floor':>14}{'libvips floor':>15}{'pipe/best floor':>17}"
        f"{'pipe+libvips':>14}{'its/best floor':>16}{'bare minimum':>14}{'its/best floor':>16}\n"
    )
    totals = [0.0] * 7
    for kind in corpus.KINDS:
        files = pipe.kind_files.get(kind, 0) // reps
        if not files:
            continue
        figures = [
            tally.kind_cpu.get(kind, float("nan")) / reps if tally else float("nan")
            for tally in (pipe, tut, floor, vips)
        ]
        best = min(value for value in figures[2:] if value == value)
        after, least = (
            tally.kind_cpu.get(kind, float("nan")) / reps if tally else float("nan")
            for tally in (with_vips, bare)
        )
        for index, value in enumerate([*figures, best, after, least]):
            totals[index] += value if value == value else 0.0
        write(_kind_line(kind, files, *figures, best, after, least))
    write(_kind_line("all", pipe.images // reps, *totals))
    write(
        "  (pipe/best floor: the best floor's CPU s over the pipeline's; target >= 0.85;\n"
        "   bare minimum: the floor's decode, Lanczos to each size and encoding, nothing else:\n"
        "   its / best floor is the most any pipeline reaches with these libraries)\n"
    )


def _kind_line(name, files, pipe, tut, pillow, vips, best, after, least) -> str:
    vips_text = f"{vips:>15.2f}" if vips == vips and vips else f"{'-':>15}"
    after_text, least_text = (
        f"{value:>14.2f}{best / value:>16.2f}" if value == value and value else f"{'-':>30}"
        for value in (after, least)
    )
    return (
        f"{name:<18}{files:>6}{pipe:>10.2f}{tut:>10.2f}{tut / pipe:>6.2f}x"
        f"{pillow:>14.2f}{vips_text}{best / pipe:>17.2f}{after_text}{least_text}\n"
    )


def _quality(files: list[Path], out: Path, sizes) -> dict[str, Quality]:
    """Mean absolute difference (0-255) to a full decode + Lanczos reference, per method."""
    results = {"tutorial": Quality(), "pipeline": Quality()}
    methods: list[tuple[str, Callable]] = [("tutorial", tutorial), ("pipeline", run_pipeline)]
    if pyvips is not None:
        results["pipe+libvips"] = Quality()
        methods.append(
            ("pipe+libvips", lambda *args: run_pipeline(*args, libvips=True)),
        )
    for path in files:
        references = _references(path, sizes)
        if references is None:
            continue
        for name, runner in methods:
            try:
                destination = runner(path, out, sizes)
                with zipfile.ZipFile(destination) as archive:
                    members = archive.namelist()[1:]
                    thumbs = [Image.open(io.BytesIO(archive.read(m))) for m in members]
                destination.unlink()
            except Exception:
                results[name].failed += 1
                continue
            # The tutorial names a thumbnail after its box, the pipeline after its real size.
            by_label = {
                m.rsplit("_", 1)[1].split(".")[0]: t for m, t in zip(members, thumbs, strict=True)
            }
            for size, reference in zip(sizes, references, strict=True):
                made = by_label.get(size.label) or by_label.get(
                    f"{reference.width}x{reference.height}"
                )
                if made is None:
                    results[name].misoriented += 1
                    continue
                thumb = _comparable(made)
                if thumb.size != reference.size:
                    if (
                        thumb.size[::-1] == reference.size
                        or abs(thumb.width / thumb.height - reference.width / reference.height)
                        > 0.1
                    ):
                        results[name].misoriented += 1
                        continue
                    thumb = thumb.resize(reference.size, Image.Resampling.LANCZOS)
                difference = ImageChops.difference(thumb, reference)
                results[name].differences.append(sum(ImageStat.Stat(difference).mean) / 3)
    return results


def _references(path: Path, sizes) -> list[Image.Image] | None:
    try:
        with Image.open(path) as image:
            image.load()
            upright = _comparable(ImageOps.exif_transpose(image))
    except Exception:
        return None
    return [upright.resize(size.fit(*upright.size), Image.Resampling.LANCZOS) for size in sizes]


def _comparable(image: Image.Image) -> Image.Image:
    """RGB as a person sees it: alpha laid on white, 16-bit grey scaled to 8 bits."""
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return image.convert("RGB")


# --- memory -----------------------------------------------------------------------------


def _measure_memory(big: Path, sizes, method: str) -> dict[str, float]:
    """Peak RSS of a fresh process making one archive of the big JPEG."""
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--measure-memory",
            str(big),
            "--method",
            method,
            "--sizes",
            ",".join(size.label for size in sizes),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        logger.warning("memory measurement of %s failed: %s", method, result.stderr[-400:])
        return {}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _measure_memory_here(big: Path, sizes, method: str) -> int:
    Image.MAX_IMAGE_PIXELS = None
    baseline = _peak_rss_mb()
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        if method == "tutorial":
            tutorial(big, Path(folder), sizes)
        else:
            run_pipeline(big, Path(folder), sizes)
        seconds = time.perf_counter() - started
    peak = _peak_rss_mb()
    with Image.open(big) as image:
        megapixels = image.width * image.height / 1e6
    sys.stdout.write(
        json.dumps(
            {
                "peak_mb": peak,
                "baseline_mb": baseline,
                "megapixels": megapixels,
                "file_mb": big.stat().st_size / 1e6,
                "seconds": seconds,
            }
        )
        + "\n"
    )
    return 0


def _peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM starts afresh at exec; ru_maxrss may not."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the report -------------------------------------------------------------------------


def _megapixels(path: Path) -> float:
    with Image.open(path) as image:
        return image.width * image.height / 1e6


PHONE_SUFFIXES = (".heic", ".avif")


def _phone_rows(files: list[Path], out: Path, sizes) -> list[str]:
    """One timed run of each method on each phone photo (HEIC, AVIF): what it did."""
    rows = []
    for path in (path for path in files if path.suffix in PHONE_SUFFIXES):
        for name, runner in (("pipeline", run_pipeline), ("tutorial", tutorial)):
            wall = time.perf_counter()
            try:
                runner(path, out, sizes).unlink()
            except Exception as exc:  # reported, not raised: the tutorial cannot read HEIC
                rows.append(
                    f"  {path.name:<12} {name:<10} failed: {type(exc).__name__}: {exc}"[:160]
                )
            else:
                seconds = time.perf_counter() - wall
                rows.append(f"  {path.name:<12} {name:<10} ok in {seconds:.2f} s")
    return rows


def _report_phones(rows: list[str]) -> None:
    if not rows:
        return
    sys.stdout.write("\nphone formats, one run each:\n")
    for row in rows:
        sys.stdout.write(row + "\n")


def _report(built, files, megapixels, sizes, reps, tallies, quality, memory) -> None:
    write = sys.stdout.write
    write(
        f"Parroter pipeline benchmark: {len(files)} files, "
        f"{sum(megapixels.values()):.0f} MP, sizes {','.join(s.label for s in sizes)}, "
        f"{reps} measured pass(es) after a warm-up, one process\n"
    )
    write(f"corpus: {', '.join(built.sources)}\n\n")
    write(HEADER + "\n")
    for name, tally in tallies.items():
        if tally.images:
            write(tally.line(name) + "\n")
    pipe, tut, floor = tallies["pipeline"], tallies["tutorial"], tallies["decode floor"]
    write("\n")
    write(
        f"pipeline / tutorial      {pipe.images / pipe.wall / (tut.images / tut.wall):5.2f}x "
        f"wall, {pipe.images / pipe.cpu / (tut.images / tut.cpu):5.2f}x per core "
        "(target >= 2.5x per core)\n"
    )
    write(
        f"pipeline / decode floor  {pipe.images / pipe.wall / (floor.images / floor.wall):5.2f} "
        f"wall, {pipe.images / pipe.cpu / (floor.images / floor.cpu):5.2f} per core "
        "(target >= 0.75)\n"
    )
    with_vips = tallies.get("pipe+libvips")
    if with_vips is not None and with_vips.images:
        # LIBVIPS_DECODE's default: what a worker runs unless told otherwise.
        write(
            f"pipe+libvips / tutorial  "
            f"{with_vips.images / with_vips.cpu / (tut.images / tut.cpu):5.2f}x per core, "
            f"/ decode floor {with_vips.images / with_vips.cpu / (floor.images / floor.cpu):5.2f} "
            "per core (pipe+libvips is the default, LIBVIPS_DECODE on; pipeline is Pillow alone)\n"
        )
    if "vipsthumbnail" in tallies and tallies["vipsthumbnail"].images:
        vips = tallies["vipsthumbnail"]
        write(
            f"pipeline / vipsthumbnail {pipe.images / pipe.cpu / (vips.images / vips.cpu):5.2f} "
            "per core (vips: thumbnails only, no zip)\n"
        )
    for name, tally in tallies.items():
        for error in sorted(tally.errors)[:5]:
            write(f"  {name} failure: {error}\n")
    write("\nquality vs full decode + Lanczos reference (0-255 levels):\n")
    for name, result in quality.items():
        write(result.line(name) + "\n")
    if not memory:
        return
    write("\nmemory, one archive of the big JPEG in a fresh process (target < 300 MB):\n")
    for name, figures in memory.items():
        if figures:
            write(
                f"  {name:<10} {figures['megapixels']:.0f} MP JPEG ({figures['file_mb']:.0f} MB): "
                f"peak RSS {figures['peak_mb']:.0f} MB (interpreter + imports "
                f"{figures['baseline_mb']:.0f} MB), {figures['seconds']:.2f} s\n"
            )
        else:
            write(f"  {name:<10} measurement failed\n")


if __name__ == "__main__":
    sys.exit(main())
