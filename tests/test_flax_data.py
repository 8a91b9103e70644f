"""flax_training/data.py: how the rows of a global batch are split between hosts and accumulation steps."""

from __future__ import annotations

import numpy as np


def test_hosts_load_disjoint_rows_and_accumulation_reads_the_same_rows():
    from controlnet_training.data import EpochSampler
    from controlnet_training.flax_training.data import BatchLayout, MapBatches

    class Rows:
        def __len__(self):
            return 24

    micro = 8  # 2 per device × 4 devices
    hosts = [BatchLayout(2, micro, slice(h * 4, h * 4 + 4)) for h in range(2)]
    positions = np.concatenate([layout.positions().ravel() for layout in hosts])
    assert sorted(positions) == list(range(16))  # two hosts cover the global batch exactly once

    def rows_per_step(layout):
        batches = MapBatches(Rows(), layout, collate=None, sampler=EpochSampler(24, seed=1))
        return [sorted(row for _, row in keys) for keys in batches.step_keys(0, 3)]

    accumulated = rows_per_step(BatchLayout(2, 4, slice(0, 4)))
    big = rows_per_step(BatchLayout(1, 8, slice(0, 8)))
    assert accumulated == big and len({r for step in big[:1] for r in step}) == 8
