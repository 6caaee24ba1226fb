"""The pipeline's memory budget: estimates from the header, refusals that name the budget,
and peaks measured in fresh processes. No Django; inputs are made in code."""

from __future__ import annotations

import io
import json
import mmap
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from jobs import pipeline
from jobs.pipeline import ImageRejected, Limits, ThumbnailSize, parse_sizes, write_archive

from . import big_images

ROOT = Path(__file__).resolve().parents[2]
LARGE = "3840x3840,1024x1024,256x256"
# Twenty boxes up to the largest allowed: the "many large sizes".
MANY = ",".join(f"{edge}x{edge}" for edge in range(4096, 0, -205))

# Runs in a fresh process: the estimate for the file plus what opening it holds (a WebP's
# canvases), then the peak resident memory that write_archive adds to what the process held
# before (VmHWM against VmRSS), in bytes.
MEASURE = r"""
import io, json, sys, tempfile
from pathlib import Path
from PIL import Image
from jobs import pipeline

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

data = Path(sys.argv[1]).read_bytes()
sizes = pipeline.parse_sizes(sys.argv[2])
libvips = sys.argv[3] == "libvips"
options = pipeline.EncodeOptions(**json.loads(sys.argv[4]))
limits = pipeline.Limits(max_pixels=10**9)
for image_format in ("JPEG", "PNG", "WEBP"):  # code paged in before measuring
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, image_format)
    Image.open(buffer).load()
if libvips:  # as a pool process does (jobs/worker.py)
    assert pipeline.warm_up_libvips()
held = pipeline.memory_in_use()
with pipeline.open_image(data, limits) as image:
    opening = pipeline.memory_in_use() - held
    estimate = pipeline.estimate_memory(image, sizes, data, options, libvips=libvips)
    planned = pipeline._libvips_target(image, data, sizes, options)
    if libvips and image.format in pipeline.LIBVIPS_FORMATS:
        assert planned is not None
        estimate = pipeline._libvips_estimate(image, planned[0], estimate)
before = status("VmRSS")
with tempfile.TemporaryFile() as out:
    pipeline.write_archive(
        data, Path(sys.argv[1]).name, out, sizes, limits=limits, options=options,
        libvips=libvips,
    )
print(json.dumps({"estimate": opening + estimate.peak, "measured": status("VmHWM") - before}))
"""


def in_a_fresh_process(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `script` in a new interpreter: its memory figures are its own, from its start."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def measure(
    tmp_path: Path,
    name: str,
    data: bytes,
    sizes: str,
    decoder: str = "pillow",
    options: dict[str, object] | None = None,
) -> dict[str, int]:
    path = tmp_path / name
    path.write_bytes(data)
    result = in_a_fresh_process(MEASURE, str(path), sizes, decoder, json.dumps(options or {}))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- the estimate against reality --------------------------------------------------------

MEASURED = {
    "palette PNG 20 MP": (lambda: big_images.png(5000, 4000, "P"), LARGE),
    "palette PNG, transparent, 20 MP": (
        lambda: big_images.png(5000, 4000, "P", transparency=True),
        LARGE,
    ),
    "16-bit grey PNG 20 MP": (lambda: big_images.png(5000, 4000, "I;16"), LARGE),
    "RGBA PNG 12 MP": (lambda: big_images.png(4000, 3000, "RGBA"), LARGE),
    "progressive JPEG 12 MP": (lambda: big_images.jpeg(4000, 3000, progressive=True), LARGE),
    "baseline JPEG 12 MP, drafted": (lambda: big_images.jpeg(4000, 3000), "512x512,128x128"),
    "WebP 6 MP": (lambda: big_images.webp(3000, 2000), LARGE),
    # Kept at its size by every box: encoded to WebP with its alpha, at about 19 B a pixel.
    "RGBA WebP 3 MP": (lambda: big_images.webp(2000, 1500, "RGBA"), LARGE),
    # Boxes over 2000 px all fit it to its own size: one thumbnail encoded, stored 11 times.
    "palette PNG 4 MP, 20 sizes": (lambda: big_images.png(2000, 2000, "P"), MANY),
    "HEIC 6 MP": (lambda: big_images.heic(3000, 2000), LARGE),
    "HEIC with alpha 6 MP": (lambda: big_images.heic(3000, 2000, "RGBA"), LARGE),
    "AVIF 12 MP": (lambda: big_images.avif(4000, 3000), LARGE),
    # 16x16 pixels, but libtiff decodes the one 4096x8192 tile they are in whole.
    "TIFF of 16x16 in one 128 MB tile": (
        lambda: big_images.tiff_in_one_tile(16, 16, (4096, 8192)),
        LARGE,
    ),
}


@pytest.mark.parametrize("case", MEASURED)
def test_estimate_memory_covers_the_peak_measured_in_a_fresh_process(case, tmp_path):
    make, sizes = MEASURED[case]
    figures = measure(tmp_path, "input", make(), sizes)
    # Never under what write_archive really held, and not far over it either.
    assert figures["measured"] <= figures["estimate"]
    assert figures["estimate"] <= figures["measured"] * 1.3 + pipeline.MEMORY_SLACK


def interlaced_png(width: int, height: int) -> bytes:
    """An Adam7 RGBA PNG, which libvips decodes whole before it can stream it."""
    pyvips = pytest.importorskip("pyvips")
    flat = pyvips.Image.new_from_buffer(big_images.png(width, height, "RGBA"), "")
    return flat.pngsave_buffer(interlace=True, compression=1)


def rgb_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    big_images.gradient(width, height, "RGB").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


LIBVIPS_MEASURED = {
    "RGBA PNG 12 MP": (lambda: big_images.png(4000, 3000, "RGBA"), LARGE),
    "RGB PNG 20 MP": (lambda: rgb_png(5000, 4000), "512x512,128x128"),
    "interlaced RGBA PNG 12 MP": (lambda: interlaced_png(4000, 3000), "512x512,128x128"),
    "WebP 6 MP": (lambda: big_images.webp(3000, 2000), "512x512,128x128"),
    "RGBA WebP 12 MP": (lambda: big_images.webp(4000, 3000, "RGBA"), LARGE),
    # Decoded by Pillow (a 1600x1200 draft), resized by libvips from a copy of it.
    "baseline JPEG 8 MP, drafted": (lambda: big_images.jpeg(3200, 2400), "1500x1500,512x512"),
}


@pytest.mark.parametrize(
    ("make", "sizes"),
    [
        pytest.param(lambda: big_images.jpeg(2400, 2400), "2400x2400,512x512", id="JPEG"),
        pytest.param(lambda: big_images.png(2000, 2000, "RGBA"), "2000x2000", id="RGBA PNG"),
    ],
)
def test_estimate_memory_counts_what_the_avif_encoder_holds(make, sizes, tmp_path):
    figures = measure(tmp_path, "input", make(), sizes, options={"format": "avif"})
    assert figures["measured"] <= figures["estimate"]


def test_estimate_memory_counts_where_attention_looks_for_the_busiest_part(tmp_path):
    # Cut from the whole 30000x1500 panorama: its grey copy and edges are made to look.
    data = big_images.png(30000, 1500, "L")
    options = {"fit": "cover", "gravity": "attention"}
    figures = measure(tmp_path, "input", data, "1500x1500,256x256", options=options)
    assert figures["measured"] <= figures["estimate"]


@pytest.mark.parametrize("output", ["webp", "avif", "jpeg"])
def test_estimate_memory_of_a_cover_counts_the_encoder_on_the_cut(output, tmp_path):
    # Scaled to 9600x2000 and cut to 2000x2000: the encoder sees only the cut.
    data = big_images.png(12000, 2500, "RGBA")
    options = {"fit": "cover", "format": output}
    figures = measure(tmp_path, "input", data, "2000x2000,512x512", options=options)
    assert figures["measured"] <= figures["estimate"]
    assert figures["estimate"] <= figures["measured"] * 1.3 + pipeline.MEMORY_SLACK


@pytest.mark.parametrize("case", LIBVIPS_MEASURED)
def test_libvips_estimate_covers_the_peak_measured_in_a_fresh_process(case, tmp_path):
    pytest.importorskip("pyvips")
    make, sizes = LIBVIPS_MEASURED[case]
    figures = measure(tmp_path, "input", make(), sizes, "libvips")
    assert figures["measured"] <= figures["estimate"]


def test_estimate_memory_counts_two_bytes_a_sample_for_progressive_coefficients():
    baseline = big_images.jpeg(1600, 1200)
    progressive = big_images.jpeg(1600, 1200, progressive=True)
    sizes = parse_sizes("1600x1600")
    with Image.open(io.BytesIO(baseline)) as image:
        plain = pipeline.estimate_memory(image, sizes, baseline)
    with Image.open(io.BytesIO(progressive)) as image:
        assert image.info["progressive"]
        buffered = pipeline.estimate_memory(image, sizes, progressive)
    # 4:2:0: 200x150 blocks of luma and two of 100x75 of chroma, 64 coefficients of 2 bytes.
    assert buffered.decode - plain.decode == (200 * 150 + 2 * 100 * 75) * 128


def test_estimate_memory_decodes_a_jpeg_at_the_draft_scale_pillow_picks():
    data = big_images.jpeg(4000, 3000)
    sizes = parse_sizes("512x512")
    with Image.open(io.BytesIO(data)) as image:
        estimate = pipeline.estimate_memory(image, sizes, data)
        image.draft(None, (512, 384))
        assert image.size == (1000, 750)
    assert estimate.decode == 1000 * 750 * 4


def test_estimate_memory_of_a_webp_counts_what_its_decoder_adds_once_opened():
    data = big_images.webp(1000, 800)
    with Image.open(io.BytesIO(data)) as image:
        estimate = pipeline.estimate_memory(image, parse_sizes("64x64"), data)
    # Beyond the canvases the decoder allocated when the file was opened.
    extra = pipeline.WEBP_DECODER_BYTES - pipeline.WEBP_CANVAS_BYTES
    assert estimate.decode == 1000 * 800 * (4 + extra) + len(data)


def test_memory_in_use_reads_this_process():
    # A private mapping of its own: a bytearray could be carved out of heap that malloc
    # already holds from earlier tests, and then nothing would grow.
    held = pipeline.memory_in_use()
    size = 64 * pipeline.MiB
    with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as ballast:
        ballast[:: mmap.PAGESIZE] = b"\x01" * (size // mmap.PAGESIZE)  # touch every page
        assert pipeline.memory_in_use() >= held + size - pipeline.MiB
    assert pipeline.memory_in_use() < held + size


# --- refusals ----------------------------------------------------------------------------


def budget_around(data: bytes, sizes, extra: int) -> Limits:
    """A budget of what this process holds now, plus the image's estimate, plus `extra`."""
    with pipeline.open_image(data) as image:
        estimate = pipeline.estimate_memory(image, sizes, data)
    budget = pipeline.memory_in_use() + estimate.peak + extra
    return Limits(memory_bytes=budget // pipeline.MiB * pipeline.MiB)


def test_write_archive_refuses_an_image_over_the_memory_budget_before_decoding():
    data = big_images.jpeg(4000, 3000, progressive=True)
    sizes = parse_sizes(LARGE)
    # Cut in half: decoding it would fail as truncated, so the refusal comes first.
    truncated = data[: len(data) // 2]
    limits = budget_around(data, sizes, -32 * pipeline.MiB)
    with pytest.raises(ImageRejected) as refused:
        write_archive(truncated, "big.jpg", io.BytesIO(), sizes, limits=limits)
    message = str(refused.value)
    assert "4000x3000 RGB progressive JPEG" in message
    assert f"over this worker's {limits.memory_bytes // pipeline.MiB} MB memory budget" in message
    assert "(WORKER_MEMORY_MB); refused before decoding" in message


def test_write_archive_makes_an_image_that_fits_the_memory_budget():
    data = big_images.png(5000, 4000, "I;16")
    sizes = parse_sizes(LARGE)
    out = io.BytesIO()
    info = write_archive(
        data, "deep.png", out, sizes, limits=budget_around(data, sizes, 64 * pipeline.MiB)
    )
    assert info.thumbnails == {
        "3840x3840": (3840, 3072),
        "1024x1024": (1024, 819),
        "256x256": (256, 205),
    }
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == [
            "deep.png",
            "deep_3840x3072.png",
            "deep_1024x819.png",
            "deep_256x205.png",
        ]


def test_open_image_refuses_a_webp_canvas_over_the_budget_before_pillow_opens_it():
    # Pillow's WebP decoder would allocate its canvases as soon as it opens the file.
    data = big_images.webp_header(12000, 12000)
    with pytest.raises(
        ImageRejected, match=r"12000x12000 WEBP.*memory budget \(WORKER_MEMORY_MB\)"
    ):
        pipeline.open_image(data, Limits(memory_bytes=512 * pipeline.MiB))
    with pytest.raises(ImageRejected, match="corrupt image header"):
        pipeline.open_image(data, Limits())


def test_thumbnail_size_parse_refuses_a_side_over_max_edge_naming_the_budget():
    assert ThumbnailSize.parse("3840x2160") == ThumbnailSize(3840, 2160)
    assert ThumbnailSize.parse(f"{pipeline.MAX_EDGE}x1") == ThumbnailSize(pipeline.MAX_EDGE, 1)
    with pytest.raises(
        ValueError, match=f"between 1 and {pipeline.MAX_EDGE} pixels.*memory budget"
    ):
        ThumbnailSize.parse(f"{pipeline.MAX_EDGE + 1}x100")


# Runs in a fresh process with an OS limit on its data a little above what it holds.
UNDER_LIMIT = r"""
import io, resource, sys
from jobs import pipeline
from jobs.tests import big_images
data = {
    "PNG": lambda: big_images.png(6000, 6000, "P"),
    "TIFF": lambda: big_images.tiff_in_one_tile(16, 16, (8192, 8192)),
}[sys.argv[1]]()
held = pipeline.memory_in_use()
resource.setrlimit(resource.RLIMIT_DATA, (held + 96 * pipeline.MiB, resource.RLIM_INFINITY))
try:
    pipeline.write_archive(data, "p.png", io.BytesIO(), pipeline.parse_sizes("3840x3840"))
except BaseException as exc:
    print(type(exc).__name__)
"""


# Runs in a fresh process: a 4096x4096 WebP under a budget (and an OS limit on the data)
# of 200 MB beyond what the process holds: room for Pillow's canvases (134 MB, allocated
# when the file is opened) and libvips' reduced-scale decode, not for Pillow's own decode
# (17 bytes a pixel, 285 MB). Prints what each decoder made of it.
WEBP_UNDER_BUDGET = r"""
import io, resource
from jobs import pipeline
from jobs.tests import big_images
data = big_images.webp(4096, 4096)
assert pipeline.warm_up_libvips()
budget = pipeline.memory_in_use() + 200 * pipeline.MiB
resource.setrlimit(resource.RLIMIT_DATA, (budget, resource.RLIM_INFINITY))
for libvips in (True, False):
    out = io.BytesIO()
    try:
        info = pipeline.write_archive(
            data, "w.webp", out, pipeline.parse_sizes("512x512,128x128"), libvips=libvips,
            limits=pipeline.Limits(memory_bytes=budget),
        )
    except pipeline.ImageRejected as exc:
        print("refused:", exc)
    else:
        print("made:", ",".join(info.members))
"""


def test_a_large_webp_fits_a_budget_with_libvips_that_pillows_decode_does_not():
    result = in_a_fresh_process(WEBP_UNDER_BUDGET)
    assert result.returncode == 0, result.stderr
    with_libvips, with_pillow = result.stdout.splitlines()
    assert with_libvips == "made: w.webp,w_512x512.webp,w_128x128.webp"
    assert with_pillow.startswith("refused: decoding needs about")
    assert "4096x4096 RGB WEBP" in with_pillow
    assert "memory budget (WORKER_MEMORY_MB)" in with_pillow


@pytest.mark.parametrize("image_format", ["PNG", "TIFF"])
def test_write_archive_lets_a_memory_error_through_under_an_os_limit(image_format):
    # Without a budget in its limits the pipeline decodes, and the OS limit stops it: the
    # caller sees MemoryError (and records the budget), not a corrupt image. (libtiff's
    # decoder, a TIFF's tile 256 MB here, says so by Pillow's codec status alone.)
    result = in_a_fresh_process(UNDER_LIMIT, image_format)
    assert result.stdout.strip() == "MemoryError", result.stderr


# --- how the memory is saved -------------------------------------------------------------

MODES = {
    "P": lambda image: image.convert("P"),
    "P with transparency": lambda image: transparent(image.convert("P")),
    "PA": lambda image: image.convert("RGBA").convert("PA"),
    "LA": lambda image: image.convert("LA"),
    "RGBA": lambda image: image.convert("RGBA"),
    "I;16": lambda image: image.convert("L").point(lambda value: value * 200).convert("I;16"),
    "1": lambda image: image.convert("1"),
    "RGB": lambda image: image,
    "CMYK": lambda image: image.convert("CMYK"),
    "F": lambda image: image.convert("F"),
}


def transparent(image: Image.Image) -> Image.Image:
    image.info["transparency"] = 0
    return image


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(sorted(MODES)),
    width=st.integers(2, 240),
    height=st.integers(2, 240),
    box=st.tuples(st.integers(1, 250), st.integers(1, 250)),
    strip=st.integers(1, 3000),
)
def test_make_thumbnails_in_strips_gives_pillows_own_resize(mode, width, height, box, strip):
    source = MODES[mode](Image.effect_noise((width, height), 90).convert("RGB"))
    sizes = [ThumbnailSize(*box), ThumbnailSize(max(1, box[0] // 3), max(1, box[1] // 3))]
    made = {}
    previous = pipeline.STRIP_PIXELS
    for strip_pixels in (10**9, strip):  # in one go, then in strips of `strip` pixels
        pipeline.STRIP_PIXELS = strip_pixels
        try:
            thumbnails = pipeline.make_thumbnails(source.copy(), sizes, "PNG")
        finally:
            pipeline.STRIP_PIXELS = previous
        made[strip_pixels] = [(thumb.mode, thumb.size, thumb.tobytes()) for _, thumb in thumbnails]
    assert made[strip] == made[10**9]


def test_make_thumbnails_makes_each_size_from_a_larger_one():
    # Boxes sorted by width are not sorted by what they fit a square to: 500x100 makes a
    # 100x100 thumbnail, 400x400 one of 400x400, which must not be upscaled from the first.
    source = Image.effect_noise((1000, 1000), 90).convert("RGB")
    thumbnails = dict(
        pipeline.make_thumbnails(
            source.copy(), [ThumbnailSize(500, 100), ThumbnailSize(400, 400)], "PNG"
        )
    )
    reference = source.resize(
        (400, 400), Image.Resampling.LANCZOS, reducing_gap=pipeline.REDUCING_GAP
    )
    assert thumbnails[ThumbnailSize(400, 400)].tobytes() == reference.tobytes()
    assert thumbnails[ThumbnailSize(500, 100)].size == (100, 100)
