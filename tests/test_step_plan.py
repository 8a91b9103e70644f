"""Step arithmetic (steps.py): updates per epoch, epochs, and where a resumed run starts."""

from __future__ import annotations

from controlnet_training.step_plan import plan_steps


def test_epochs_and_updates_with_a_partial_accumulation_group():
    plan = plan_steps(batches_per_epoch=7, gradient_accumulation_steps=2, max_train_steps=None, num_train_epochs=3)
    assert plan.updates_per_epoch == 4  # 2+2+2+1: the last batch of the epoch syncs too
    assert plan.max_train_steps == 12 and plan.num_epochs == 3


def test_max_steps_override_epochs():
    plan = plan_steps(batches_per_epoch=6, gradient_accumulation_steps=1, max_train_steps=8, num_train_epochs=1)
    assert plan.num_epochs == 2 and plan.max_train_steps == 8


def test_resume_position_skips_the_micro_batches_already_seen():
    plan = plan_steps(batches_per_epoch=12, gradient_accumulation_steps=2, max_train_steps=8, num_train_epochs=1)
    assert plan.updates_per_epoch == 6
    assert plan.position(0) == (0, 0)
    assert plan.position(4) == (0, 8)  # mid-epoch: 4 updates × 2 micro-batches
    assert plan.position(6) == (1, 0)  # an epoch boundary skips nothing
    assert plan.position(7) == (1, 2)
