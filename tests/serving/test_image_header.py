"""Images whose headers promise huge pixel arrays stay refused (issue 15): bt_keras.serving.image_header and the pixel
limit the exported serving_default applies with it.

- `image_header` against Pillow's `.size` (an independent parser) and TensorFlow's decoded shapes, for random sizes
  in every format, and on edge cases: JPEG fill bytes / stand-alone markers / APPn before SOF, BMP top-down rows, GIF
  frames beyond the logical screen, every truncated prefix, adversarial structure.
- serving_default in a FRESH process (tests/subprocess_scripts/serving_probe.py) on conftest.py's `exported`: the
  1.1 MB 40000 x 40000 GIF, a ~650-byte JPEG whose header says 12000 x 12000, a valid 20000 x 20000 JPEG and others
  each get the pixel-limit InvalidArgumentError naming index 2 of the batch, in < 1 s and < 300 MB of resident growth.
"""

import io
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bt_keras.serving import image_header
from tests.helpers import REPO, SUBPROCESS_SCRIPTS
from tests.serving import hostile_images as hostile

pytestmark = pytest.mark.hostile

PROBE = SUBPROCESS_SCRIPTS / "serving_probe.py"
LIMIT = 50_000_000  # the export's max_image_pixels (the default)

read_header = tf.function(image_header.read_image_header, input_signature=[tf.TensorSpec([], tf.string)])


def header(data: bytes):
    """(format name, height, width, pixels) as Python values."""
    h = read_header(tf.constant(data))
    return image_header.FORMATS[int(h.format)], int(h.height), int(h.width), int(h.pixels)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


# ------------------------------------------------------------------------------------- header parser vs Pillow

# (Pillow format, save options, image modes it writes); PIL decides the container details (JFIF / EXIF APP
# segments, progressive SOF2, VP8 / VP8L / VP8X, palettes, 16-bit PNG).
FORMAT_CASES = [
    ("JPEG", {}, ("RGB", "L", "CMYK")),
    ("JPEG", {"progressive": True, "exif": b"Exif\x00\x00" + bytes(40)}, ("RGB", "L")),
    ("PNG", {}, ("RGB", "RGBA", "L", "P", "1", "I;16")),
    ("GIF", {}, ("RGB", "L", "P")),
    ("BMP", {}, ("RGB", "L", "P", "1")),
    ("WEBP", {"quality": 50}, ("RGB",)),  # lossy VP8
    ("WEBP", {"lossless": True}, ("RGB",)),  # VP8L
    ("WEBP", {"quality": 50}, ("RGBA",)),  # VP8X (alpha)
    ("WEBP", {"quality": 50, "exif": b"Exif\x00\x00" + bytes(20)}, ("RGB",)),  # VP8X (metadata)
]
CHECKED = 25  # of the random-sizes test's 26 images, those TensorFlow decodes (it declines some formats)


@pytest.mark.slow
def test_header_sizes_equal_pillow_and_tensorflow_for_random_sizes():
    """Every (format case, mode) of FORMAT_CASES once (two sizes for the one-mode WebP cases): each container path of
    the parser (JPEG SOF0 and progressive SOF2 after an EXIF APP1; PNG's IHDR; GIF's screen and frame; BMP's fields
    at every bit depth; WebP VP8, VP8L and both VP8X kinds), and for each case a side under 256 and one of 256 or
    more, so both bytes of every multi-byte size field are read. Sizes are log-uniform up to ~3000 per side."""
    sizes, rng = np.random.default_rng(37), np.random.default_rng(15)  # sizes drawn apart from the pixels
    checked, sides_seen = 0, {}
    for case, (fmt, options, modes) in enumerate(FORMAT_CASES):
        for trial in range(max(2, len(modes))):
            # log-uniform sizes from 1 to ~3000 per side (multi-byte fields, odd sizes), at most 0.4 MP
            height, width = np.exp(sizes.uniform(0, np.log(3000), 2)).astype(int) + 1
            if height * width > 400_000:
                height = max(1, 400_000 // width)
            if fmt == "WEBP":
                height, width = min(height, 700), min(width, 700)  # WebP encoding is the slow part
            sides_seen.setdefault(case, []).extend([height, width])
            mode = modes[trial % len(modes)]
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            data = encode(Image.fromarray(pixels).convert(mode), fmt, **options)
            name, h, w, count = header(data)
            reference = Image.open(io.BytesIO(data))
            assert (name, w, h, count) == (reference.format.replace("WEBP", "WebP"), *reference.size, w * h), (
                fmt, options, mode, height, width)
            try:
                decoded = tf.io.decode_image(data, expand_animations=False).shape
            except tf.errors.InvalidArgumentError:  # e.g. palette BMPs, CMYK: TF declines them after the header
                continue
            assert decoded[:2] == (h, w), (fmt, mode)
            checked += 1
    # The seed gives every case both byte widths (a new seed must too); TF decodes all but the ones it declines.
    assert all(min(sides) < 256 <= max(sides) for sides in sides_seen.values()), sides_seen
    assert checked >= CHECKED, checked


def test_gif_frames_count_all_of_them_and_grow_the_screen():
    # Pillow writes an animation of frames cropped to what changed (offsets, smaller sizes) with a comment and a
    # NETSCAPE loop extension; the frame areas come from Pillow's own parser (each frame's tile).
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 4, (90, 130), dtype=np.uint8), "L").convert("P")]
    for k in range(1, 6):
        frame = frames[-1].copy()
        frame.paste(k * 40, (7 * k, 3 * k, 7 * k + 20 + k, 3 * k + 15))
        frames.append(frame)
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0, comment=b"hello",
                  optimize=False, disposal=1)
    reference = Image.open(io.BytesIO(data))
    areas = []
    for k in range(reference.n_frames):
        reference.seek(k)
        x0, y0, x1, y1 = reference.tile[0][1]
        areas.append((x1 - x0) * (y1 - y0))
    assert reference.n_frames == 6 and len(set(areas)) > 1  # really cropped frames
    assert header(data) == ("GIF", 90, 130, max(90 * 130, sum(areas)))

    # A frame larger than (and offset from) a 1 x 1 logical screen: Pillow grows the size to left + width,
    # top + height; so do we, and TensorFlow's decoded image fits inside.
    big = hostile.constant_gif(1, 1, frames=[hostile.gif_frame(300, 200, left=5, top=7)])
    assert Image.open(io.BytesIO(big)).size == (305, 207)
    assert header(big) == ("GIF", 207, 305, 207 * 305)
    assert tf.io.decode_image(big, expand_animations=False).shape[:2] == (200, 300)

    # Forty 1000 x 1000 frames on a 1000 x 1000 screen: giflib holds all of them, so they all count.
    many = hostile.constant_gif(1000, 1000, frames=[hostile.gif_frame(1000, 1000)] * 40)
    assert header(many) == ("GIF", 1000, 1000, 40_000_000)


def test_hand_built_images_are_valid():
    """The builders of the hostile images make real files: small instances decode in Pillow and TensorFlow."""
    for width, height in [(1, 1), (37, 53), (3000, 3000)]:  # 3000^2 spans two LZW tables (clear codes)
        gif = hostile.constant_gif(width, height)
        assert header(gif) == ("GIF", height, width, height * width)
        assert (np.asarray(Image.open(io.BytesIO(gif)).convert("RGB")) == (10, 20, 30)).all()
        assert (tf.io.decode_image(gif, expand_animations=False).numpy() == (10, 20, 30)).all()
    for width, height in [(1, 1), (9, 17), (26, 8), (1000, 777)]:
        jpeg = hostile.constant_jpeg(width, height)
        assert header(jpeg) == ("JPEG", height, width, height * width)
        assert (np.asarray(Image.open(io.BytesIO(jpeg))) == 128).all()
        assert tf.io.decode_image(jpeg).shape == (height, width, 1)
    Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS  # Pillow reads only the header here
    try:
        assert Image.open(io.BytesIO(hostile.constant_gif(40000, 40000))).size == (40000, 40000)
        assert Image.open(io.BytesIO(hostile.constant_jpeg(20000, 20000))).size == (20000, 20000)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _jpeg(width=40, height=30):
    return encode(Image.new("RGB", (width, height), (9, 99, 199)), "JPEG")


def test_jpeg_marker_walk_matches_libjpeg():
    """Bytes libjpeg accepts before SOF (TensorFlow decodes each to the same size), and what it does not."""
    plain = _jpeg()
    cut = 4 + struct.unpack(">H", plain[4:6])[0]  # after SOI and Pillow's APP0 (FF D8 FF stays the magic)
    inserted = {
        "fill bytes": b"\xff\xff\xff",
        "TEM and RST markers": b"\xff\x01\xff\xd0\xff\xd7",
        "APP1 and COM segments": b"\xff\xe1\x00\x10" + bytes(14) + b"\xff\xfe\x00\x05abc",
        "a 64 KB APP2 segment": b"\xff\xe2\xff\xff" + bytes(0xFFFD),
        "stray bytes before a marker": b"junk",
        "a stuffed FF 00 pair": b"\xff\x00",
    }
    for what, extra in inserted.items():
        data = plain[:cut] + extra + plain[cut:]
        assert header(data) == ("JPEG", 30, 40, 1200), what
        assert tf.io.decode_image(data).shape == (30, 40, 3), what
    sos_first = plain[:cut] + b"\xff\xda\x00\x08" + bytes(6) + plain[cut:]
    assert header(sos_first)[1:] == (-1, -1, -1)  # a scan before any frame header: size unknown
    assert header(hostile.jpeg_with_size(plain, 12000, 12000)) == ("JPEG", 12000, 12000, 144_000_000)


def test_bmp_top_down_and_webp_and_unknown():
    bottom_up = encode(Image.new("RGB", (21, 13), (1, 2, 3)), "BMP")
    top_down = bottom_up[:22] + struct.pack("<i", -13) + bottom_up[26:]  # negative height: rows stored top-down
    assert Image.open(io.BytesIO(top_down)).size == (21, 13)
    assert tf.io.decode_image(top_down).shape == (13, 21, 3)
    assert header(top_down) == ("BMP", 13, 21, 273)
    assert header(b"") == ("unknown", -1, -1, -1)
    assert header(b"this is not an image")[0] == "unknown"
    assert header(b"\xff\x0a\xfa\x7f")[0] == "unknown"  # JPEG XL: not parsed, so refused by serving
    webp = encode(Image.new("RGB", (16383, 3)), "WEBP", lossless=True)  # VP8L's 14-bit maximum
    assert header(webp) == ("WebP", 3, 16383, 3 * 16383)


@pytest.mark.slow
def test_every_truncated_prefix_gives_the_true_size_or_unknown():
    """A header cut anywhere is never misread: each prefix reports the full image's size, or -1."""
    images = {
        "JPEG": _jpeg(300, 200),
        "PNG": encode(Image.new("RGB", (300, 200)), "PNG"),
        "GIF": encode(Image.new("P", (300, 200)), "GIF"),
        "BMP": encode(Image.new("RGB", (300, 200)), "BMP"),
        "WebP": encode(Image.new("RGB", (300, 200)), "WEBP"),
    }
    for name, data in images.items():  # all of a format's prefixes in one batch: the reader serving_default runs
        _, heights, widths, pixels = image_header.read_image_headers(
            tf.constant([data[:cut] for cut in range(min(len(data), 400))]))
        for cut, (h, w, p) in enumerate(zip(heights.numpy(), widths.numpy(), pixels.numpy())):
            assert (h, w) in ((-1, -1), (200, 300)), (name, cut)
            assert p <= 60000, (name, cut)


@pytest.mark.slow
def test_header_walks_are_bounded_on_adversarial_structure():
    """1 MB of 2-byte GIF sub-blocks, of 3-byte GIF extensions, or of 4-byte JPEG comment segments: the walk's cost
    per byte is bounded (vectorised windows for GIF, a segment cap for JPEG), not per structure element."""
    gif_head = hostile.constant_gif(10, 10, frames=[])[:-1]
    descriptor = b"\x2c" + struct.pack("<4HB", 0, 0, 10, 10, 0) + b"\x02"
    cases = {
        "GIF of 2-byte sub-blocks": gif_head + descriptor + b"\x01\x00" * 500_000 + b"\x00\x3b",
        "GIF of 330000 extensions": gif_head + b"\x21\xf9\x00" * 330_000 + hostile.gif_frame(10, 10) + b"\x3b",
        "JPEG of 250000 comments": _jpeg()[:2] + b"\xff\xfe\x00\x02" * 250_000 + _jpeg()[2:],
        "JPEG of 1 MB of fill bytes": _jpeg()[:2] + b"\xff" * 1_000_000 + _jpeg()[2:],
    }
    for what, data in cases.items():
        header(data)  # trace and warm up
        start = time.perf_counter()
        fmt, h, w, _ = header(data)
        elapsed = time.perf_counter() - start
        assert elapsed < 3.0, (what, elapsed)  # measured 0.17-0.21 s on one shared core
        assert fmt in ("GIF", "JPEG")
        assert (h, w) in ((10, 10), (-1, -1)), what  # the JPEG walk gives up: unknown, so refused


def test_a_mixed_batch_reads_as_its_images_one_by_one():
    """The batched reader (all images step together; JPEG and GIF walks run on their subsets) equals per-image
    reads, whatever the mix and order."""
    images = [_jpeg(7, 5), b"", hostile.constant_gif(33, 44, frames=[hostile.gif_frame(33, 44)] * 3),
              encode(Image.new("RGB", (3, 9)), "PNG"), b"junk", _jpeg(300, 200)[:100], _jpeg(1, 2),
              hostile.constant_gif(1, 1, frames=[hostile.gif_frame(50, 60, left=2)]),
              encode(Image.new("RGB", (6, 4)), "BMP"), encode(Image.new("RGB", (5, 8)), "WEBP")]
    batch = image_header.read_image_headers(tf.constant(images))
    together = [(image_header.FORMATS[int(f)], int(h), int(w), int(p)) for f, h, w, p in zip(*batch)]
    assert together == [header(data) for data in images]
    assert together[2] == ("GIF", 44, 33, 3 * 44 * 33) and together[5][1:] == (-1, -1, -1)
    empty = image_header.read_image_headers(tf.zeros([0], tf.string))
    assert [v.shape for v in empty] == [(0,)] * 4


# ------------------------------------------------------------------------------------ the export and the probe


def _hostile_cases() -> dict:
    small_jpeg = _jpeg()
    return {
        # (bytes, substring the error must hold)
        "40000x40000 GIF": (hostile.constant_gif(40000, 40000), "is 40000 x 40000 pixels"),
        "40000x40000 GIF frame on a 1x1 screen": (hostile.constant_gif(1, 1, frames=[hostile.gif_frame(40000, 40000)]),
                                                  "is 40000 x 40000 pixels"),
        "40 frames of 2000x2000": (hostile.constant_gif(2000, 2000, frames=[hostile.gif_frame(2000, 2000)] * 40),
                                   "GIF frames hold 160000000 pixels in all"),
        "12000x12000-header JPEG": (hostile.jpeg_with_size(small_jpeg, 12000, 12000), "is 12000 x 12000 pixels"),
        "valid 20000x20000 JPEG": (hostile.constant_jpeg(20000, 20000), "is 20000 x 20000 pixels"),
        "PNG header 100000x100000": (_patched_png(100000, 100000), "is 100000 x 100000 pixels"),
        "WebP canvas 16777216x16777216": (_patched_webp(2**24, 2**24), "is 16777216 x 16777216 pixels"),
        "truncated JPEG body": (small_jpeg[:-200], "image 2 of the batch could not be decoded"),
        "empty string": (b"", "image 2 of the batch is an empty string"),
        "JPEG cut inside its header": (small_jpeg[:40], "has a JPEG header that is cut short"),
        # Under the pixel limit, but resized to the model's shorter side (18 px) it would be 3.6 million x 18.
        "thin 200000x1 PNG": (encode(Image.new("RGB", (200000, 1)), "PNG"), "an extreme aspect ratio"),
    }


def _patched_png(width, height):
    data = encode(Image.new("RGB", (4, 4)), "PNG")
    return data[:16] + struct.pack(">II", width, height) + data[24:]  # the IHDR CRC is now wrong: never read


def _patched_webp(width, height):
    data = encode(Image.new("RGBA", (4, 4)), "WEBP")
    assert data[12:16] == b"VP8X"
    return data[:24] + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little") + data[30:]


@pytest.fixture(scope="module")
def probe_report(exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    cases, manifest = _hostile_cases(), {"warmup": [], "cases": {}}
    cases["valid 1000x900 GIF"] = (hostile.constant_gif(1000, 900), None)
    for i, (name, (data, _)) in enumerate(cases.items()):
        (folder / f"{i}.bin").write_bytes(data)
        manifest["cases"][name] = str(folder / f"{i}.bin")
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP"):  # one decode of each format before anything is timed
        (folder / f"warmup.{fmt}").write_bytes(encode(Image.new("RGB", (20, 10), (50, 60, 70)), fmt))
        manifest["warmup"].append(str(folder / f"warmup.{fmt}"))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run([sys.executable, str(PROBE), str(exported), str(folder / "manifest.json"),
                             str(folder / "report.json")], env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "PROBE DONE" in result.stdout, result.stderr[-3000:]
    print("serving probe:", json.dumps(json.loads((folder / "report.json").read_text())))  # -s shows the numbers
    return json.loads((folder / "report.json").read_text()), cases


@pytest.mark.slow
def test_serving_refuses_hostile_images_before_decoding_in_bounded_time_and_memory(probe_report):
    report, cases = probe_report
    assert report["peak_reset"], "VmHWM could not be reset: the memory numbers would not be per request"
    for name, (_, expected) in cases.items():
        result = report["cases"][name]
        if expected is None:  # the control: a valid image under the limit is embedded
            assert result["error"] is None and result["shape"] == [3, 8], result
            continue
        assert result["error"] == "InvalidArgumentError", (name, result)
        assert "serving_default: image 2 of the batch" in result["message"] and expected in result["message"], (
            name, result["message"][-600:])
        if "pixels" in expected:
            assert f"more than {LIMIT} pixels (max_image_pixels={LIMIT})" in result["message"]
        assert result["seconds"] < 1.0, (name, result)
        assert result["growth_mb"] < 300, (name, result)


def test_resized_size_bound_equals_its_float_formula():
    rng = np.random.default_rng(5)
    heights = np.concatenate([rng.integers(1, 300_000, 400), [1, 1, 7, 200_000, 2**31]])
    widths = np.concatenate([rng.integers(1, 300_000, 400), [200_000, 1, 7, 1, 3]])
    for short_side, limit in ((18, 50_000_000), (256, 50_000_000), (37, 1_000)):
        got = image_header.resized_too_large(tf.constant(heights, tf.int64), tf.constant(widths, tf.int64),
                                             short_side, limit).numpy()
        short, long = np.minimum(heights, widths).astype(float), np.maximum(heights, widths).astype(float)
        np.testing.assert_array_equal(got, short_side * (long * short_side / short) > limit)
    assert not image_header.resized_too_large(tf.constant([5], tf.int64), tf.constant([10**9], tf.int64), None,
                                              10).numpy().any()  # no resize: nothing to bound
