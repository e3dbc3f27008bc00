"""Random draws that depend on the batch, not on the global RNG's history, so that a resumed run repeats them."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer


class BatchSeed:
    """Seed each batch's random draws from one run seed and the batch's place in the run.

    Lightning checkpoints neither the global RNG nor anything drawn from it, so a callback that drew
    its random starts or mixing weights from it would draw differently after a resume. Here every
    batch's draws run on a forked RNG seeded from the run seed, the stream's ``name`` and the batch's
    position (rank, epoch, batch) through NumPy's ``SeedSequence``, a hash made for deriving seeds:
    the draws are a function of where the batch is, so a resumed run repeats the uninterrupted
    one's; callbacks draw independent streams; and the global RNG is left as it was.
    The run seed is rank 0's ``torch.initial_seed()`` (what ``seed_everything`` set) and goes into
    checkpoints through the owning callback's ``state_dict``.

    Example:
        >>> seeds = BatchSeed("example", run_seed=7)
        >>> with seeds.fork(torch.device("cpu"), 0, 2, 5):
        ...     first = torch.rand(2)
        >>> with seeds.fork(torch.device("cpu"), 0, 2, 5):
        ...     again = torch.rand(2)
        >>> with seeds.fork(torch.device("cpu"), 0, 2, 6):
        ...     next_batch = torch.rand(2)
        >>> torch.equal(first, again), torch.equal(first, next_batch)
        (True, False)
    """

    def __init__(self, name: str, run_seed: int | None = None) -> None:
        self.stream = zlib.crc32(name.encode())
        self.run_seed = run_seed

    def setup(self, trainer: Trainer) -> None:
        """Take rank 0's initial seed, so that every rank derives its seeds from the same one."""
        self.run_seed = int(trainer.strategy.broadcast(torch.initial_seed(), src=0))

    @contextmanager
    def fork(self, device: torch.device, *position: int) -> Iterator[None]:
        """Run the block on an RNG seeded from the run seed and ``position`` (non-negative integers)."""
        if self.run_seed is None:
            raise RuntimeError("BatchSeed.fork() before setup(): the run seed is not set yet.")
        entropy = [self.run_seed, self.stream, *position]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1  # manual_seed takes < 2**63
        on_cpu = device.type == "cpu"
        with torch.random.fork_rng([] if on_cpu else [device], device_type=None if on_cpu else device.type):
            # On the CPU, only its generator: torch.manual_seed would also reseed a GPU, which is not forked.
            (torch.default_generator.manual_seed if on_cpu else torch.manual_seed)(seed)
            yield

    def fork_for(self, trainer: Trainer, batch_idx: int, device: torch.device) -> Iterator[None]:
        """:meth:`fork` for this rank's training batch ``batch_idx`` of the current epoch."""
        return self.fork(device, trainer.global_rank, trainer.current_epoch, batch_idx)

    def state_dict(self) -> dict[str, Any]:
        # Nothing before setup (a checkpoint saved after validate or test), so that resuming keeps setup's seed.
        return {} if self.run_seed is None else {"run_seed": self.run_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("run_seed") is not None:
            self.run_seed = state_dict["run_seed"]


class SeededCallback(Callback):
    """A callback whose random draws come from a :class:`BatchSeed`, its run seed saved in checkpoints.

    Example:
        >>> class Draws(SeededCallback):
        ...     def __init__(self):
        ...         self._seeds = BatchSeed("draws", run_seed=3)
        >>> Draws().state_dict()
        {'run_seed': 3}
    """

    _seeds: BatchSeed

    def state_dict(self) -> dict[str, Any]:
        return self._seeds.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._seeds.load_state_dict(state_dict)
