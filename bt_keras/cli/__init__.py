"""Command lines, the top layer: absl/argparse front ends over the library, nothing else. Each keeps the name users
type: `python -m bt_keras.train | report | convert | data_service | evaluate.knn | evaluate.linear |
evaluate.finetune`, and the `bt-keras-*` console scripts (setup.py)."""
