import torch

from ssroute.data import ImageSet
from ssroute.data.loader import EpochSampler, ResumableLoader


def test_epoch_sampler_is_a_function_of_seed_and_epoch_and_shards_disjointly():
    a, b = EpochSampler(10, seed=3), EpochSampler(10, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    shards = [EpochSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    seen = [i for s in shards for i in s]
    assert len(seen) == 9 and len(set(seen)) == 9


def test_resumable_loader_skips_exactly_the_consumed_batches():
    data = ImageSet(torch.zeros(20, 1, 2, 2, dtype=torch.uint8), torch.arange(20))
    full = ResumableLoader(data, batch_size=4, seed=0)
    full.epoch_sampler.set_epoch(1)
    expected = [batch[2].tolist() for batch in full]
    interrupted = ResumableLoader(data, batch_size=4, seed=0)
    interrupted.epoch_sampler.set_epoch(1)
    for i, _ in enumerate(interrupted):
        interrupted.mark_consumed()
        if i == 1:
            break
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "consumed": 2}
    resumed = ResumableLoader(data, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    iterator = iter(resumed)  # Lightning creates the iterator before it calls set_epoch
    resumed.epoch_sampler.set_epoch(1)
    assert [batch[2].tolist() for batch in iterator] == expected[2:]
    # the next epoch starts from its beginning again
    resumed.epoch_sampler.set_epoch(2)
    assert len(list(resumed)) == 5
