"""ViT-S/16 from KerasHub's `ViTBackbone` as a Barlow Twins encoder: config.backbone="bt_keras.nets.vit:vit_small_16".

KerasHub is an optional extra (`pip install -e ".[hub]"`, keras-hub>=0.32): it is imported when a ViT is built, never
when bt_keras is, and nothing here is registered in `backbones.BACKBONES` (the name goes through
`backbones.foreign_backbone`, MODULE:CALLABLE).

The network is solo-learn's `vit_small` (vturrisi/solo-learn at 9187ea3, solo/backbones/vit/vit.py lines 37-42: timm's
`VisionTransformer(patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=0)`, the backbone every method but
MoCo v3 and MAE gets), with timm's defaults for the rest: MLP ratio 4 (1536), biases on q/k/v and the MLP, no dropout
or drop-path, pre-norm blocks, LayerNorm epsilon 1e-6, a learned position embedding for the class token and the 196
patches, and, as features, the class token after the final LayerNorm (`global_pool="token"`, what timm's
`forward_features` + `forward_head(pre_logits)` returns with num_classes=0). KerasHub's `ViTBackbone` has the same
layout (ViTPatchingAndEmbedding, pre-norm ViTEncoderBlocks, a final LayerNorm) and the same parameter count at 224 px,
21,665,664 (`tests/nets/test_vit.py`); it returns every token, [batch, 197, 384], so the encoder takes token 0 with
Keras's own layers (Cropping1D + Flatten: the saved `encoder.keras` stays plain Keras + KerasHub). Initialisation is
KerasHub's (Glorot uniform kernels, position embedding N(0, 0.02)), not timm's truncated normal (std 0.02).

A ViT holds LayerNorm only: there is no BatchNormalization to synchronise, so `config.synchronized_bn` changes nothing
in the encoder (the projector's BatchNorm is still bt_keras's, synchronised as configured).
"""

from __future__ import annotations

import keras

# solo-learn's vit_small (solo/backbones/vit/vit.py:37-42) with timm's VisionTransformer defaults (mlp_ratio=4.0,
# qkv_bias=True, drop_rate=attn_drop_rate=drop_path_rate=0, LayerNorm eps 1e-6), as ViTBackbone's arguments.
VIT_SMALL_16 = {
    "patch_size": 16,
    "num_layers": 12,
    "num_heads": 6,
    "hidden_dim": 384,
    "mlp_dim": 1536,
    "dropout_rate": 0.0,
    "attention_dropout": 0.0,
    "layer_norm_epsilon": 1e-6,
    "use_mha_bias": True,
    "use_mlp_bias": True,
}

INSTALL_HINT = 'pip install -e ".[hub]" (or pip install "keras-hub>=0.32")'


def _keras_hub():
    try:
        import keras_hub
    except ImportError as error:
        if getattr(error, "name", None) != "keras_hub":  # installed, but something it imports fails: say what
            detail = " ".join(str(error).split())
            raise ImportError(f"bt_keras.nets.vit: KerasHub does not import ({detail}); reinstall: {INSTALL_HINT}.") \
                from None
        raise ImportError(f"bt_keras.nets.vit needs KerasHub, which is not installed: {INSTALL_HINT}.") from None
    return keras_hub


def vit_small_16(input_shape=(224, 224, 3), name: str = "vit_small_16", **options) -> keras.Model:
    """ViT-S/16 (KerasHub `ViTBackbone`) mapping [batch, H, W, 3] images to the class token's features [batch, 384].

    `options` override `VIT_SMALL_16` (any `ViTBackbone` argument), e.g. `num_layers=1, hidden_dim=32, num_heads=2,
    mlp_dim=64` for a tiny test network. Height and width must be equal and fixed (the position embedding has one row
    per patch): 224 px gives 14 x 14 patches, 32 px with patch_size=16 gives 2 x 2.
    """
    keras_hub = _keras_hub()
    settings = {**VIT_SMALL_16, **options}
    backbone = keras_hub.models.ViTBackbone(image_shape=tuple(input_shape), **settings)
    # Nested, not flattened: encoder.keras then rebuilds it with ViTBackbone.from_config (its constructor arguments);
    # KerasHub 0.32's ViTPatchingAndEmbedding cannot be rebuilt from its own get_config (num_patches, num_positions).
    images = keras.Input(shape=tuple(input_shape), name="images")
    tokens = backbone(images)  # [batch, 1 + patches, hidden]: the class token first
    if len(tokens.shape) != 3:
        raise ValueError(f"keras_hub ViTBackbone returned shape {tuple(tokens.shape)}, not [batch, tokens, hidden].")
    class_token = keras.layers.Cropping1D((0, int(tokens.shape[1]) - 1), name="class_token")(tokens)
    features = keras.layers.Flatten(name="features")(class_token)
    return keras.Model(images, features, name=name)
