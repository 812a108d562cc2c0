"""What the evaluation CLIs share: their common flags, `setup` from those flags, and the error handling of `main`."""

from __future__ import annotations

import sys
from typing import Callable

from absl import app, flags

from bt_keras.cli import console, list_flags_in_help

with console.quiet_start():  # TensorFlow loads here: its start-up lines filtered (bt_keras.cli.console)
    from bt_keras import paths
    from bt_keras.evaluation import protocol


def define_common_flags(fv) -> None:
    """The flags every evaluation CLI takes (defined into the absl FlagValues `fv`)."""
    flags.DEFINE_string("encoder", None, f"What to evaluate: {paths.ENCODER_FORMS}.", flag_values=fv)
    flags.DEFINE_string("dataset", None, "Labelled dataset: tfds:NAME[/CONFIG], folder:PATH, digits or "
                        "cluttered_digits (default: the dataset the encoder was trained on, from its metadata).",
                        flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data directory.", flag_values=fv)
    flags.DEFINE_bool("download", False, "Let TFDS download the dataset (off: never a hanging download).",
                      flag_values=fv)
    flags.DEFINE_string("train_split", "train", "Split the classifier / kNN memory is built from.", flag_values=fv)
    flags.DEFINE_string("test_split", None, "Split accuracy is reported on (default: test, else validation).",
                        flag_values=fv)
    flags.DEFINE_integer("image_size", None, "Override the encoder's image size.", flag_values=fv)
    flags.DEFINE_list("mean", None, "Override the encoder's per-channel normalisation mean (3 values).",
                      flag_values=fv)
    flags.DEFINE_list("std", None, "Override the encoder's per-channel normalisation std (3 values).",
                      flag_values=fv)
    flags.DEFINE_integer("batch_size", 256, "Batch size.", flag_values=fv)
    flags.DEFINE_integer("limit_train", 0, "Use only this many training examples (0: all), for quick runs.",
                         flag_values=fv)
    flags.DEFINE_integer("limit_test", 0, "Use only this many test examples (0: all), for quick runs.",
                         flag_values=fv)
    flags.DEFINE_string("subset", None, "Class-balanced seeded subset of the training split: a fraction of each "
                        "class (0.01 = 1%) or a per-class count (5).", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of subsets, shuffling, augmentation and initialisation.", flag_values=fv)
    flags.DEFINE_string("output", None, "Result JSON (default: eval_<protocol>_<dataset>.json beside the encoder, "
                        "or in the current directory for a SavedModel).", flag_values=fv)
    flags.DEFINE_integer("verbose", 1, "0: quiet; 1: progress bars.", flag_values=fv)
    flags.mark_flag_as_required("encoder", flag_values=fv)


def setup_from_flags(fv) -> protocol.Setup:
    return protocol.setup(fv.encoder, dataset=fv.dataset, data_dir=fv.data_dir, download=fv.download,
                 train_split=fv.train_split, test_split=fv.test_split, image_size=fv.image_size, mean=fv.mean,
                 std=fv.std, batch_size=fv.batch_size, limit_train=fv.limit_train, limit_test=fv.limit_test,
                 subset=fv.subset, seed=fv.seed, output=fv.output, verbose=fv.verbose)


def cli_main(run: Callable, program: str) -> Callable:
    """An absl `main(argv)` that runs `run(FLAGS)` and turns the expected errors into a one-line message, exit 1."""

    def main(argv):
        if len(argv) > 1:
            sys.exit(f"{program}: unexpected arguments {argv[1:]}")
        try:
            run(flags.FLAGS)
        except (FileNotFoundError, ValueError) as error:
            sys.exit(f"{program}: error: {error}")

    return main


def run_command(define_flags: Callable, main: Callable, module_name: str, doc: str) -> None:
    """`python -m bt_keras.evaluate.NAME`: the command's flags defined and listed by `--help`, then `main` run."""
    define_flags()
    list_flags_in_help(module_name, __name__, doc=doc)
    app.run(main)
