"""CIFAR-10 with ResNet-18: our first small-data recipe, solo-learn's hyperparameters (LARS lr 0.3, eta 0.02, weight
decay 1e-4, batch 256) on the official code's method (LARS's official form with a separate bias/BN learning rate,
zero-initialised residual branches, projector without biases, unscaled loss). It is NOT solo-learn's run: for that
(the published 92.1%), use experiments/cifar10_sololearn.py. Kept for the budget comparison in RESULTS.md.

    python -m bt_keras.train --config=experiments/cifar10_resnet18.py --data_dir=../shared/tfds --workdir=runs/cifar10
"""

from bt_keras.config import base_config, recipe_views


def get_config():
    c = base_config()
    c.name = "cifar10_resnet18"
    c.dataset = "tfds:cifar10"
    c.image_size = 32
    # crop scale 0.08-1 at 32 px, jitter 0.4/0.4/0.2/0.1 p=0.8, grayscale 0.2, no blur, solarise 0 / 0.2 (solo-learn)
    c.view1, c.view2 = recipe_views("cifar")
    c.backbone = "resnet18"
    c.stem = "cifar"  # 3x3 stride-1 stem, no max-pool, 512-d output
    c.projector = "2048-2048-2048"  # solo-learn
    c.lambd = 0.0051
    c.batch_size = 256
    c.epochs = 1000
    c.optimizer.lr_weights = 0.3  # LARS lr 0.3, not batch-scaled (solo-learn)
    c.optimizer.lr_biases = 0.3 * 0.0048 / 0.2  # biases/BN keep the official 0.0048 / 0.2 ratio
    c.optimizer.scale_by_batch = False
    c.optimizer.eta = 0.02  # solo-learn
    c.optimizer.weight_decay = 1e-4  # solo-learn
    c.optimizer.warmup_epochs = 10  # 10 warm-up epochs + cosine
    c.knn.every_epochs = 10  # kNN k=200, T=0.1 on the test split
    c.knn.train_examples = 0
    c.knn.test_examples = 0
    return c
