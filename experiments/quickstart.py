"""Quick demo: Barlow Twins on scikit-learn's bundled handwritten digits (offline), a few minutes on a laptop CPU.

A narrow ResNet-18 (1/4 width, one block per stage) on 32 px digits with the CIFAR augmentation recipe. The online
kNN monitor reports accuracy on the digits test split before training and every few epochs: it should end well
above the random-initialisation number it starts from.

    python -m bt_keras.train --config=experiments/quickstart.py --workdir=runs/quickstart
"""

from bt_keras.config import base_config, recipe_views


def get_config():
    c = base_config()
    c.name = "quickstart"
    c.dataset = "digits"
    c.image_size = 32
    c.view1, c.view2 = recipe_views("cifar")
    c.backbone = "resnet18"
    c.stem = "cifar"
    c.width_multiplier = 0.25
    c.blocks = (1, 1, 1, 1)
    c.projector = "512-512-512"
    c.batch_size = 128
    c.epochs = 20
    c.optimizer.lr_weights = 0.3  # the CIFAR recipe's LARS settings (solo-learn), not batch-scaled
    c.optimizer.lr_biases = 0.3 * 0.0048 / 0.2
    c.optimizer.scale_by_batch = False
    c.optimizer.eta = 0.02
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_epochs = 2
    c.knn.every_epochs = 5
    c.knn.train_examples = 0
    c.knn.test_examples = 0
    return c
