"""Task-uniform sampling."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils.data import DataLoader

from uniseg_monai.data import TaskUniformSampler

TASK_IDS = [0] * 90 + [1] * 10 + [5] * 3  # heavily unbalanced cases per task


def batches(sampler, batch_size=2):
    return list(DataLoader(list(range(len(TASK_IDS))), batch_size=batch_size, sampler=sampler))


def test_tasks_are_drawn_uniformly_not_cases():
    sampler = TaskUniformSampler(TASK_IDS, num_samples=6000, batch_size=2)
    counts = Counter(TASK_IDS[i] for i in sampler)
    assert sum(counts.values()) == 6000
    for task in (0, 1, 5):
        assert counts[task] / 6000 == pytest.approx(1 / 3, abs=0.04)
    cases_of_task_5 = Counter(i for i in sampler if TASK_IDS[i] == 5)
    assert set(cases_of_task_5) == {100, 101, 102}  # cases uniform within the task
    assert min(cases_of_task_5.values()) > 0.25 * max(cases_of_task_5.values())


def test_single_task_and_mixed_batches():
    single = batches(TaskUniformSampler(TASK_IDS, num_samples=400, batch_size=4), batch_size=4)
    assert all(len({TASK_IDS[i] for i in b.tolist()}) == 1 for b in single)
    mixed = batches(TaskUniformSampler(TASK_IDS, 400, batch_size=4, single_task_batches=False), batch_size=4)
    assert any(len({TASK_IDS[i] for i in b.tolist()}) > 1 for b in mixed)


def test_streams_are_reproducible_and_differ_by_epoch_and_rank():
    a, b = TaskUniformSampler(TASK_IDS, 100), TaskUniformSampler(TASK_IDS, 100)
    first = list(a)
    assert first == list(b)
    assert list(a) != first  # the next pass is the next epoch
    b.set_epoch(0)
    assert list(b) == first
    assert list(TaskUniformSampler(TASK_IDS, 100, rank=1)) != list(a)
    assert len(TaskUniformSampler(TASK_IDS, 101, batch_size=2)) == 100


def test_state_dict_continues_the_stream_and_keeps_the_rank():
    uninterrupted = TaskUniformSampler(TASK_IDS, 100, rank=1)
    first = list(uninterrupted)
    state = uninterrupted.state_dict()
    assert state == {"epoch": 1}
    second = list(uninterrupted)
    resumed = TaskUniformSampler(TASK_IDS, 100, rank=1)  # the rank comes from the config, not the state
    resumed.load_state_dict(state)
    assert list(resumed) == second != first
    other_rank = TaskUniformSampler(TASK_IDS, 100, rank=0)
    other_rank.load_state_dict(state)
    assert list(other_rank) != second


def test_bad_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        TaskUniformSampler([], 10)
    with pytest.raises(ValueError, match="--batch_size must be a positive integer"):
        TaskUniformSampler([0], 1, batch_size=2)
