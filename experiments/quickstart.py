"""Quick demo: Barlow Twins on scikit-learn's bundled handwritten digits (offline), under 3 minutes on 2 CPU cores.

A digits recipe, not the CIFAR one: handwritten digits are grey and their meaning changes when mirrored, so there are
no flips and no colour jitter; the views are random crops (scale 0.7-1, which also shifts the digit) and small
rotations. The encoder is a 3-layer CNN (`backbones.small_cnn`, globally pooled 128-d features) with a 1024-1024
projector, trained with the library's own BarlowTwins, LARS and trainer. The run ends with a table: kNN and linear-probe top-1 of the
random initialisation, of raw pixels and of the trained encoder on the digits test split.

    python -m bt_keras.train --config=experiments/quickstart.py --workdir=runs/quickstart
"""

import ml_collections

from bt_keras.config import base_config


def digits_view(**overrides) -> ml_collections.ConfigDict:
    """One view for handwritten digits (bt_keras.views.ViewConfig fields; crop size left to config.image_size)."""
    view = dict(crop_scale=(0.7, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_prob=0.0, jitter_prob=0.0,
                grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0, rotation_prob=0.5,
                rotation_degrees=(-20.0, 20.0))
    view.update(overrides)
    view = ml_collections.ConfigDict(view)
    view.crop_size = ml_collections.FieldReference(None, field_type=int)
    return view


def get_config():
    c = base_config()
    c.name = "quickstart"
    c.dataset = "digits"
    c.image_size = 32
    c.view1, c.view2 = digits_view(), digits_view()
    # Globally pooled 128-d features (small_cnn's default): a random network's flattened 2048-d map already scores
    # kNN 0.967 on these easy digits (it keeps every stroke's position), which leaves pre-training nothing to show;
    # pooled, random init is 0.925 and Barlow Twins must learn what the digits have in common (0.975 here).
    c.backbone = "small_cnn"
    c.width_multiplier = 1.0
    c.projector = "1024-1024"
    c.batch_size = 128
    c.epochs = 40
    c.optimizer.lr_weights = 0.3
    c.optimizer.lr_biases = 0.3 * 0.0048 / 0.2
    c.optimizer.scale_by_batch = False
    c.optimizer.eta = 0.02
    c.optimizer.weight_decay = 1e-4
    c.optimizer.warmup_epochs = 2
    c.knn.every_epochs = 5
    c.knn.k = 20  # the usual k=200 is more than the ~144 training images of a digit class
    c.knn.train_examples = 0
    c.knn.test_examples = 0
    c.knn.baselines = True  # the closing table: random init, raw pixels (8x8: the scans' own size), Barlow Twins
    c.knn.raw_pixel_size = 8
    return c
