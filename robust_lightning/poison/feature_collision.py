"""Feature collision (Poison Frogs): correctly labelled samples whose features sit on a target's."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import Dataset

from robust_lightning.data.fields import get_field, resolve_key
from robust_lightning.data.validation import split_dataset
from robust_lightning.poison.base import Injection, InjectionPoison, check_labels, device_of, evaluating
from robust_lightning.poison.surrogate import train_surrogate


def feature_collision(
    features: nn.Module,
    bases: Tensor,
    targets: Tensor,
    eps: float,
    beta: float = 0.25,
    steps: int = 200,
    lr: float = 0.01,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> Tensor:
    """Functional form of :class:`FeatureCollision`: one poison per base, pulled toward its target's features.

    Minimizes ``||f(x) - f(t)||^2 + beta * ||x - b||^2`` for every pair ``(b, t)`` of ``bases`` and
    ``targets`` at once (Shafahi et al. 2018, eq. 1), by Adam on the whole batch; after each step the
    poisons are projected back within ``eps`` (L-inf) of their bases and within ``bounds``.

    >>> poisons = feature_collision(nn.Flatten(), torch.zeros(2, 3), torch.ones(2, 3), eps=0.1, steps=20)
    >>> poisons
    tensor([[0.1000, 0.1000, 0.1000],
            [0.1000, 0.1000, 0.1000]])
    """
    with torch.no_grad():
        goals = features(targets)
    low, high = (bases - eps).clamp_min(bounds[0]), (bases + eps).clamp_max(bounds[1])
    poisons = bases.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([poisons], lr=lr)
    for _ in range(steps):
        loss = (features(poisons) - goals).pow(2).sum() + beta * (poisons - bases).pow(2).sum()
        # autograd.grad, not backward: the model's own .grad stays untouched.
        (poisons.grad,) = torch.autograd.grad(loss, poisons)
        optimizer.step()
        with torch.no_grad():
            poisons.copy_(poisons.clamp(low, high))
    return poisons.detach()


class FeatureCollision(InjectionPoison):
    """Add ``count`` poisons per target: base-class samples whose features collide with the target's.

    Poison Frogs (Shafahi et al. 2018). Each poison starts from a training sample of ``base_class``,
    stays within ``eps`` (L-inf) of it and keeps its correct label, while its features move onto
    those of one target, a test sample of another class. A model that trains on the poisons then
    tends to classify that target as ``base_class``. Added sample ``k`` is crafted for
    ``target_ids[k // count]``; bases are drawn without replacement.

    The features come from ``features`` (a trained extractor, on whose device the crafting runs) or,
    when it is None, from a SmallCNN the drill first trains on the clean training set for 30 epochs
    (a few seconds on the digits), on the CPU.

    Args:
        target_ids: ids of the targets in ``targets``.
        base_class: the class the targets should be taken for.
        count: poisons per target.
        targets: the samples the ids index (a test set), or a datamodule whose test split they index.
        eps: L-inf bound of each poison's change, in the inputs' units.
        beta: weight of the distance to the base in the objective.
        steps: Adam steps.
        lr: Adam's learning rate.
        features: the trained feature extractor to craft against, or None to train one.
        seed: makes the bases and the trained extractor reproducible.

    Example:
        >>> inputs, labels = torch.rand(6, 1, 4, 4), torch.tensor([0, 0, 0, 1, 1, 1])
        >>> targets = torch.utils.data.TensorDataset(torch.rand(2, 1, 4, 4), torch.tensor([1, 1]))
        >>> drill = FeatureCollision([0], base_class=0, count=2, targets=targets, features=nn.Flatten(), steps=5)
        >>> added = drill.inject(lambda ids: inputs[ids], labels, num_classes=2)
        >>> added.labels.tolist(), bool((added.inputs - inputs[added.sources]).abs().max() <= drill.eps)
        ([0, 0], True)
    """

    def __init__(
        self,
        target_ids: Sequence[int],
        base_class: int,
        count: int,
        targets: Dataset | LightningDataModule,
        eps: float = 0.25,
        beta: float = 0.25,
        steps: int = 200,
        lr: float = 0.01,
        features: nn.Module | None = None,
        seed: int = 0,
    ) -> None:
        self.target_ids, self.base_class, self.count = [int(i) for i in target_ids], int(base_class), int(count)
        self.eps, self.beta, self.steps, self.lr, self.seed = float(eps), float(beta), int(steps), float(lr), int(seed)
        self._check_settings()
        self._features = features
        self._targets, self.target_labels = self._read_targets(targets)

    def _check_settings(self) -> None:
        if not self.target_ids or len(set(self.target_ids)) != len(self.target_ids):
            raise ValueError(f"target_ids must name at least one target, each once; got {self.target_ids}.")
        for name, value in (("count", self.count), ("steps", self.steps)):
            if value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        for name, value in (("eps", self.eps), ("lr", self.lr)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0 (0 drops the pull toward the base), got {self.beta}.")

    def _read_targets(self, targets: Dataset | LightningDataModule) -> tuple[Tensor, list[int]]:
        if isinstance(targets, LightningDataModule):
            targets.setup("test")
            targets = split_dataset(targets, "test")
        size = len(targets)
        outside = [i for i in self.target_ids if not 0 <= i < size]
        if outside:
            raise ValueError(f"target_ids {outside} lie outside the {size} samples of targets.")
        samples = [targets[i] for i in self.target_ids]
        input_key, target_key = resolve_key(samples[0], None, "input"), resolve_key(samples[0], None, "target")
        labels = [int(get_field(s, target_key)) for s in samples]
        if self.base_class in labels:
            raise ValueError(
                f"target id {self.target_ids[labels.index(self.base_class)]} is already of base_class "
                f"{self.base_class}: choose targets of other classes."
            )
        return torch.stack([torch.as_tensor(get_field(s, input_key)) for s in samples]).float(), labels

    def inject(self, read_inputs: Callable[[Tensor], Tensor], labels: Tensor, num_classes: int) -> Injection:
        labels = check_labels(labels, num_classes)
        if not 0 <= self.base_class < num_classes:
            raise ValueError(f"base_class={self.base_class} is not a class in [0, {num_classes}).")
        pool = (labels == self.base_class).nonzero().flatten()
        needed = self.count * len(self.target_ids)
        if needed > len(pool):
            raise ValueError(
                f"{len(self.target_ids)} targets x count={self.count} need {needed} bases, but class "
                f"{self.base_class} has {len(pool)} training samples. Lower count or name fewer targets."
            )
        generator = torch.Generator().manual_seed(self.seed)
        sources = pool[torch.randperm(len(pool), generator=generator)[:needed]]
        inputs = read_inputs(torch.arange(len(labels)))
        features = self._features
        if features is None:
            features = train_surrogate(inputs.float(), labels, num_classes, self.seed).features
        device = device_of(features)
        bases, goals = inputs[sources].float(), self._targets.repeat_interleave(self.count, 0)
        bounds = (float(inputs.min()), float(inputs.max()))
        poisons = feature_collision(
            features, bases.to(device), goals.to(device), self.eps, self.beta, self.steps, self.lr, bounds
        )
        return Injection(sources, poisons.cpu().to(inputs.dtype), torch.full((needed,), self.base_class))

    @property
    def target_inputs(self) -> Tensor:
        """The targets' inputs, stacked in the order of ``target_ids``."""
        return self._targets

    def attack_success_rate(self, model: Callable[[Tensor], Tensor]) -> float:
        """Fraction of the targets that ``model`` classifies as ``base_class``."""
        with evaluating(model) as device:
            hits = model(self._targets.to(device)).argmax(1) == self.base_class
        return float(hits.float().mean())
