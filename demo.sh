#!/usr/bin/env bash
# Offline demo on the CPU: install into ./.venv, build the synthetic fill dataset and a tiny SD base that has been
# pre-trained on it (once, cached in fixtures/), then train a ControlNet on that base with validation and print
# the control-adherence curve, of the weights and of their EMA. Extra flags are passed to train_controlnet.py.
#   DEMO_BUCKETS=1 ./demo.sh   the same on a non-square variant of the data (aspect ratios 1:2 to 2:1), trained in
#                              aspect-ratio buckets, into demo-output-buckets
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=.venv/bin/python

[ -f fixtures/fill/imagefolder/metadata.jsonl ] || \
  $PY -m controlnet_training.fixtures dataset fixtures/fill --rows 512 --resolution 64
# A base a ControlNet can learn on: calibrated VAE + autoencoder and text-to-image pre-training (~10 CPU minutes,
# once). A random tiny base cannot learn control: its latents are mostly the VAE's own noise.
[ -f fixtures/tiny-sd-pretrained/model_index.json ] || \
  $PY -m controlnet_training.fixtures pretrained fixtures/tiny-sd-pretrained --data fixtures/fill/imagefolder

DATA=fixtures/fill OUT=demo-output GEOMETRY=()
if [ -n "${DEMO_BUCKETS:-}" ]; then
  DATA=fixtures/fill-mixed OUT=demo-output-buckets GEOMETRY=(--aspect_ratio_buckets --bucket_step 16)
  [ -f $DATA/imagefolder/metadata.jsonl ] || \
    $PY -m controlnet_training.fixtures dataset $DATA --rows 512 --resolution 64 --aspect_ratios 0.5 0.75 1 1.333 2
fi

mapfile -t PROMPTS < $DATA/validation/captions.txt
start=$(date +%s)
$PY train_controlnet.py \
  --pretrained_model_name_or_path fixtures/tiny-sd-pretrained \
  --train_data_dir $DATA/imagefolder \
  --output_dir $OUT "${GEOMETRY[@]}" \
  --resolution 64 --train_batch_size 8 --learning_rate 1e-3 \
  --max_train_steps 2000 --checkpointing_steps 1000 --checkpoints_total_limit 2 \
  --validation_steps 250 --validation_split 32 --num_validation_images 2 \
  --validation_image $DATA/validation/control_0.png $DATA/validation/control_1.png \
  --validation_prompt "${PROMPTS[0]}" "${PROMPTS[1]}" \
  --use_ema --seed 0 --resume_from_checkpoint latest "$@"
echo
echo "ControlNet training took $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s."
$PY -m controlnet_training.control_signal $OUT
echo "tensorboard: .venv/bin/tensorboard --logdir $OUT/logs"
