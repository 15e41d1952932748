"""Task-uniform sampling: tasks are drawn uniformly, then cases uniformly within the task."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from uniseg_monai.core.errors import UsageError, flag


class TaskUniformSampler(Sampler[int]):
    """Dataset indices for ``num_samples`` draws per epoch, task-uniform rather than case-uniform.

    Args:
        task_ids: the task id of every dataset item.
        num_samples: indices per epoch on this rank (rounded down to whole batches).
        batch_size: the DataLoader's batch size (batches are consecutive runs of indices).
        single_task_batches: every batch from one task (the official behaviour); else each sample draws its own.
        seed, rank: the stream is seeded by (seed, epoch, rank), so ranks of a distributed run differ and
            every rank is still task-uniform. Every pass over the sampler advances the epoch by one (engines need
            no hook); :meth:`set_epoch` sets the epoch of the next pass.

    A resumed run continues the stream: :meth:`state_dict` (the epoch of the next pass; not the seed or rank, which
    come from the config) is saved in training checkpoints and :meth:`load_state_dict` restores it.
    """

    def __init__(
        self,
        task_ids: Sequence[int],
        num_samples: int,
        batch_size: int = 2,
        single_task_batches: bool = True,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        if not task_ids:
            raise ValueError("TaskUniformSampler needs a non-empty dataset")
        if not isinstance(batch_size, int) or not isinstance(num_samples, int) or not num_samples >= batch_size >= 1:
            raise UsageError(
                f"--batch_size must be a positive integer and --iterations_per_epoch at least 1 (samples per epoch "
                f"{num_samples!r} >= batch size {batch_size!r})"
            )
        ids = torch.as_tensor(list(task_ids))
        self.tasks = sorted(set(ids.tolist()))
        self.members = [torch.nonzero(ids == t).flatten() for t in self.tasks]
        self.batches = num_samples // batch_size
        self.batch_size = batch_size
        self.single_task_batches = flag(single_task_batches, "single_task_batches")
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(int(state["epoch"]))

    def __len__(self) -> int:
        return self.batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank)) % 2**63)
        self.epoch += 1
        n_tasks = len(self.tasks)
        for _ in range(self.batches):
            if self.single_task_batches:
                tasks = torch.randint(n_tasks, (1,), generator=g).expand(self.batch_size)
            else:
                tasks = torch.randint(n_tasks, (self.batch_size,), generator=g)
            for t in tasks.tolist():
                members = self.members[t]
                yield int(members[torch.randint(len(members), (1,), generator=g)])
