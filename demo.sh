#!/usr/bin/env bash
# Offline demo on the CPU: install into ./.venv, build the synthetic fill dataset and a tiny SD base that has been
# pre-trained on it (once, cached in fixtures/), then train a ControlNet on that base with validation and print
# the control-adherence curve. Extra flags are passed to train_controlnet.py.
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

mapfile -t PROMPTS < fixtures/fill/validation/captions.txt
start=$(date +%s)
$PY train_controlnet.py \
  --pretrained_model_name_or_path fixtures/tiny-sd-pretrained \
  --train_data_dir fixtures/fill/imagefolder \
  --output_dir demo-output \
  --resolution 64 --train_batch_size 8 --learning_rate 1e-3 \
  --max_train_steps 2000 --checkpointing_steps 1000 --checkpoints_total_limit 2 \
  --validation_steps 250 --validation_split 32 --num_validation_images 2 \
  --validation_image fixtures/fill/validation/control_0.png fixtures/fill/validation/control_1.png \
  --validation_prompt "${PROMPTS[0]}" "${PROMPTS[1]}" \
  --seed 0 --resume_from_checkpoint latest "$@"
echo
echo "ControlNet training took $(( ($(date +%s) - start) / 60 )) min $(( ($(date +%s) - start) % 60 )) s."
$PY -m controlnet_training.control_signal demo-output
echo "tensorboard: .venv/bin/tensorboard --logdir demo-output/logs"
