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

Augmentation modes (--augment_on, ``bt_keras.augment.device``), for the 224 px case, measured round-robin in one
process (each repetition: a fresh iterator per variant, warm-up, timed batches) so a busy spell hits all alike:
  today                 the pipeline before augment_on existed: full JPEG decode, crop, resize, colour steps
  host                  augment_on="host": decode to the crop window (same pixels), resize, colour steps
  accelerator           augment_on="accelerator": the host's share only (uint8 crops + seeds); the colour steps
                        run in the model's train_step
  accelerator+dct       the same with dct_scaling=True (large crops decoded at 1/2-1/8 scale; changes pixels)
The ratios accelerator / host and host / today are reported per core and per CPU-second.

Modes (--strategy, several allowed): ``default`` iterates the dataset as one device's ``fit`` does;
``mirrored:N`` iterates ``MirroredStrategy.experimental_distribute_dataset`` over N logical CPU
devices, as ``fit`` does under N replicas (each global batch split and placed on the replicas).

Per core: besides pairs/s (wall clock), each case reports pairs/s per usable core and pairs per
CPU-second of the process (user + system time over the timed batches), which stays meaningful
when other jobs share the cores.

    python -m benchmarks.input_pipeline            # writes benchmarks/results/input_pipeline.json
    python -m benchmarks.input_pipeline --strategy default mirrored:2 --skip cifar10-tfds
    python -m benchmarks.input_pipeline --skip cifar32-memory cifar10-tfds --augment_on today host accelerator
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

if not __package__:  # `python benchmarks/input_pipeline.py`: the benchmarks package is not importable that way
    raise SystemExit("Run it from the repository root as a module: python -m benchmarks.input_pipeline [flags]")
from benchmarks import harness
from bt_keras import augment, data
from bt_keras.augment import host_crop
from bt_keras.train.host import usable_cores


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


def _materialise(batch) -> None:
    """Waits for a batch: (view1, view2) or accelerator mode's dict; tensors or a distributed batch's parts."""
    view = batch["view1"] if isinstance(batch, dict) else batch[0]
    for part in getattr(view, "values", (view,)):
        part.numpy()


def _full_decode_crop(data_bytes, view, seed, dct_scaling=False):
    """The per-image crop as it was before `host_crop`: decode the whole image, then crop (the `today` baseline)."""
    image = tf.ensure_shape(tf.io.decode_image(data_bytes, channels=3, expand_animations=False), [None, None, 3])
    return augment.random_resized_crop(image, view.crop_size, view.crop_scale, view.crop_ratio, seed, view.flip_prob)


def jpeg_variant(jpegs, batch_size: int, variant: str) -> tf.data.Dataset:
    """The 224-px ImageNet pipeline from JPEG bytes for one --augment_on variant (see the module docstring)."""
    kwargs = dict(batch_size=batch_size, views=augment.imagenet_views(224), encoded=True, shuffle_buffer=len(jpegs),
                  augment_on="host" if variant in ("today", "host") else "accelerator",
                  dct_scaling=variant == "accelerator+dct")
    source = tf.data.Dataset.from_tensor_slices(jpegs)
    if variant != "today":
        return data.pair_batches(source, **kwargs)
    fast, host_crop.decode_random_resized_crop = host_crop.decode_random_resized_crop, _full_decode_crop
    try:  # the map functions are traced here, inside pair_batches
        return data.pair_batches(source, **kwargs)
    finally:
        host_crop.decode_random_resized_crop = fast


def measure_round_robin(datasets: dict, batch_size: int, warmup: int, batches: int, reps: int) -> dict:
    """`measure` for several pipelines, one repetition of each in turn; only one iterator exists at a time."""
    rates = {name: [] for name in datasets}
    per_cpu_second = {name: [] for name in datasets}
    for _ in range(reps):
        for name, dataset in datasets.items():
            iterator = iter(dataset)
            for _ in range(warmup):
                _materialise(next(iterator))
            start, cpu = time.perf_counter(), harness.cpu_seconds()
            for _ in range(batches):
                batch = next(iterator)
            _materialise(batch)
            rates[name].append(batches * batch_size / (time.perf_counter() - start))
            per_cpu_second[name].append(batches * batch_size / max(harness.cpu_seconds() - cpu, 1e-9))
            del iterator
    cores = usable_cores()
    return {name: {"pairs_per_s_median": statistics.median(rates[name]), "pairs_per_s_min": min(rates[name]),
                   "pairs_per_s_max": max(rates[name]), "pairs_per_s_per_core": statistics.median(rates[name]) / cores,
                   "pairs_per_cpu_second": statistics.median(per_cpu_second[name]), "usable_cores": cores,
                   "batch_size": batch_size, "warmup_batches": warmup, "timed_batches": batches, "reps": reps}
            for name in datasets}


def measure(dataset, batch_size: int, warmup: int, batches: int, reps: int, strategy=None) -> dict:
    if strategy is not None:
        dataset = strategy.experimental_distribute_dataset(dataset)
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    rates, per_cpu_second = [], []
    for _ in range(reps):
        start, cpu = time.perf_counter(), harness.cpu_seconds()
        for _ in range(batches):
            batch = next(iterator)
        _materialise(batch)
        rates.append(batches * batch_size / (time.perf_counter() - start))
        per_cpu_second.append(batches * batch_size / max(harness.cpu_seconds() - cpu, 1e-9))
    cores = usable_cores()
    return {"pairs_per_s_median": statistics.median(rates), "pairs_per_s_min": min(rates),
            "pairs_per_s_max": max(rates), "pairs_per_s_per_core": statistics.median(rates) / cores,
            "pairs_per_cpu_second": statistics.median(per_cpu_second), "usable_cores": cores,
            "batch_size": batch_size, "warmup_batches": warmup, "timed_batches": batches, "reps": reps}


def _key(case: str, mode: str) -> str:
    """Result names: the case alone for one device (as before), `case/mirrored:N` for the distributed mode."""
    return case if mode == "default" else f"{case}/{mode}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size-32", type=int, default=256)
    parser.add_argument("--batch-size-224", type=int, default=32)
    parser.add_argument("--num-jpegs", type=int, default=300, help="distinct synthetic JPEGs for the 224 px case")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up batches (tfds case: one epoch)")
    parser.add_argument("--batches-32", type=int, default=40, help="timed batches per repetition, 32 px")
    parser.add_argument("--batches-224", type=int, default=8, help="timed batches per repetition, 224 px")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tfds-dir", default=str(harness.REPO.parent / "shared" / "tfds"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["cifar32-memory", "imagenet224-jpeg", "cifar10-tfds"])
    parser.add_argument("--strategy", nargs="+", default=["default"],
                        help="default (one device) and/or mirrored:N (the distributed dataset over N logical CPUs)")
    parser.add_argument("--augment_on", nargs="+", default=["today", "host", "accelerator", "accelerator+dct"],
                        choices=["today", "host", "accelerator", "accelerator+dct"],
                        help="variants of the 224 px JPEG case, measured round-robin (one device)")
    parser.add_argument("--output", default=str(harness.RESULTS / "input_pipeline.json"))
    args = parser.parse_args()
    replicas = []
    for name in args.strategy:
        if name != "default" and not (name.startswith("mirrored:") and name.split(":")[1].isdigit()):
            raise SystemExit(f"--strategy {name!r}: use default or mirrored:N")
        replicas.append(1 if name == "default" else int(name.split(":")[1]))

    if max(replicas) > 1:  # before TensorFlow initialises its devices (importing it does not)
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * max(replicas))
    strategies = {name: (None if r == 1 else tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(r)]))
                  for name, r in zip(args.strategy, replicas)}
    rng = np.random.default_rng(0)
    results = {}
    load_at_start = os.getloadavg()[0]  # other processes on the machine lower the numbers; recorded

    if "cifar32-memory" not in args.skip:
        arrays = rng.integers(0, 256, size=(10_000, 32, 32, 3), dtype=np.uint8)
        ds = data.pair_batches(tf.data.Dataset.from_tensor_slices(arrays), batch_size=args.batch_size_32,
                               views=augment.cifar_views(32))
        for mode, strategy in strategies.items():
            results[_key("cifar32-memory", mode)] = measure(ds, args.batch_size_32, args.warmup, args.batches_32,
                                                            args.reps, strategy)

    if "imagenet224-jpeg" not in args.skip:
        jpegs = [tf.io.encode_jpeg(image, quality=90).numpy() for image in smooth_images(rng, args.num_jpegs)]
        ds = data.pair_batches(tf.data.Dataset.from_tensor_slices(jpegs), batch_size=args.batch_size_224,
                               views=augment.imagenet_views(224), encoded=True, shuffle_buffer=args.num_jpegs)
        for mode, strategy in strategies.items():
            if mode == "default" and args.augment_on:
                continue  # measured round-robin below, as the `host` variant
            key = _key("imagenet224-jpeg", mode)
            results[key] = measure(ds, args.batch_size_224, args.warmup, args.batches_224, args.reps, strategy)
            results[key]["mean_jpeg_kib"] = float(np.mean([len(j) for j in jpegs]) / 1024)
        variants = {v: jpeg_variant(jpegs, args.batch_size_224, v) for v in args.augment_on}
        timed = measure_round_robin(variants, args.batch_size_224, args.warmup, args.batches_224, args.reps)
        for variant, result in timed.items():
            key = "imagenet224-jpeg" if variant == "host" else f"imagenet224-jpeg/{variant}"
            results[key] = {**result, "mean_jpeg_kib": float(np.mean([len(j) for j in jpegs]) / 1024)}

        def ratio(a, b, field):
            a, b = results.get(f"imagenet224-jpeg/{a}" if a != "host" else "imagenet224-jpeg"), \
                results.get(f"imagenet224-jpeg/{b}" if b != "host" else "imagenet224-jpeg")
            return a[field] / b[field] if a and b else None

        ratios = {f"{a}/{b}": {"per_core": ratio(a, b, "pairs_per_s_per_core"),
                               "per_cpu_second": ratio(a, b, "pairs_per_cpu_second")}
                  for a, b in (("accelerator", "host"), ("accelerator+dct", "host"), ("host", "today"))}
        results["imagenet224-jpeg/ratios"] = {k: v for k, v in ratios.items() if v["per_core"] is not None}

    if "cifar10-tfds" not in args.skip and (Path(args.tfds_dir) / "cifar10").is_dir():
        ds = data.pretrain_dataset("tfds:cifar10", global_batch_size=args.batch_size_32, data_dir=args.tfds_dir)
        epoch = 50_000 // args.batch_size_32
        for mode, strategy in strategies.items():
            results[_key("cifar10-tfds", mode)] = measure(ds, args.batch_size_32, epoch, args.batches_32, args.reps,
                                                          strategy)

    report = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "tensorflow": tf.__version__, "gpus": len(tf.config.list_physical_devices("GPU")),
                          "load_average_1min_at_start": load_at_start, "load_average_1min_at_end": os.getloadavg()[0]},
              "results": results}
    print(f"\n{'case':<30} {'batch':>6} {'pairs/s (median)':>17} {'min':>9} {'max':>9} {'per core':>9} "
          f"{'per CPU-s':>10}")
    for name, r in results.items():
        if name.endswith("/ratios"):
            continue
        print(f"{name:<30} {r['batch_size']:>6} {r['pairs_per_s_median']:>17.1f} "
              f"{r['pairs_per_s_min']:>9.1f} {r['pairs_per_s_max']:>9.1f} {r['pairs_per_s_per_core']:>9.1f} "
              f"{r['pairs_per_cpu_second']:>10.1f}")
    for name, r in results.get("imagenet224-jpeg/ratios", {}).items():
        print(f"ratio {name:<22} per core {r['per_core']:.2f}   per CPU-second {r['per_cpu_second']:.2f}")
    print(f"(1-min load average {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end, {os.cpu_count()} CPUs)")
    harness.write_json(args.output, report, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
