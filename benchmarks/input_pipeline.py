"""Input-pipeline throughput: Barlow Twins view pairs per second from tf.data on this machine.

Cases (each: warm-up batches, then --reps timed runs of --batches batches; the median is reported):
  cifar32-memory    CIFAR recipe at 32 px from uint8 arrays in memory (random pixels),
                    batched first and augmented a batch at a time (``data.pair_batches``).
  imagenet224-jpeg  ImageNet recipe at 224 px from JPEG bytes in memory (synthetic smooth images
                    of 300-500 px sides, quality 90): per-image decode + random resized crop
                    (bicubic), then batched colour steps (``data.pair_batches(encoded=True)``).
  cifar10-tfds      ``data.pretrain_dataset("tfds:cifar10")`` end to end (TFDS read, cache,
                    shuffle), if --tfds-dir holds CIFAR-10; the warm-up covers one epoch so the
                    cache is filled.

    python benchmarks/input_pipeline.py            # writes benchmarks/results/input_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from bt_keras import augment, data

REPO = Path(__file__).resolve().parents[1]


def smooth_images(rng: np.random.Generator, count: int, sides=(300, 500)) -> list[np.ndarray]:
    """Natural-ish test images: coarse random colour fields upsampled to random sizes (JPEG
    compresses them like photos, unlike per-pixel noise)."""
    images = []
    for _ in range(count):
        h, w = rng.integers(sides[0], sides[1] + 1, size=2)
        coarse = rng.uniform(0, 255, size=(1, 12, 16, 3)).astype(np.float32)
        image = tf.image.resize(coarse, [h, w], method="bicubic")[0]
        image += rng.normal(0, 6, size=(h, w, 3)).astype(np.float32)  # texture
        images.append(np.clip(np.round(image.numpy()), 0, 255).astype(np.uint8))
    return images


def measure(dataset: tf.data.Dataset, batch_size: int, warmup: int, batches: int, reps: int) -> dict:
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(batches):
            view1, _ = next(iterator)
        view1.numpy()
        rates.append(batches * batch_size / (time.perf_counter() - start))
    return {"pairs_per_s_median": statistics.median(rates), "pairs_per_s_min": min(rates),
            "pairs_per_s_max": max(rates), "batch_size": batch_size, "warmup_batches": warmup,
            "timed_batches": batches, "reps": reps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size-32", type=int, default=256)
    parser.add_argument("--batch-size-224", type=int, default=32)
    parser.add_argument("--num-jpegs", type=int, default=300, help="distinct synthetic JPEGs for the 224 px case")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up batches (tfds case: one epoch)")
    parser.add_argument("--batches-32", type=int, default=40, help="timed batches per repetition, 32 px")
    parser.add_argument("--batches-224", type=int, default=8, help="timed batches per repetition, 224 px")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tfds-dir", default=str(REPO.parent / "shared" / "tfds"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["cifar32-memory", "imagenet224-jpeg", "cifar10-tfds"])
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "input_pipeline.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    load_at_start = os.getloadavg()[0]  # other processes on the machine lower the numbers; recorded

    if "cifar32-memory" not in args.skip:
        arrays = rng.integers(0, 256, size=(10_000, 32, 32, 3), dtype=np.uint8)
        ds = data.pair_batches(tf.data.Dataset.from_tensor_slices(arrays), batch_size=args.batch_size_32,
                               views=augment.cifar_views(32))
        results["cifar32-memory"] = measure(ds, args.batch_size_32, args.warmup, args.batches_32, args.reps)

    if "imagenet224-jpeg" not in args.skip:
        jpegs = [tf.io.encode_jpeg(image, quality=90).numpy() for image in smooth_images(rng, args.num_jpegs)]
        ds = data.pair_batches(tf.data.Dataset.from_tensor_slices(jpegs), batch_size=args.batch_size_224,
                               views=augment.imagenet_views(224), encoded=True, shuffle_buffer=args.num_jpegs)
        results["imagenet224-jpeg"] = measure(ds, args.batch_size_224, args.warmup, args.batches_224, args.reps)
        results["imagenet224-jpeg"]["mean_jpeg_kib"] = float(np.mean([len(j) for j in jpegs]) / 1024)

    if "cifar10-tfds" not in args.skip and (Path(args.tfds_dir) / "cifar10").is_dir():
        ds = data.pretrain_dataset("tfds:cifar10", global_batch_size=args.batch_size_32, data_dir=args.tfds_dir)
        epoch = 50_000 // args.batch_size_32
        results["cifar10-tfds"] = measure(ds, args.batch_size_32, epoch, args.batches_32, args.reps)

    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "tensorflow": tf.__version__, "gpus": len(tf.config.list_physical_devices("GPU")),
                          "load_average_1min_at_start": load_at_start, "load_average_1min_at_end": os.getloadavg()[0]},
              "results": results}
    print(f"\n{'case':<18} {'batch':>6} {'pairs/s (median)':>17} {'min':>9} {'max':>9}")
    for name, r in results.items():
        print(f"{name:<18} {r['batch_size']:>6} {r['pairs_per_s_median']:>17.1f} "
              f"{r['pairs_per_s_min']:>9.1f} {r['pairs_per_s_max']:>9.1f}")
    print(f"(1-min load average {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end, {os.cpu_count()} CPUs)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
