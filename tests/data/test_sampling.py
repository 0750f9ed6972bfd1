"""The training data order: a function of (seed, epoch) alone, restartable mid-epoch."""

from __future__ import annotations

from torch.utils.data import Dataset

from malaria.data.sampling import ResumableLoader, ResumableSampler


class Items(Dataset):
    def __len__(self) -> int:
        return 50

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, int]:
        return item


def test_training_order_and_augmentation_seeds_depend_on_seed_and_epoch_only() -> None:
    def epoch(seed: int, number: int, **ranks: int) -> list[tuple[int, int]]:
        sampler = ResumableSampler(Items(), seed=seed, **ranks)
        sampler.set_epoch(number)
        return list(sampler)

    assert epoch(1, 0) == epoch(1, 0) != epoch(1, 1) and epoch(1, 0) != epoch(2, 0)
    assert sorted(i for i, _ in epoch(1, 3)) == list(range(50))
    shards = [epoch(1, 3, num_replicas=2, rank=r) for r in (0, 1)]
    assert not {i for i, _ in shards[0]} & {i for i, _ in shards[1]}
    seeds = dict(epoch(1, 3))
    assert all(
        seeds[i] == s for shard in shards for i, s in shard
    )  # an image's augmentation ignores the sharding


def test_loader_resumes_after_the_batches_it_had_handed_out() -> None:
    def loader() -> ResumableLoader:
        return ResumableLoader(
            Items(), batch_size=4, sampler=ResumableSampler(Items(), seed=0), drop_last=True
        )

    original = loader()
    original.sampler.set_epoch(2)
    batches = iter(original)
    seen = [next(batches) for _ in range(5)]
    state = original.state_dict()
    assert state == {"epoch": 2, "batches": 5}

    restored = loader()
    restored.load_state_dict(state)
    rest = list(restored)
    full = loader()
    full.sampler.set_epoch(2)
    assert [b[0].tolist() for b in seen + rest] == [b[0].tolist() for b in full]
    assert restored.state_dict() == {"epoch": 2, "batches": len(full)}

    restored.load_state_dict(
        restored.state_dict()
    )  # saved at the end of an epoch: the next one starts afresh
    assert restored.sampler.epoch == 3 and len(list(restored)) == len(full)
