"""Command lines, the top layer: absl/argparse front ends over the library, nothing else. Each keeps the name users
type: `python -m bt_keras.train | report | convert | data_service | evaluate.knn | evaluate.linear |
evaluate.finetune`, and the `bt-keras-*` console scripts (setup.py)."""

import sys


def list_flags_in_help(*modules: str, doc: str | None = None) -> None:
    """Makes absl's `--help` list the flags the named modules define, under `doc` when the main module has no
    docstring. absl prints the main module's docstring and key flags, and the main module is a forward (`python -m
    bt_keras.evaluate.knn`) or pip's generated script (`bt-keras-convert`), not the module defining the flags."""
    from absl import flags

    main = sys.modules.get("__main__")
    if doc and main is not None and not main.__doc__:
        main.__doc__ = doc
    for module in modules:
        for flag in flags.FLAGS.get_key_flags_for_module(module):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
