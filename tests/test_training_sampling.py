"""The crops of an epoch: a single-process run's, shared out among DDP ranks."""

from __future__ import annotations

import pytest

from napari_medseg.training.setup import EpochSampler


@pytest.mark.parametrize("size, wanted, world", [(16, 8, 2), (16, 16, 2), (16, 7, 2), (10, 10, 3), (5, 1, 4)])
def test_ranks_share_out_the_crops_of_a_single_process_epoch(size, wanted, world):
    single = EpochSampler(size, wanted, seed=3)
    single.set_epoch(2)
    alone = list(single)
    assert len(alone) == len(single) == min(wanted, size) and len(set(alone)) == len(alone)
    shares = []
    for rank in range(world):
        sampler = EpochSampler(size, wanted, seed=3, rank=rank, world_size=world)
        sampler.set_epoch(2)
        shares.append(list(sampler))
        assert len(shares[-1]) == len(sampler)
    assert len({len(s) for s in shares}) == 1  # as many steps on every rank
    dealt = [c for turn in zip(*shares) for c in turn]
    assert dealt[:len(alone)] == alone  # every crop of the single-process epoch, once ...
    assert len(dealt) - len(alone) < world and set(dealt) == set(alone)  # ... and a few repeated to even the shares
