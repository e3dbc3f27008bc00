"""Label-consistent backdoor: target-class samples made hard to learn, then triggered; labels stay correct."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from robust_lightning.attacks.bounds import InputBounds
from robust_lightning.attacks.factory import build_attack, perturb
from robust_lightning.poison.backdoor import BackdoorTrigger
from robust_lightning.poison.base import Injection, InjectionPoison, check_labels, count_for, device_of
from robust_lightning.poison.surrogate import train_surrogate

BADNETS_TRIGGER = {"size": 2, "location": "bottom_right", "value": 1.0}


def hard_to_learn(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, bounds: tuple[float, float]
) -> Tensor:
    """PGD (L-inf, step ``2.5 * eps / steps``) away from the true labels ``y``, so the samples look mislabelled.

    Turner et al. 2019, section 4.2. Runs on ``model``'s device; the random start draws from the
    global generator (seed it, or fork it, for reproducible samples).

    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    >>> x = torch.rand(3, 4)
    >>> bool((hard_to_learn(model, x, torch.tensor([0, 1, 0]), 0.1, 5, (0.0, 1.0)) - x).abs().max() <= 0.1 + 1e-6)
    True
    """
    bounds_ = InputBounds(*bounds)
    attack = build_attack("pgd", model, bounds_, eps, steps, alpha=2.5 * eps / steps)
    device = device_of(model)
    return perturb(attack, bounds_.to(device), x.to(device), y.to(device)).cpu()


class LabelConsistentBackdoor(InjectionPoison):
    """Add triggered, adversarially perturbed copies of ``round(rate * n_target)`` samples of ``target``.

    Turner et al. 2019. Each copy keeps its correct label ``target``: PGD within ``eps`` (L-inf)
    first makes it look like another class to a trained model, so the victim cannot fit it from
    its content, then the trigger is stamped on. The trigger becomes the easiest feature that
    explains the label, and at test time it turns inputs of other classes into ``target``.
    :meth:`attack_success_rate` measures that on the triggered non-target samples of a test set.

    The PGD runs against ``model`` (a trained classifier, on whose device the crafting runs) or,
    when it is None, against a SmallCNN the drill first trains on the clean training set for 30
    epochs (a few seconds on the digits), on the CPU.

    Args:
        target: the class the trigger should turn inputs into; the poisons are of this class.
        rate: fraction of class ``target``'s training samples copied into poisons, in (0, 1].
        eps: L-inf bound of the adversarial change, in the inputs' units.
        trigger: :func:`~robust_lightning.poison.stamp_trigger`'s settings (``size``, ``location``,
            ``value``); by default BadNets' 2x2 patch of 1.0 in the bottom-right corner.
        steps: PGD steps.
        model: the trained classifier to craft against, or None to train one.
        seed: makes the choice of samples, the PGD start and the trained model reproducible.

    Example:
        >>> inputs, labels = torch.rand(6, 1, 4, 4), torch.tensor([0, 0, 0, 1, 1, 1])
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
        >>> drill = LabelConsistentBackdoor(target=1, rate=0.7, eps=0.1, model=model)
        >>> added = drill.inject(lambda ids: inputs[ids], labels, num_classes=2)
        >>> added.labels.tolist(), added.inputs[:, 0, -1, -1].tolist()
        ([1, 1], [1.0, 1.0])
    """

    def __init__(
        self,
        target: int,
        rate: float,
        eps: float = 0.3,
        trigger: Mapping[str, Any] | None = None,
        steps: int = 10,
        model: nn.Module | None = None,
        seed: int = 0,
    ) -> None:
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 < rate <= 1.0:
            raise ValueError(f"rate (of the target class to poison) must lie in (0, 1], got {rate!r}.")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}.")
        if int(steps) < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}.")
        self.target, self.rate, self.eps, self.steps, self.seed = (
            int(target),
            float(rate),
            float(eps),
            int(steps),
            int(seed),
        )
        self.trigger = dict(BADNETS_TRIGGER if trigger is None else trigger)
        # BackdoorTrigger validates the trigger, stamps it and measures the attack; its rate is unused.
        self._stamp = BackdoorTrigger(self.target, 0.0, **self.trigger)
        self._model = model

    def inject(self, read_inputs: Callable[[Tensor], Tensor], labels: Tensor, num_classes: int) -> Injection:
        labels = check_labels(labels, num_classes)
        if not 0 <= self.target < num_classes:
            raise ValueError(f"target={self.target} is not a class in [0, {num_classes}).")
        pool = (labels == self.target).nonzero().flatten()
        count = count_for(self.rate, len(pool))
        if count == 0:
            raise ValueError(f"rate={self.rate} of the {len(pool)} samples of class {self.target} is no sample.")
        generator = torch.Generator().manual_seed(self.seed)
        sources = pool[torch.randperm(len(pool), generator=generator)[:count]]
        inputs = read_inputs(torch.arange(len(labels)))
        model = (
            self._model if self._model is not None else train_surrogate(inputs.float(), labels, num_classes, self.seed)
        )
        bounds, device = (float(inputs.min()), float(inputs.max())), device_of(model)
        # The PGD's random start draws from the global generator: seeded here, and left as it was.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            hard = hard_to_learn(model, inputs[sources].float(), labels[sources], self.eps, self.steps, bounds)
        # vmap stamps each sample as one input: stamp_trigger would read a batch of vectors as one image.
        poisons = torch.func.vmap(self._stamp.poison_input)(hard)
        return Injection(sources, poisons.to(inputs.dtype), torch.full((count,), self.target))

    def triggered(self, dataset: Dataset) -> Dataset:
        """The samples of ``dataset`` not of class ``target``, with the trigger, under their true labels."""
        return self._stamp.triggered(dataset)

    def attack_success_rate(self, model: Callable[[Tensor], Tensor], dataset: Dataset) -> float:
        """Fraction of the triggered non-target samples of ``dataset`` that ``model`` classifies as ``target``."""
        return self._stamp.attack_success_rate(model, dataset)
