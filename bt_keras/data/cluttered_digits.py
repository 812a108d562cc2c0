"""Cluttered digits: scikit-learn's 8x8 handwritten digits placed at random positions, scales and rotations on noisy
32x32 canvases strewn with fragments of other digits. Generated deterministically, offline, in under a second.

Why: on the plain digits (`bt_keras.data.sources`, dataset ``digits``) every digit is centred and fills its box, so
raw pixels already classify them almost perfectly and a pre-training has nothing to show. Here the same digits move,
grow, shrink and turn, among strokes that belong to no digit: pixel distances mostly measure where things are, and a
representation has to be invariant to position, scale and rotation, and ignore the clutter, to tell the digits apart,
which is what Barlow Twins' crops and rotations teach. The quickstart (`experiments/quickstart.py`) trains on it.

The recipe (all constants below), for each canvas:

* canvas: 32 x 32, grey, values 0..255 (uint8, repeated to RGB like ``digits``); background 0.
* the digit: one source image (8 x 8, values 0..16 scaled to 0..1), drawn by bilinear sampling with side
  ``DIGIT_SIZE`` = 12..20 px (uniform), rotated by ``ROTATION`` = -30..30 degrees (uniform) about its centre, the
  centre uniform over the positions that keep the unrotated square on the canvas.
* clutter: ``FRAGMENTS`` = 3..5 fragments, each a 4 x 4 window (half a digit's side; position uniform over the 5 x 5
  places in the 8 x 8 scan) of another source image of the same split, drawn like a digit (same size range, any
  rotation, 0..360 degrees) at a uniform position anywhere on the canvas, at a brightness of ``FRAGMENT_BRIGHTNESS``
  = 0.5..1 (uniform). Fragments are cut from the same split's digits only (never the canvas's own digit), so no test
  digit's strokes appear in a training canvas.
* compositing: the pixel-wise maximum of the digit and the fragments, plus Gaussian noise of standard deviation
  ``NOISE_STD`` = 0.08 (of the 0..1 range), clipped to 0..1 and rounded to 0..255.

Splits: the 1797 source digits are split once, by a fixed permutation of each class (seed ``SPLIT_SEED``), into 360
``test`` sources (36 of each class) and 1437 ``train`` sources (the plain digits' sizes); each source gives
``CANVASES_PER_SOURCE`` canvases (each with its own placement and clutter), so the splits share no source digit,
neither as a digit nor as clutter. Every split is generated from its own seeded `numpy.random.Generator`
(``GENERATION_SEED`` and the split's number), so the same split is the same bytes on every machine and call.

`generate(split)` returns the images, labels and what each canvas was made of (source index, centre, size, angle),
which the tests use to check the split and the variation. It is cached per process, so its arrays are read-only.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

CANVAS = 32
SCAN = 8  # sklearn's digits are 8 x 8 scans, values 0..16
DIGIT_SIZE = (12.0, 20.0)  # side of the drawn 8 x 8 scan, px
ROTATION = (-30.0, 30.0)  # degrees, the digit's
FRAGMENTS = (3, 5)  # per canvas, inclusive
FRAGMENT_WINDOW = 4  # side of the window cut from another scan, in scan pixels
FRAGMENT_BRIGHTNESS = (0.5, 1.0)
NOISE_STD = 0.08
TEST_SOURCES = 360
CANVASES_PER_SOURCE = {"train": 2, "test": 2}
SPLIT_SEED = 27
GENERATION_SEED = 2021
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class ClutteredDigits:
    """One split: ``images`` uint8 [N, 32, 32, 3], ``labels`` int32 [N] and, per canvas, the index of its digit in
    `sklearn.datasets.load_digits` (``sources``), the digit's ``centres`` [N, 2] (row, column, px), ``sizes`` [N]
    (px) and ``angles`` [N] (degrees), and the indices of the digits its fragments were cut from (``fragment_sources``,
    [N, 5], -1 where a canvas has fewer fragments)."""

    images: np.ndarray
    labels: np.ndarray
    sources: np.ndarray
    centres: np.ndarray
    sizes: np.ndarray
    angles: np.ndarray
    fragment_sources: np.ndarray


@functools.lru_cache(maxsize=1)
def _scans() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 digits as float32 [N, 8, 8] in 0..1 and int32 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int32)


def source_split(split: str) -> np.ndarray:
    """The sorted indices (into sklearn's digits) of the source digits of `split`: of each class, a seeded permutation's
    first TEST_SOURCES / 10 digits are ``test``, the rest ``train``; the two are disjoint."""
    if split not in SPLITS:
        raise ValueError(f"cluttered_digits has splits 'train' and 'test', got {split!r}")
    labels = _scans()[1]
    rng = np.random.default_rng(SPLIT_SEED)
    per_class = TEST_SOURCES // 10
    chosen = [rng.permutation(np.flatnonzero(labels == label)) for label in range(10)]
    return np.sort(np.concatenate([c[:per_class] if split == "test" else c[per_class:] for c in chosen]))


def split_sizes() -> dict[str, int]:
    """{split: number of canvases}, without generating them."""
    return {split: len(source_split(split)) * CANVASES_PER_SOURCE[split] for split in SPLITS}


def _draw(scans, centres, sizes, angles, windows, chunk: int = 1024) -> np.ndarray:
    """`_draw_chunk` over `chunk` scans at a time: a few MB of temporaries instead of hundreds."""
    return np.concatenate([_draw_chunk(scans[i:i + chunk], centres[i:i + chunk], sizes[i:i + chunk],
                                       angles[i:i + chunk], windows[i:i + chunk]) for i in range(0, len(scans), chunk)])


def _draw_chunk(scans, centres, sizes, angles, windows) -> np.ndarray:
    """Each scan [M, 8, 8] drawn on its own 32 x 32 canvas [M, 32, 32]: scaled to `sizes` px, rotated by `angles`
    (degrees) and centred at `centres` (row, column); only the scan pixels inside `windows`
    [M, 4] (top, left, bottom, right, exclusive) are drawn, the window's centre at `centres`. Bilinear sampling."""
    m = len(scans)
    grid = np.arange(CANVAS, dtype=np.float32) + 0.5  # pixel centres
    dy = grid[None, :, None] - centres[:, 0, None, None]
    dx = grid[None, None, :] - centres[:, 1, None, None]
    theta = np.deg2rad(angles)[:, None, None]
    cos, sin = np.cos(theta), np.sin(theta)
    per_px = (SCAN / sizes)[:, None, None]  # scan pixels per canvas pixel
    window_centre = (windows[:, :2] + windows[:, 2:]) / 2.0
    # Inverse map: canvas offset rotated back by -angle, scaled to scan units, shifted to the window's centre.
    rows = (cos * dy + sin * dx) * per_px + window_centre[:, 0, None, None] - 0.5
    cols = (-sin * dy + cos * dx) * per_px + window_centre[:, 1, None, None] - 0.5
    # Keep the window's pixels only: zero everywhere else, then sample with a zero border.
    r_index, c_index = np.arange(SCAN)[None, :, None], np.arange(SCAN)[None, None, :]
    keep = ((r_index >= windows[:, 0, None, None]) & (r_index < windows[:, 2, None, None])
            & (c_index >= windows[:, 1, None, None]) & (c_index < windows[:, 3, None, None]))
    side = SCAN + 3  # a zero border of 1 before and 2 after: every tap of a clipped coordinate lands in the scan or 0
    flat = np.pad(scans * keep, ((0, 0), (1, 2), (1, 2))).reshape(-1)
    rows, cols = np.clip(rows, -1.0, SCAN), np.clip(cols, -1.0, SCAN)
    r0, c0 = np.floor(rows), np.floor(cols)
    fr, fc = rows - r0, cols - c0
    base = (np.arange(m, dtype=np.int32)[:, None, None] * side * side
            + (r0.astype(np.int32) + 1) * side + c0.astype(np.int32) + 1)
    top = np.take(flat, base) * (1 - fc) + np.take(flat, base + 1) * fc
    bottom = np.take(flat, base + side) * (1 - fc) + np.take(flat, base + side + 1) * fc
    out = top * (1 - fr) + bottom * fr
    return out


@functools.lru_cache(maxsize=2)
def generate(split: str) -> ClutteredDigits:
    """The canvases of `split` ("train" or "test"), the same bytes on every call (see the module docstring)."""
    scans, labels = _scans()
    pool = source_split(split)
    rng = np.random.default_rng([GENERATION_SEED, SPLITS.index(split)])
    sources = np.repeat(pool, CANVASES_PER_SOURCE[split])
    n = len(sources)
    sizes = rng.uniform(*DIGIT_SIZE, n).astype(np.float32)
    angles = rng.uniform(*ROTATION, n).astype(np.float32)
    low, high = sizes / 2.0, CANVAS - sizes / 2.0
    centres = np.stack([rng.uniform(low, high), rng.uniform(low, high)], axis=1).astype(np.float32)
    full = np.tile(np.array([0, 0, SCAN, SCAN], np.float32), (n, 1))
    canvas = _draw(scans[sources], centres, sizes, angles, full)

    most = FRAGMENTS[1]
    counts = rng.integers(FRAGMENTS[0], most + 1, n)
    others = rng.integers(0, len(pool) - 1, (n, most))
    others = pool[others + (others >= np.searchsorted(pool, sources)[:, None])]  # the split's, not the canvas's own
    corners = rng.integers(0, SCAN - FRAGMENT_WINDOW + 1, (n, most, 2)).astype(np.float32)
    windows = np.concatenate([corners, corners + FRAGMENT_WINDOW], axis=-1).reshape(-1, 4)
    fragment_sizes = rng.uniform(*DIGIT_SIZE, n * most).astype(np.float32)
    fragment_angles = rng.uniform(0.0, 360.0, n * most).astype(np.float32)
    fragment_centres = rng.uniform(0.0, CANVAS, (n * most, 2)).astype(np.float32)
    brightness = rng.uniform(*FRAGMENT_BRIGHTNESS, (n, most)).astype(np.float32)
    used = np.arange(most)[None, :] < counts[:, None]
    fragments = _draw(scans[others.reshape(-1)], fragment_centres, fragment_sizes, fragment_angles, windows)
    fragments = fragments.reshape(n, most, CANVAS, CANVAS) * (brightness * used)[..., None, None]
    canvas = np.maximum(canvas, fragments.max(axis=1))
    canvas += rng.normal(0.0, NOISE_STD, canvas.shape).astype(np.float32)
    images = np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)
    result = ClutteredDigits(images=np.repeat(images[..., None], 3, axis=-1), labels=labels[sources],
                             sources=sources.astype(np.int32), centres=centres, sizes=sizes, angles=angles,
                             fragment_sources=np.where(used, others, -1).astype(np.int32))
    for field in dataclasses.fields(result):
        getattr(result, field.name).flags.writeable = False  # cached: shared by every caller in the process
    return result
