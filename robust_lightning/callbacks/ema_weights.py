"""Lightning's EMAWeightAveraging in a form that ``ddp_spawn`` can send to its worker processes."""

from __future__ import annotations

import functools
from typing import Any

import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import Tensor


class EMAWeights(EMAWeightAveraging):
    """An exponential moving average of the weights, for validation, test and the trained model.

    Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging`, the same update
    (``decay * average + (1 - decay) * weights`` after every optimizer step), except that it pickles:
    torch's ``get_ema_avg_fn``, which Lightning's uses, returns a local function, and ``ddp_spawn``
    pickles the callbacks to start its workers. PoisonFilter's restart restarts the average.

    Example:
        >>> import pickle
        >>> pickle.loads(pickle.dumps(EMAWeights(decay=0.99))).decay
        0.99
    """

    def __init__(self, decay: float = 0.999, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)  # checks the decay
        self.decay = decay
        self._kwargs["avg_fn"] = functools.partial(_ema_update, decay)


@torch.no_grad()
def _ema_update(decay: float, average: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
    return decay * average + (1 - decay) * current
