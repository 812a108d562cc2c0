"""Barlow Twins pre-training: `python -m bt_keras.train --config=experiments/quickstart.py --workdir=runs/quick`.

Flags:
  --config          an ml_collections config file from experiments/ (any field overridable: --config.batch_size=512)
  --workdir         where checkpoints, logs, TensorBoard events and the final encoder go; rerun to resume
  --strategy        default | mirrored | multi_worker | tpu
  --cpu_devices     split the CPU into N logical devices (to try `mirrored` without GPUs)
  --tpu             TPU name or grpc:// address for --strategy=tpu ("" on a TPU VM)
  --data_dir        TFDS data directory (overrides config.data_dir)
  --mixed_precision mixed_float16 on GPU, mixed_bfloat16 on TPU (the loss stays float32); slower on CPU
  --xla             compile the train step with XLA (jit_compile); helps on GPU/TPU, slower on CPU
  --seed            overrides config.seed
  --data_service    grpc://HOST:PORT of a tf.data service dispatcher: the input pipeline runs on its workers
                    (overrides config.data_service; see bt_keras/data_service.py for what resuming guarantees then)
  --callbacks       extra Keras callbacks, as MODULE:NAME of a callable returning a callback or a list of them
                    (e.g. keras.callbacks:TerminateOnNaN, or my_callbacks:early_stopping); repeatable
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bt_keras.distribute import STRATEGIES

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/quickstart.py", "Recipe (ml_collections config).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Output folder; an existing run there is resumed.")
_STRATEGY = flags.DEFINE_enum("strategy", "default", list(STRATEGIES), "tf.distribute strategy.")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None, "Split the CPU into this many logical devices.")
_TPU = flags.DEFINE_string("tpu", None, "TPU name or address for --strategy=tpu.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data directory (overrides config.data_dir).")
_MIXED = flags.DEFINE_bool("mixed_precision", False, "Mixed precision (float16 on GPU, bfloat16 on TPU).")
_XLA = flags.DEFINE_bool("xla", False, "Compile the train step with XLA.")
_SEED = flags.DEFINE_integer("seed", None, "Random seed (overrides config.seed).")
_DATA_SERVICE = flags.DEFINE_string("data_service", None, "grpc://HOST:PORT of a tf.data service dispatcher "
                                    "(python -m bt_keras.data_service --dispatcher); overrides config.data_service.")
_CALLBACKS = flags.DEFINE_multi_string("callbacks", [], "Extra Keras callbacks: MODULE:NAME of a callable that returns "
                                       "a callback or a list of them (called with no arguments).")


def load_callbacks(specs) -> list:
    """The callbacks named by `--callbacks` specs ("module:name"), each called with no arguments."""
    import importlib

    import keras

    result = []
    for spec in specs:
        module_name, _, name = spec.partition(":")
        if not module_name or not name:
            raise ValueError(f"--callbacks={spec!r}: write MODULE:NAME, e.g. keras.callbacks:TerminateOnNaN.")
        try:
            factory = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"--callbacks={spec!r}: cannot import it ({error}); the module must be importable "
                             "(on PYTHONPATH) and define NAME.") from None
        made = factory()
        made = list(made) if isinstance(made, (list, tuple)) else [made]
        if not all(isinstance(cb, keras.callbacks.Callback) for cb in made):
            raise ValueError(f"--callbacks={spec!r} did not return keras.callbacks.Callback objects: {made!r}.")
        result.extend(made)
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import tensorflow as tf  # after flag parsing: --cpu_devices must act before TF initialises devices

    from bt_keras import artifacts, distribute, perf
    from bt_keras.trainer import NonFiniteLossError, Trainer, summary

    logging.info("Host settings: %s", perf.configure_host())
    if _CPU_DEVICES.value:
        distribute.split_cpu(_CPU_DEVICES.value)
    config = _CONFIG.value
    with config.unlocked():
        if _DATA_DIR.value is not None:
            config.data_dir = _DATA_DIR.value
        if _SEED.value is not None:
            config.seed = _SEED.value
        if _DATA_SERVICE.value is not None:
            config.data_service = _DATA_SERVICE.value
        config.jit_compile = _XLA.value or config.get("jit_compile", False)
    strategy = distribute.make_strategy(_STRATEGY.value, tpu=_TPU.value)
    if _MIXED.value:
        import keras

        keras.mixed_precision.set_global_policy(
            "mixed_bfloat16" if isinstance(strategy, tf.distribute.TPUStrategy) else "mixed_float16")
    logging.info("Strategy %s with %d replica(s); global batch %d.", _STRATEGY.value,
                 strategy.num_replicas_in_sync, config.batch_size)
    extra_callbacks = load_callbacks(_CALLBACKS.value)
    trainer = Trainer(config, _WORKDIR.value, strategy)
    try:
        logs = trainer.run(extra_callbacks)
    except NonFiniteLossError as error:
        logging.error("%s", error)
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(3)
    print(f"Finished at step {trainer.step}: {summary(logs)}")
    print(f"Encoder saved to {os.path.join(_WORKDIR.value, artifacts.ENCODER_FILE)}")


def run():
    """Entry point that turns configuration mistakes into one clear line instead of a traceback."""
    try:
        app.run(main)
    except (ValueError, FileNotFoundError, RuntimeError, ConnectionError) as error:
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
