"""The model a clean-label drill crafts against when the user gives none: SmallCNN trained on the clean inputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from robust_lightning.models import SmallCNN


def train_surrogate(inputs: Tensor, labels: Tensor, num_classes: int, seed: int, epochs: int = 30) -> SmallCNN:
    """SmallCNN trained by plain Adam (lr 3e-3, batch 64) on ``inputs`` of shape ``(N, C, H, W)``, in eval mode.

    It stands for the attacker's own model: the same architecture as the victim's default, trained
    on the same clean data from another initialization, so crafted samples have to transfer.
    """
    if inputs.ndim != 4:
        raise ValueError(
            f"The drill trains a SmallCNN to craft against, which needs (N, C, H, W) images; these inputs have "
            f"shape {tuple(inputs.shape)}. Pass your own trained model instead (model=... or features=...)."
        )
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(num_classes=num_classes, in_channels=inputs.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(64):
            optimizer.zero_grad()
            loss(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval().requires_grad_(False)
