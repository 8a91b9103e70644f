"""sanity.py: the verdict from the control-signal records, the warnings on flags far from the known-good ranges, and
one end-to-end sanity run of the SD trainer (where it writes, what it measures, what it reports)."""

from __future__ import annotations

import json

import pytest

from conftest import base_args, run_script
from controlnet_training.arguments import InputError, build_parser, check_args
from controlnet_training.sanity import flag_warnings, verdict


def records(loss_end: float, gain_end: float) -> list[dict]:
    return [
        {"step": 0, "heldout_loss": 0.20, "control_gain": 1.0},
        {"step": 30, "heldout_loss": 0.18, "control_gain": 1.005},
        {"step": 60, "heldout_loss": loss_end, "control_gain": gain_end},
    ]


@pytest.mark.parametrize(
    ("loss_end", "gain_end", "ok", "falls", "moves"),
    [
        (0.12, 1.08, True, True, True),
        (0.195, 1.08, False, False, True),  # -2.5%: within noise, not a fall
        (0.12, 1.004, False, True, False),
        (0.25, 1.0, False, False, False),
    ],
)
def test_verdict_needs_a_falling_loss_and_a_moving_gain(loss_end, gain_end, ok, falls, moves):
    passed, lines = verdict(records(loss_end, gain_end))
    assert passed == ok
    assert ("does NOT fall" not in lines[0]) == falls and ("does NOT move" not in lines[1]) == moves
    assert "0.20000 at step 0" in lines[0] and "at step 60" in lines[0]


def parse(*flags: str):
    args = build_parser("t").parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "d", *flags])
    check_args(args)
    return args


def test_warnings_name_the_flags_far_from_the_known_good_ranges():
    assert flag_warnings(parse("--learning_rate", "1e-5", "--train_batch_size", "4"), processes=1) == []
    low = flag_warnings(parse("--learning_rate", "2e-6", "--train_batch_size", "1", "--max_train_steps", "500"), 1)
    assert len(low) == 3
    assert "--learning_rate 2e-06 is low" in low[0] and "effective batch is 1" in low[1] and "4000" in low[2]
    assert "is high" in flag_warnings(parse("--learning_rate", "1e-3", "--train_batch_size", "4"), 1)[0]
    assert flag_warnings(parse("--train_batch_size", "1", "--learning_rate", "1e-5"), processes=4) == []  # 1 x 4
    prodigy = flag_warnings(parse("--optimizer", "prodigy", "--learning_rate", "1e-5", "--train_batch_size", "4"), 1)
    assert len(prodigy) == 1 and "Prodigy" in prodigy[0]


def test_bad_sanity_flags_are_refused():
    with pytest.raises(InputError, match="--sanity_check_steps must be >= 1"):
        parse("--sanity_check", "--sanity_check_steps", "0")
    with pytest.raises(InputError, match="drop --streaming"):
        parse("--sanity_check", "--streaming", "--max_train_samples", "8")


@pytest.mark.e2e
def test_a_sanity_run_fits_its_rows_and_reports(tiny_sd, fill_data, tmp_path):
    result = run_script(
        "train_controlnet.py",
        base_args(
            tiny_sd,
            fill_data["imagefolder"],
            tmp_path,
            sanity_check=True,
            sanity_check_steps=6,
            sanity_check_rows=4,
            learning_rate=1e-3,
            max_train_steps=100,
            validation_prompt=["red circle"],
            validation_image=[fill_data["validation"] / "control_0.png"],
        ),
    )
    log = " ".join(result.stderr.split())
    assert "Sanity check (6 steps on 4 rows" in log
    assert "loss on the fitted rows:" in log and "control gain: 1.0000 ->" in log
    assert "PASSED" in log or "FAILED" in log
    assert "--learning_rate 0.001 is high" in log and "effective batch is 2" in log and "--max_train_steps 100" in log
    folder = tmp_path / "sanity-check"
    metrics = [json.loads(line) for line in (folder / "control_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [0, 2, 4, 6]  # measured on the 4 fitted rows, every third of the run
    assert "On 4 held-out rows" in (folder / "README.md").read_text()
    assert not list(folder.glob("checkpoint-*")) and not list(folder.glob("images_*.png"))
    assert not (tmp_path / "diffusion_pytorch_model.safetensors").exists()  # the real run's folder is untouched
