"""CIFAR-10 with ResNet-18, exactly as solo-learn trains Barlow Twins: 92.10% top-1 / 99.73% top-5 after 1000 epochs
(vturrisi/solo-learn README.md, "Results, CIFAR-10", at commit 9187ea3), the accuracy of its ONLINE linear classifier
(trained on stop-gradient features during pre-training) on the test split: `online_val_top1` here.

    python -m bt_keras.train --config=experiments/cifar10_sololearn.py --data_dir=../shared/tfds --workdir=runs/solo

Each field says where it comes from in vturrisi/solo-learn:
  barlow.yaml = scripts/pretrain/cifar/barlow.yaml        asym.yaml = scripts/pretrain/cifar/augmentations/asymmetric.yaml
  base.py     = solo/methods/base.py                      args.py   = solo/args/pretrain.py
  method.py   = solo/methods/barlow_twins.py              loss.py   = solo/losses/barlow.py
  lars.py     = solo/utils/lars.py                        sched.py  = solo/utils/lr_scheduler.py
Differences that remain: solo-learn trains in 16-bit mixed precision on a GPU (barlow.yaml `precision: 16-mixed`; we
run float32 unless --mixed_precision); PyTorch's default init of the projector's and the online classifier's Linear
layers (U(+-1/sqrt(fan_in))) is not copied (Keras's Glorot uniform); the augmentation ops are ours (bt_keras.augment)
with solo-learn's parameters; its loss BatchNorm uses the local batch, which is the global one on its single GPU.
"""

from bt_keras.config import base_config, recipe_views


def get_config():
    c = base_config()
    c.name = "cifar10_sololearn"
    c.dataset = "tfds:cifar10"  # barlow.yaml data.dataset: cifar10
    c.image_size = 32  # asym.yaml crop_size: 32
    # asym.yaml, both views: RandomResizedCrop scale 0.08-1 (bicubic), colour jitter 0.4/0.4/0.2/0.1 p=0.8,
    # grayscale p=0.2, no blur, flip p=0.5; solarisation p=0.0 (view 1) / 0.2 (view 2). CIFAR-10 mean/std as
    # solo-learn's (solo/data/pretrain_dataloader.py MEANS_N_STD), from bt_keras.data.
    c.view1, c.view2 = recipe_views("cifar")
    c.backbone = "resnet18"  # barlow.yaml backbone.name: resnet18 (torchvision's, solo/backbones/resnet)
    # base.py replaces conv1 with nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False) and the max-pool
    # with Identity for cifar10: we follow it, padding 2 included (34 x 34 maps from 32 px; "cifar" would pad 1).
    c.stem = "cifar_pad2"
    c.zero_init_residual = False  # torchvision's default (solo/backbones/resnet calls resnet18() without it)
    c.projector = "2048-2048-2048"  # method.py: Linear(512, 2048)-BN-ReLU, Linear(2048, 2048)-BN-ReLU, Linear(2048,
    c.projector_bias = True  # 2048); barlow.yaml proj_hidden_dim / proj_output_dim 2048; nn.Linear has a bias
    c.lambd = 0.0051  # method.py default lamb 0.0051 (barlow.yaml does not set it)
    c.scale_loss = 0.1  # barlow.yaml method_kwargs.scale_loss: 0.1 (loss.py: scale_loss * sum)
    c.batch_size = 256  # barlow.yaml optimizer.batch_size: 256, devices: [0] (one GPU)
    c.epochs = 1000  # barlow.yaml max_epochs: 1000; 195 steps per epoch (drop_last=True, solo/data/pretrain_dataloader)
    c.optimizer.lr_weights = 0.3  # barlow.yaml optimizer.lr: 0.3, x batch*GPUs/256 = 1 (args.py)
    c.optimizer.lr_biases = 0.3  # one LARS parameter group per module, all at lr (base.py learnable_params)
    c.optimizer.scale_by_batch = False  # the scale is 1 at batch 256 on one GPU
    c.optimizer.momentum = 0.9  # args.py: optimizer.kwargs.momentum defaults to 0.9
    c.optimizer.weight_decay = 1e-4  # barlow.yaml optimizer.weight_decay: 1e-4
    c.optimizer.eta = 0.02  # barlow.yaml optimizer.kwargs.eta: 0.02
    c.optimizer.trust_ratio = "solo_learn"  # lars.py: eta ||p|| / (||g|| + wd ||p|| + eps); d = g for 1-D params
    c.optimizer.clip_lr = True  # barlow.yaml optimizer.kwargs.clip_lr: True (lars.py: min(lars_lr / lr, 1))
    c.optimizer.epsilon = 1e-8  # lars.py eps default
    # barlow.yaml exclude_bias_n_norm: True: 1-D parameters get d = g (LARS's exclude_1d, on by default).
    c.optimizer.warmup_epochs = 10  # base.py scheduler.warmup_epochs default 10, per step (interval "step")
    c.optimizer.warmup_start_lr = 3e-5  # base.py scheduler.warmup_start_lr default 3e-5
    c.optimizer.inclusive_warmup = True  # sched.py: start + k (base - start) / (W - 1)
    c.optimizer.end_lr_scale = 0.0  # base.py scheduler.min_lr default 0.0 (cosine to 0)
    c.optimizer.reference_replicas = 1  # one GPU: solo-learn's gradient is the true one
    # The online linear classifier (base.py): Linear(512, 10) on feats.detach() of both views, cross-entropy averaged
    # over them, in the same LARS as its own parameter group: lr classifier_lr 0.1 (barlow.yaml, x 1), weight decay 0,
    # the same warm-up + cosine schedule and LARS rule (clip_lr, eta 0.02, its bias excluded).
    c.online_probe.enabled = True
    c.online_probe.optimizer = "lars"
    c.online_probe.lr = 0.1
    c.online_probe.momentum = 0.9
    c.online_probe.weight_decay = 0.0
    c.online_probe.eval_every_epochs = 10  # solo-learn's 92.1% is this probe's top-1 on the test split (val_acc1)
    c.online_probe.eval_split = "test"
    c.knn.every_epochs = 10  # extra monitoring (solo-learn's knn_eval is off by default): kNN k=200, T=0.1
    c.knn.train_examples = 0
    c.knn.test_examples = 0
    return c
