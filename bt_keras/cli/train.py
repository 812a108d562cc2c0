"""Barlow Twins pre-training: `python -m bt_keras.train --config=experiments/quickstart.py --workdir=runs/quick`.

Flags:
  --config          an ml_collections config file from experiments/ (any field overridable: --config.batch_size=512)
  --workdir         where checkpoints, logs, TensorBoard events and the final encoder go; rerun to resume
  --strategy        default | mirrored | multi_worker | tpu
  --cpu_devices     split the CPU into N logical devices (to try `mirrored` without GPUs)
  --tpu             TPU name or grpc:// address for --strategy=tpu ("" on a TPU VM)
  --data_dir        TFDS data directory (overrides config.data_dir)
  --mixed_precision config.precision=mixed_float16 (mixed_bfloat16 on TPU): float16 compute, float32 variables,
                    loss, BatchNorm statistics and LARS; dynamic loss scaling (skipped steps are logged as
                    skipped_steps and still count as steps); slower on CPU
  --xla             config.jit_compile: each replica's whole step compiled with XLA (bt_keras/train/step.py says what
                    cannot be, e.g. several replicas on CPU devices); helps on GPU/TPU, slower on CPU
  --seed            overrides config.seed
  --data_service    grpc://HOST:PORT of a tf.data service dispatcher: the input pipeline runs on its workers
                    (overrides config.data_service; see bt_keras/data/service.py for what resuming guarantees then)
  --callbacks       extra Keras callbacks, as MODULE:NAME of a callable returning a callback or a list of them
                    (e.g. keras.callbacks:TerminateOnNaN, or my_callbacks:early_stopping); repeatable
  --allow_config_change  resume although the config changes the model, the optimisation or the data stream
                    (otherwise an error lists the changed fields; changes are recorded in config_changes.jsonl)

Exit codes: 0 done, 2 a mistake in the flags, config, data or workdir (or a full disk), 3 the loss or the weights went
  non-finite (nothing non-finite is saved; the last good checkpoint stays the latest), 4 the tf.data service
  dispatcher stopped answering while a step waited for it (config.data_service_stall_s; the last checkpoint is kept),
  143 SIGTERM and 130 SIGINT (Ctrl-C): the step in flight finishes and its checkpoint is written, then one line says so; running the same command
  resumes from it exactly. A second SIGTERM or Ctrl-C ends the process at once, writing nothing more (the last
  complete checkpoint is kept). On a multi-worker run a signal to any worker stops every worker after the same step.
  --verbose         show every log line (TensorFlow's C++ start-up and INFO logs too); quiet by default
"""

from __future__ import annotations

import difflib
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bt_keras.cli import console, list_flags_in_help

# TensorFlow loads here (bt_keras.distribute imports it): run as a command, its start-up noise is filtered.
with console.quiet_start():
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
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool("allow_config_change", False, "Resume even though the config changes fields "
                                         "the checkpoint depends on (model, optimisation, data stream).")
# Read before the flags are parsed too (bt_keras.cli.console.quiet_requested), to filter TensorFlow's start-up lines.
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show every log line, TensorFlow's too (default: a quiet console).")


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
    from bt_keras import distribute, paths
    from bt_keras.config import complete
    from bt_keras.train import figures, host
    from bt_keras.train.trainer import (WORKER_LOST_EXIT_CODE, Interrupted, NonFiniteLossError, summary, Trainer,
                                        WorkerLostError)

    if console.is_quiet() and not _VERBOSE.value:
        console.short_log_lines()
    if _STRATEGY.value != "tpu" and console.device_line():
        print(console.device_line())
    logging.info("Host settings: %s", host.configure_host())
    if _CPU_DEVICES.value:
        distribute.split_cpu(_CPU_DEVICES.value)
    config = complete(_CONFIG.value)  # every field of bt_keras.config present, once
    with config.unlocked():
        if _DATA_DIR.value is not None:
            config.data_dir = _DATA_DIR.value
        if _SEED.value is not None:
            config.seed = _SEED.value
        if _DATA_SERVICE.value is not None:
            config.data_service = _DATA_SERVICE.value
        config.jit_compile = _XLA.value or config.jit_compile
    strategy = distribute.make_strategy(_STRATEGY.value, tpu=_TPU.value)
    if _MIXED.value and config.precision == "float32":  # a recipe's mixed policy is kept
        from bt_keras.method import precision

        with config.unlocked():
            config.precision = precision.mixed_policy_for(strategy)
    replicas_line = (f"Strategy {_STRATEGY.value} with {strategy.num_replicas_in_sync} replica(s); global batch "
                     f"{config.batch_size}.")
    if strategy.num_replicas_in_sync > 1:  # news on the quiet console too; one device is the default, said above
        print(replicas_line, flush=True)
    logging.info("%s", replicas_line)
    extra_callbacks = load_callbacks(_CALLBACKS.value)
    trainer = Trainer(config, _WORKDIR.value, strategy, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    if trainer.resume_from is not None:  # said on the quiet console too: a resume is news to the user
        print(f"Resuming from {trainer.resume_from} at step {trainer.start_step}.", flush=True)
    try:
        logs = trainer.run(extra_callbacks)
    except NonFiniteLossError as error:  # printed once (an absl log line would repeat it on the quiet console)
        print(f"ERROR: {error}", file=sys.stderr, flush=True)
        sys.exit(3)
    except Interrupted as stop:
        print(stop, file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except WorkerLostError as error:
        print(f"ERROR: {error}", file=sys.stderr, flush=True)
        sys.exit(WORKER_LOST_EXIT_CODE)
    if "loss" not in logs:  # nothing trained (a finished run's end written again): its last logged metrics
        logs = {**figures.final_metrics(_WORKDIR.value), **logs}
    print(f"Finished at step {trainer.step}: {summary(logs)}")
    print(f"Encoder saved to {os.path.join(_WORKDIR.value, paths.ENCODER_FILE)}")


def _config_fields(argv) -> list[str]:
    """The dotted field names of the --config file's config (best effort, for suggestions; [] if it cannot load)."""
    try:
        import runpy

        path = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
        config = runpy.run_path(path.split(":", 1)[0])["get_config"]()

        def walk(tree, prefix=""):
            for key, value in tree.items():
                yield from walk(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]

        return list(walk(config.to_dict()))
    except Exception:  # noqa: BLE001  only a suggestion
        return []


def _parse_flags(argv):
    """absl's flag parsing, with an unknown `--config.FIELD` or a bad flag value as one line and exit code 2."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:  # ml_collections: an override of a field the config lacks
        found = re.search(r"[A-Za-z_][A-Za-z0-9_]*", str(error))  # ml_collections quotes the key, maybe twice
        missing = found.group(0) if found else str(error)
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        culprit = next((a for a in overrides if re.search(rf"[.]{re.escape(missing)}(=|[.]|$)", a.split("=", 1)[0])),
                       None)
        if culprit is None:  # not an override of ours: a bug in the recipe itself, shown as it is
            raise
        field = culprit.split("=", 1)[0][len("--config."):]
        close = difflib.get_close_matches(field, _config_fields(argv), n=3)
        hint = f" Did you mean {' or '.join('--config.' + c for c in close)}?" if close else ""
        print(f"ERROR: {culprit}: the config has no field {field!r}.{hint} The fields are those of "
              "bt_keras/config.py (base_config) and the recipe.", file=sys.stderr)
        sys.exit(2)
    except flags.Error as error:
        print(f"ERROR: {error}. Pass --helpshort to see the flags.", file=sys.stderr)
        sys.exit(2)


def run():
    """Entry point that turns configuration mistakes into one clear line instead of a traceback."""
    list_flags_in_help(__name__, doc=__doc__)  # `bt-keras-train --help`: pip's script is the main module
    try:
        app.run(main, flags_parser=_parse_flags)
    except KeyboardInterrupt:  # Ctrl-C before training started (or after it ended): nothing half-written to keep
        print("Interrupted (SIGINT) outside the training loop; the last complete checkpoint is kept: run the same "
              "command to resume.", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, RuntimeError, ConnectionError) as error:
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(2)
    except Exception as error:
        from bt_keras import files

        if files.is_disk_full(error):  # outside the loop (which says more): e.g. while repairing the checkpoint folder
            detail = " ".join(str(error).split())[:200]
            print(f"ERROR: No space left on the disk of --workdir={_WORKDIR.value} ({detail}). Free space there and "
                  "run the same command again.", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    run()
