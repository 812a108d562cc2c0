"""ImageNet with ViT-S/16 (KerasHub's `ViTBackbone`): Barlow Twins with the settings solo-learn uses for a ViT-Small.

    pip install -e ".[hub]"   # KerasHub (keras-hub>=0.32), an optional extra
    python -m bt_keras.train --config=experiments/imagenet_vit_small.py --strategy=mirrored --mixed_precision \\
        --data_dir=/path/to/tensorflow_datasets --workdir=runs/in1k_vit_small

No accuracy is claimed: this recipe has not been trained to the end anywhere. What is measured: it builds and trains
(two steps, shrunk, on CPU: tests/test_recipes.py and tests/nets/test_vit.py), and the full encoder has ViT-S/16's
21,665,664 parameters (timm's vit_small_patch16_224 without its head).

Sources, vturrisi/solo-learn at commit 9187ea39c2c3f43c455ab06664d2b019a9802954:
  vit.yaml    = scripts/pretrain/imagenet-100/mocov3_vit.yaml   barlow.yaml = scripts/pretrain/imagenet/barlow.yaml
  asym.yaml   = scripts/pretrain/imagenet/augmentations/asymmetric.yaml (the same file under imagenet-100/)
  base.py     = solo/methods/base.py                            args.py     = solo/args/pretrain.py
  vit.py      = solo/backbones/vit/vit.py                       bt.py       = solo/methods/barlow_twins.py
solo-learn has no Barlow Twins + ViT config. Its only pre-training config with `backbone: name: vit_small` is MoCo v3's
on ImageNet-100 (vit.yaml; DINO's dino_vit.yaml uses vit_tiny), so the ViT's optimisation (AdamW, lr, weight decay,
batch, schedule, epochs) is taken from vit.yaml, and what belongs to the method (projector, lambda, loss scale) from
solo-learn's Barlow Twins ImageNet config (barlow.yaml, a ResNet-50 recipe). The network is vit.py's `vit_small`, the
one solo-learn builds for Barlow Twins (solo/backbones/vit/__init__.py gives MoCo v3 and MAE their own ViTs and every
other method this one): bt_keras/nets/vit.py says how KerasHub's layers match it.
Differences that remain: vit.yaml's 400 epochs are ImageNet-100's (126,689 images), kept as stated; KerasHub's
initialisation (Glorot uniform kernels) is not timm's (truncated normal, std 0.02); Keras's AdamW adds epsilon to
sqrt(v) before the bias correction, PyTorch's after; PyTorch's default init of the projector's and probe's Linear
layers is not copied (Keras's Glorot uniform); solo-learn trains in 16-bit mixed precision (vit.yaml precision:
16-mixed): pass --mixed_precision.
"""

from bt_keras.config import base_config, recipe_views


def get_config():
    c = base_config()
    c.name = "imagenet_vit_small"
    c.dataset = "tfds:imagenet2012"  # manual download required by TFDS; pass --data_dir
    c.image_size = 224  # asym.yaml crop_size: 224 (vit.py: vit_small_patch16_224, 14 x 14 patches)
    # asym.yaml (vit.yaml and barlow.yaml both use it): RandomResizedCrop 0.08-1, flip 0.5, jitter 0.4/0.4/0.2/0.1
    # p=0.8, grayscale 0.2, blur p=1.0 / 0.1, solarise 0 / 0.2; the same as the paper's views
    c.view1, c.view2 = recipe_views("imagenet")
    c.shuffle_buffer = 50_000  # as experiments/imagenet_resnet50.py (DALI shuffles its own way)
    # vit.yaml:17 backbone.name: vit_small -> vit.py:37-42 (patch 16, embed_dim 384, depth 12, num_heads 6,
    # num_classes=0) with timm's defaults (MLP 1536, qkv bias, no dropout, LayerNorm eps 1e-6, class-token features)
    c.backbone = "bt_keras.nets.vit:vit_small_16"
    # config.backbone_options unset: bt_keras.nets.vit.VIT_SMALL_16 as it is (any ViTBackbone argument overrides it)
    c.projector = "4096-4096-4096"  # barlow.yaml:19-20 proj_hidden_dim / proj_output_dim: 4096 (bt.py: 3 Linear layers)
    c.projector_bias = True  # bt.py: nn.Linear (bias on)
    c.lambd = 0.0051  # barlow.yaml:21 lamb: 0.0051
    c.scale_loss = 0.048  # barlow.yaml:22 scale_loss: 0.048
    c.batch_size = 1024  # vit.yaml:34 batch_size: 128 per GPU x vit.yaml:49 devices: 8 GPUs (DDP)
    c.epochs = 400  # vit.yaml:48 max_epochs: 400 (on ImageNet-100)
    c.optimizer.name = "adamw"  # vit.yaml:33 optimizer.name: "adamw" (base.py:101 torch.optim.AdamW)
    c.optimizer.lr_weights = 3.0e-4  # vit.yaml:35 lr: 3.0e-4, x batch_size x GPUs / 256 = 4 (args.py:153-154)
    c.optimizer.scale_by_batch = True  # -> 1.2e-3 at batch 1024, as args.py computes
    c.optimizer.weight_decay = 0.1  # vit.yaml:37 weight_decay: 0.1, on every parameter (base.py:280-281
    # exclude_bias_n_norm_wd defaults to False; vit.yaml does not set it)
    c.optimizer.epsilon = 1e-8  # torch.optim.AdamW default eps; betas (0.9, 0.999): args.py:173 default
    c.optimizer.warmup_epochs = 10  # vit.yaml:39 warmup_cosine; base.py:293 warmup_epochs default 10, per step (:294)
    c.optimizer.warmup_start_lr = 3e-5  # base.py:292 warmup_start_lr default 3e-5 (not scaled by the batch)
    c.optimizer.inclusive_warmup = True  # solo/utils/lr_scheduler.py: start + k (base - start) / (W - 1)
    c.optimizer.end_lr_scale = 0.0  # base.py:291 min_lr default 0.0 (cosine to 0)
    c.optimizer.reference_replicas = 1  # LARS's conversion only; AdamW takes the same step for any gradient scale
    # base.py:322-330: a linear classifier on the detached features, a parameter group of the same AdamW with lr
    # classifier_lr (vit.yaml:36 3.0e-4, x 4 by args.py:157) and weight_decay 0.
    c.online_probe.enabled = True
    c.online_probe.optimizer = "adamw"
    c.online_probe.lr = 3.0e-4
    c.online_probe.weight_decay = 0.0
    c.online_probe.eval_split = "validation"  # ImageNet's labelled held-out split (set eval_every_epochs to use it)
    c.checkpoint_every_epochs = 1  # vit.yaml:43 checkpoint.frequency: 1
    c.picture_every_epochs = 5
    c.knn.every_epochs = 0  # use bt_keras.evaluate on saved encoders instead: kNN on ImageNet is costly
    c.knn.test_split = "validation"
    return c
