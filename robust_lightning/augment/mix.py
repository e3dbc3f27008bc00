"""Mix each sample of a batch with another one of the same batch (Zhang et al. 2018; Yun et al. 2019)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def mixup(x: Tensor, lam: float, permutation: Tensor) -> Tensor:
    """``lam * x + (1 - lam) * x[permutation]``: mixup's inputs (Zhang et al., ICLR 2018).

    Example:
        >>> mixup(torch.tensor([[0.0], [1.0]]), 0.75, torch.tensor([1, 0])).flatten().tolist()
        [0.25, 0.75]
    """
    return lam * x + (1 - lam) * x[permutation]


def cutmix(
    x: Tensor, lam: float, permutation: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, float]:
    """Paste a box of ``x[permutation]`` into ``x`` (Yun et al., ICCV 2019); returns the inputs and the kept area.

    The box covers a ``1 - lam`` share of the last two dimensions, centred at random and clipped
    at the edges, so the share of each sample kept (the returned ``lam``) is exact.

    Example:
        >>> x = torch.zeros(2, 1, 4, 4); x[1] = 1
        >>> mixed, kept = cutmix(x, 0.75, torch.tensor([1, 0]), torch.Generator().manual_seed(0))
        >>> kept, mixed[0].mean().item() == 1 - kept  # the box was clipped at an edge
        (0.875, True)
    """
    if x.ndim < 3:
        raise ValueError(
            f"CutMix pastes a box across the last two dimensions of image batches (N, [C,] H, W); these inputs have "
            f"shape {tuple(x.shape)}. Use Mixup for feature vectors."
        )
    height, width = x.shape[-2:]
    ratio = math.sqrt(1 - lam)
    box_h, box_w = round(height * ratio), round(width * ratio)
    centre_y = int(torch.randint(height, (1,), generator=generator))
    centre_x = int(torch.randint(width, (1,), generator=generator))
    top, bottom = max(centre_y - box_h // 2, 0), min(centre_y + (box_h - box_h // 2), height)
    left, right = max(centre_x - box_w // 2, 0), min(centre_x + (box_w - box_w // 2), width)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[permutation][..., top:bottom, left:right]
    return mixed, 1 - (bottom - top) * (right - left) / (height * width)


def mixed_targets(target: Tensor, permutation: Tensor, lam: float, num_classes: int) -> Tensor:
    """``lam * onehot(y) + (1 - lam) * onehot(y[permutation])``: the targets that go with mixed inputs.

    Example:
        >>> mixed_targets(torch.tensor([0, 1]), torch.tensor([1, 0]), 0.75, 2).tolist()
        [[0.75, 0.25], [0.25, 0.75]]
    """
    onehot = torch.nn.functional.one_hot(target.long(), num_classes).float()
    return lam * onehot + (1 - lam) * onehot[permutation]
