"""The repository's export command lines, thin wrappers over `bt_keras.serving` (this folder is not installed):

    python -m export.savedmodel --checkpoint=runs/cifar10 --export_dir=models/bt_keras   # see export/README.md
    python -m export.client --rest=http://localhost:8501 --model=bt_keras cat.jpg      # embeddings as JSON
"""
