"""Translate each image of a batch by its own random offset: the augmentation of FixMatch's student."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional


def random_shift(x: Tensor, pixels: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by up to ``pixels`` in each direction, its own offset per sample, edges replicated.

    Hand-written because torchvision's transforms draw one crop per call: per-sample offsets on a
    batch would need a Python loop over its samples. Here one padded gather shifts them all.

    Example:
        >>> x = torch.arange(9.0).view(1, 1, 3, 3)
        >>> torch.equal(random_shift(x, pixels=0), x)
        True
        >>> dots = torch.zeros(4, 1, 5, 5); dots[:, :, 2, 2] = 1
        >>> shifted = random_shift(dots, generator=torch.Generator().manual_seed(0))
        >>> (shifted[:, 0] == 1).nonzero()[:, 1:].tolist()  # where each sample's dot went
        [[1, 2], [3, 3], [1, 2], [3, 2]]
    """
    if x.ndim < 3 or not x.is_floating_point():
        raise ValueError(
            f"random_shift moves float image batches (N, [C,] H, W) across their last two dimensions; these inputs "
            f"have shape {tuple(x.shape)} and dtype {x.dtype}. Pass another augmentation for other inputs."
        )
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels < 0:
        raise ValueError(f"pixels must be an integer >= 0, got {pixels!r}.")
    if pixels == 0:
        return x.clone()
    images = x.reshape(len(x), -1, *x.shape[-2:])  # (N, C, H, W) from (N, H, W) or (N, C, H, W); shifts H and W
    n, _, height, width = images.shape
    padded = functional.pad(images, (pixels,) * 4, mode="replicate")
    device = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator, device=device).to(x.device)
    rows = (torch.arange(height, device=x.device) + offsets[0, :, None])[:, None, :, None]
    cols = (torch.arange(width, device=x.device) + offsets[1, :, None])[:, None, None, :]
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(images.shape[1], device=x.device)[None, :, None, None]
    return padded[samples, channels, rows, cols].reshape(x.shape)
