"""Training, layer 10: the loop (`trainer`, `step`), what guards it (`preflight`, `resume`, `workdir_lock`, `host`)
and what observes it (`callbacks`, `progress`, `baselines`, `figures`).

`python -m bt_keras.train` runs the command line (`bt_keras.cli.train`) through `__main__`; importing this package
loads nothing else.
"""
