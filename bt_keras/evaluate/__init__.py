"""The evaluation CLIs, one protocol each (Zbontar et al. 2021, Sec. 4); their library code is `bt_keras.evaluation`.

    python -m bt_keras.evaluate.knn      --encoder=runs/cifar10 --dataset=tfds:cifar10 --data_dir=../shared/tfds
    python -m bt_keras.evaluate.linear   --encoder=runs/cifar10 --dataset=tfds:cifar10 [--mode=features|full]
    python -m bt_keras.evaluate.finetune --encoder=runs/cifar10 --dataset=tfds:cifar10 --subset=0.01

Each accepts every encoder format (`bt_keras.artifacts.open_encoder`), reads preprocessing from the encoder's
metadata, shows progress bars, prints a one-row Markdown table and writes a JSON result (`--output`, default beside
the encoder). `cli` holds the flags and error handling they share.
"""
