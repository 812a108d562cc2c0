"""Fresh-process probe: sends hostile images to an exported `serving_default` and measures time and memory.

    python tests/subprocess_scripts/serving_probe.py VERSION_DIR MANIFEST.json OUT.json

MANIFEST is `{"warmup": [files], "cases": {name: file}}` (files of encoded bytes). The warm-up images, one valid
image per format, are sent first, so one-off costs (TensorFlow's first JPEG decode takes ~0.9 s here) are not
charged to a case. Each case is then sent as the third image of a batch (two small valid images first), so its
error must name index 2. Per case the report holds the error type and message, the
slowest of `REPEATS` wall times, and the memory growth: the peak resident set size during the request (VmHWM, reset
to the current size through /proc/self/clear_refs before each request) minus the resident size before it.

A watchdog thread ends the process (exit code 3) when its resident size passes `RSS_CEILING_MB`, so a regression
that decodes a 40000 x 40000 GIF fails the test instead of swapping the machine to death.
"""

import json
import os
import re
import sys
import threading
import time

RSS_CEILING_MB = 2500
REPEATS = 3


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _watchdog():
    while True:
        if _status_kb("VmRSS") > RSS_CEILING_MB * 1024:
            sys.stderr.write(f"serving_probe: resident size over {RSS_CEILING_MB} MB, giving up\n")
            sys.stderr.flush()
            os._exit(3)
        time.sleep(0.005)


def main(version_dir: str, manifest_path: str, out_path: str) -> None:
    threading.Thread(target=_watchdog, daemon=True).start()
    import tensorflow as tf

    serve = tf.saved_model.load(version_dir).signatures["serving_default"]
    small = [tf.io.encode_png(tf.fill([9, 7, 3], tf.constant(v, tf.uint8))).numpy() for v in (40, 200)]
    manifest = json.load(open(manifest_path))
    cases = {name: open(path, "rb").read() for name, path in manifest["cases"].items()}
    serve(images=tf.constant(small + [open(path, "rb").read() for path in manifest["warmup"]]))
    report = {"peak_reset": _reset_peak(), "cases": {}}
    for name, data in cases.items():
        result = {"bytes": len(data), "seconds": 0.0, "growth_mb": 0.0}
        batch = tf.constant(small + [data])
        for _ in range(REPEATS):
            before = _status_kb("VmRSS")
            _reset_peak()
            start = time.perf_counter()
            try:
                outputs = serve(images=batch)
                result.update(error=None, shape=list(outputs["embedding"].shape))
            except tf.errors.InvalidArgumentError as error:
                result.update(error="InvalidArgumentError", message=error.message)
            except Exception as error:  # noqa: BLE001 (reported to the test, which fails on it)
                result.update(error=type(error).__name__, message=str(error)[-2000:])
            result["seconds"] = max(result["seconds"], time.perf_counter() - start)
            result["growth_mb"] = max(result["growth_mb"], (_status_kb("VmHWM") - before) / 1024)
        report["cases"][name] = result
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print("PROBE DONE")


if __name__ == "__main__":
    main(*sys.argv[1:4])
