#!/usr/bin/env bash
# Offline demo on the CPU: install into ./.venv, build the tiny SD pipeline and the synthetic fill dataset,
# then train a ControlNet for a few minutes with validation. Extra flags are passed to train_controlnet.py.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

[ -f fixtures/tiny-sd/model_index.json ] || .venv/bin/python -m controlnet_training.fixtures pipeline fixtures/tiny-sd
[ -f fixtures/fill/imagefolder/metadata.jsonl ] || \
  .venv/bin/python -m controlnet_training.fixtures dataset fixtures/fill --rows 512 --resolution 64

mapfile -t PROMPTS < fixtures/fill/validation/captions.txt
.venv/bin/python train_controlnet.py \
  --pretrained_model_name_or_path fixtures/tiny-sd \
  --train_data_dir fixtures/fill/imagefolder \
  --output_dir demo-output \
  --resolution 64 --train_batch_size 4 --learning_rate 1e-4 \
  --max_train_steps 1500 --checkpointing_steps 500 --checkpoints_total_limit 2 \
  --validation_steps 500 --num_validation_images 2 \
  --validation_image fixtures/fill/validation/control_0.png fixtures/fill/validation/control_1.png \
  --validation_prompt "${PROMPTS[0]}" "${PROMPTS[1]}" \
  --proportion_empty_prompts 0.1 --snr_gamma 5 --seed 0 --resume_from_checkpoint latest "$@"
echo "tensorboard: .venv/bin/tensorboard --logdir demo-output/logs"
