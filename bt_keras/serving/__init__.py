"""Serving bt_keras encoders with TF Serving: the SavedModel export and a client for the served model.

  `savedmodel`  `export_encoder`: a versioned SavedModel folder TF Serving loads as is (signatures, warm-up, metadata)
  `signatures`  the three serving functions around an encoder, with preprocessing identical to evaluation's
  `warmup`      TF Serving's warm-up file, written with a small protobuf encoder of our own
  `client`      REST (standard library only) and gRPC (tensorflow-serving-api) requests to a served model

The command lines are `python -m export.savedmodel` and `python -m export.client` (thin wrappers in the repository's
`export/` folder), or the installed `bt-keras-export` / `bt-keras-client`. Importing this package loads no
TensorFlow, so a client-only user stays light.
"""
