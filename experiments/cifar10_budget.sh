#!/usr/bin/env bash
# The CIFAR-10 runs behind experiments/RESULTS.md: a recipe (default experiments/cifar10_resnet18.py; RECIPE=... for
# another, e.g. experiments/cifar10_sololearn.py) for the budget a 2-core CPU allows in a working session, then kNN
# and a linear probe on every kept checkpoint, step 0 (the random initialisation) included, and the table.
# Usage: [RECIPE=experiments/X.py] [CKPT_EVERY=2] bash experiments/cifar10_budget.sh [WORKDIR] [EPOCHS] [STEPS_PER_EPOCH]
#        [more --config.X=Y overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/cifar10_500}
EPOCHS=${2:-10}
STEPS=${3:-50}
RECIPE=${RECIPE:-experiments/cifar10_resnet18.py}
CKPT_EVERY=${CKPT_EVERY:-2}
DATA_DIR=${DATA_DIR:-../shared/tfds}
LIMITS="--limit_train=10000 --limit_test=2000"  # the first 10k train / 2k test images (TFDS order): minutes each

python -m bt_keras.train --config="$RECIPE" --data_dir="$DATA_DIR" --workdir="$WORKDIR" \
  --config.epochs="$EPOCHS" --config.steps_per_epoch="$STEPS" --config.optimizer.warmup_epochs=1 \
  --config.knn.every_epochs=0 --config.keep_checkpoints=10 --config.checkpoint_every_epochs="$CKPT_EVERY" "${@:4}"

for index in "$WORKDIR"/checkpoints/ckpt-*.index; do
  checkpoint=${index%.index}
  python -m bt_keras.evaluate.knn --encoder="$checkpoint" --dataset=tfds:cifar10 --data_dir="$DATA_DIR" $LIMITS
  python -m bt_keras.evaluate.linear --encoder="$checkpoint" --dataset=tfds:cifar10 --data_dir="$DATA_DIR" \
    --mode=features $LIMITS
done
python experiments/results_table.py "$WORKDIR"
