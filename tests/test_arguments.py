"""The flag set, its defaults and the parse-time rules."""

from __future__ import annotations

import re

import pytest

from controlnet_training.arguments import InputError, build_parser, check_args

REFERENCE_SD_FLAGS = {
    "pretrained_model_name_or_path",
    "controlnet_model_name_or_path",
    "revision",
    "variant",
    "tokenizer_name",
    "output_dir",
    "cache_dir",
    "seed",
    "resolution",
    "train_batch_size",
    "num_train_epochs",
    "max_train_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "learning_rate",
    "scale_lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_num_cycles",
    "lr_power",
    "use_8bit_adam",
    "dataloader_num_workers",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
    "push_to_hub",
    "hub_token",
    "hub_model_id",
    "logging_dir",
    "allow_tf32",
    "report_to",
    "mixed_precision",
    "enable_xformers_memory_efficient_attention",
    "set_grads_to_none",
    "dataset_name",
    "dataset_config_name",
    "train_data_dir",
    "image_column",
    "conditioning_image_column",
    "caption_column",
    "max_train_samples",
    "proportion_empty_prompts",
    "validation_prompt",
    "validation_image",
    "num_validation_images",
    "validation_steps",
    "tracker_project_name",
}

REFERENCE_DEFAULTS = {
    "output_dir": "controlnet-model",
    "seed": None,
    "resolution": 512,
    "train_batch_size": 4,
    "num_train_epochs": 1,
    "max_train_steps": None,
    "checkpointing_steps": 500,
    "checkpoints_total_limit": None,
    "gradient_accumulation_steps": 1,
    "learning_rate": 5e-6,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 500,
    "lr_num_cycles": 1,
    "lr_power": 1.0,
    "dataloader_num_workers": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-2,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "logging_dir": "logs",
    "report_to": "tensorboard",
    "mixed_precision": None,
    "image_column": "image",
    "conditioning_image_column": "conditioning_image",
    "caption_column": "text",
    "proportion_empty_prompts": 0,
    "num_validation_images": 4,
    "validation_steps": 100,
    "tracker_project_name": "train_controlnet",
    "snr_gamma": None,
    "gradient_checkpointing": False,
    "set_grads_to_none": False,
    "push_to_hub": False,
}
OUR_DEFAULTS = {
    "logging_steps": 10,
    "torch_compile": False,
    "channels_last": False,
    "max_consecutive_nonfinite_steps": 3,
    "loss_type": "l2",
    "noise_offset": 0.0,
    "input_perturbation": 0.0,
    "timestep_bias_strategy": "none",
    "save_dtype": "fp32",
    "export_single_file": False,
}


def parse(*flags: str):
    return build_parser("test").parse_args(["--pretrained_model_name_or_path", "m", *flags])


OUR_FLAGS = {
    "snr_gamma",
    "validation_split",
    "cache_encodings",
    "logging_steps",
    "torch_compile",
    "channels_last",
    "max_consecutive_nonfinite_steps",
    "streaming",
}
GEOMETRY_FLAGS = {
    "aspect_ratio_buckets",
    "bucket_step",
    "min_bucket_aspect_ratio",
    "max_bucket_aspect_ratio",
    "max_buckets",
    "bucket_max_upscale",
    "random_crop",
    "random_flip",
    "conditioning_interpolation",
}
OBJECTIVE_FLAGS = {
    "noise_offset",
    "input_perturbation",
    "loss_type",
    "huber_schedule",
    "huber_c",
    "timestep_bias_strategy",
    "timestep_bias_multiplier",
    "timestep_bias_portion",
    "timestep_bias_begin",
    "timestep_bias_end",
}
EXPORT_FLAGS = {"save_dtype", "export_single_file"}
EMA_FLAGS = {
    "use_ema",
    "ema_decay",
    "ema_power",
    "ema_update_after_step",
    "ema_update_every",
    "ema_on_cpu",
    "validate_with_ema",
    "save_raw_weights",
}
OPTIMIZER_FLAGS = {
    "optimizer",
    "prodigy_beta3",
    "prodigy_decouple",
    "prodigy_use_bias_correction",
    "prodigy_safeguard_warmup",
}
SANITY_FLAGS = {"sanity_check", "sanity_check_steps", "sanity_check_rows"}
SHARED_FLAGS = GEOMETRY_FLAGS | OBJECTIVE_FLAGS | EXPORT_FLAGS | EMA_FLAGS | OPTIMIZER_FLAGS | SANITY_FLAGS  # all three
OUR_FLAGS |= SHARED_FLAGS


def test_every_reference_flag_plus_ours():
    parser = build_parser("test")
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert len(REFERENCE_SD_FLAGS) == 52
    assert dests == REFERENCE_SD_FLAGS | OUR_FLAGS


def test_reference_defaults():
    args = parse("--dataset_name", "d")
    for name, value in {**REFERENCE_DEFAULTS, **OUR_DEFAULTS}.items():
        assert getattr(args, name) == value, name


def test_validation_lists_and_types():
    args = parse(
        "--dataset_name",
        "d",
        "--validation_prompt",
        "a",
        "b",
        "--validation_image",
        "x.png",
        "y.png",
        "--snr_gamma",
        "5",
    )
    assert args.validation_prompt == ["a", "b"] and args.validation_image == ["x.png", "y.png"]
    assert args.snr_gamma == 5.0
    check_args(args)


@pytest.mark.parametrize("prompts,images", [(1, 3), (3, 1), (2, 2)])
def test_allowed_pairings(prompts, images):
    args = parse(
        "--dataset_name", "d", "--validation_prompt", *["p"] * prompts, "--validation_image", *["i.png"] * images
    )
    check_args(args)


def test_both_dataset_flags_are_allowed_like_the_reference():
    check_args(parse("--dataset_name", "d", "--train_data_dir", "sub"))


def test_one_line_error_without_usage(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser("test").parse_args(["--pretrained_model_name_or_path", "m", "--mixed_precision", "fp8"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--mixed_precision" in err


def test_positive_checks_name_the_flag():
    with pytest.raises(InputError, match="--num_train_epochs must be > 0"):
        check_args(parse("--dataset_name", "d", "--num_train_epochs", "0"))
    with pytest.raises(InputError, match="--snr_gamma must be > 0"):
        check_args(parse("--dataset_name", "d", "--snr_gamma", "-1"))


def test_sdxl_flags_are_the_shared_ones_plus_its_own():
    from controlnet_training.torch_training.sdxl import add_sdxl_args

    parser = build_parser("test")
    add_sdxl_args(parser)
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    sdxl_own = {
        "pretrained_vae_model_name_or_path",
        "crops_coords_top_left_h",
        "crops_coords_top_left_w",
        "enable_npu_flash_attention",
        "image_interpolation_mode",
    }
    assert dests == REFERENCE_SD_FLAGS | sdxl_own | OUR_FLAGS
    assert len(dests) == 57 + len(OUR_FLAGS)
    args = parser.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    assert args.tracker_project_name == "sd_xl_train_controlnet"
    assert args.image_interpolation_mode == "lanczos" and args.crops_coords_top_left_h == 0


# The diffusers SD3 and Flux ControlNet scripts' own flags (beyond the SD script's); the SD3 script lacks
# --enable_xformers_memory_efficient_attention and --tokenizer_name, the Flux one --train_data_dir: ours keep them.
REFERENCE_SD3_OWN = {
    "dataset_preprocess_batch_size",
    "logit_mean",
    "logit_std",
    "max_sequence_length",
    "mode_scale",
    "num_extra_conditioning_channels",
    "precondition_outputs",
    "upcast_vae",
    "weighting_scheme",
}
REFERENCE_FLUX_OWN = {
    "crops_coords_top_left_h",
    "crops_coords_top_left_w",
    "enable_model_cpu_offload",
    "enable_npu_flash_attention",
    "guidance_scale",
    "jsonl_for_train",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "num_double_layers",
    "num_single_layers",
    "pretrained_vae_model_name_or_path",
    "save_weight_dtype",
    "use_adafactor",
    "weighting_scheme",
}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_trainer_flags_are_the_references_plus_ours(family):
    from controlnet_training.torch_training.flux import add_flux_args
    from controlnet_training.torch_training.sd3 import add_sd3_args

    parser = build_parser("test")
    (add_sd3_args if family == "sd3" else add_flux_args)(parser)
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    own = REFERENCE_SD3_OWN if family == "sd3" else REFERENCE_FLUX_OWN | {"max_sequence_length"}
    assert dests == REFERENCE_SD_FLAGS | own | OUR_FLAGS
    args = parser.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d"])
    assert (args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale) == ("logit_normal", 0, 1, 1.29)
    if family == "sd3":
        assert (args.precondition_outputs, args.max_sequence_length, args.num_extra_conditioning_channels) == (1, 77, 0)
        assert args.learning_rate == 5e-6 and args.tracker_project_name == "train_controlnet"
    else:
        assert (args.num_double_layers, args.num_single_layers, args.guidance_scale) == (4, 4, 3.5)
        assert (args.save_weight_dtype, args.num_validation_images) == ("fp32", 2)
        assert args.tracker_project_name == "flux_train_controlnet"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--snr_gamma", "5"], "--snr_gamma is not supported by the flow-matching trainers: Min-SNR"),
        (["--noise_offset", "0.1"], "--noise_offset is not supported by the flow-matching trainers"),
        (["--timestep_bias_strategy", "later"], "--timestep_bias_strategy is not supported"),
        (["--loss_type", "huber", "--huber_schedule", "snr"], "--huber_schedule snr follows a DDPM's noise levels"),
        (["--logit_std", "0"], "--logit_std must be > 0"),
        (["--export_single_file"], "--export_single_file writes the original SD / SDXL ControlNet layout"),
    ],
)
def test_flow_matching_refuses_ddpm_options_with_the_reason(flags, message):
    from controlnet_training.flow_matching import check_flow_args
    from controlnet_training.torch_training.sd3 import add_sd3_args

    parser = build_parser("test")
    add_sd3_args(parser)
    with pytest.raises(InputError, match=re.escape(message)):
        check_flow_args(parser.parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d", *flags]))
