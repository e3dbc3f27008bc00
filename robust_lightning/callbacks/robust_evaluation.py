"""Per-class accuracy under attack on the validation and test sets, despite Lightning's inference_mode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torchattacks
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from robust_lightning.attacks import ATTACKS, InputBounds, build_attack, perturb
from robust_lightning.attacks.factory import AttackFactory
from robust_lightning.callbacks.adversarial_training import attack_mode
from robust_lightning.callbacks.batch_seed import BatchSeed
from robust_lightning.callbacks.per_class_metrics import PerClassMetrics
from robust_lightning.data.fields import Key


class RobustEvaluation(PerClassMetrics):
    """:class:`PerClassMetrics` of the model's answers to adversarial versions of each evaluation batch.

    Logs ``{stage}/robust_{metric}/{class}`` and ``/macro`` (accuracy, precision, recall, F1;
    per-class accuracy is robust accuracy) after each validation epoch and test run, synced across
    DDP ranks, beside PerClassMetrics' clean ones. Validation and test run under
    ``torch.inference_mode()``, where no gradient can be taken: the attack runs with inference mode
    off and gradients on, on a copy of the batch, with the model in eval mode.

    Args:
        num_classes: number of classes.
        attack: ``"pgd"`` (L-inf, ``steps`` iterations of eps/4 with a random start), another name
            of :data:`~robust_lightning.attacks.ATTACKS`, ``"autoattack"`` (torchattacks' standard
            L-inf AutoAttack, slow), or a factory. Random starts are drawn per batch as in
            :class:`AdversarialTraining`; the global RNG is left as it was.
        eps: the attack's budget, as for :class:`AdversarialTraining`.
        steps: the attack's iterations.
        bounds: where valid inputs live, as for :class:`AdversarialTraining`.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.models import SmallCNN
        >>> robust = RobustEvaluation(num_classes=10, eps=0.1, steps=5)
        >>> trainer = Trainer(callbacks=[robust], logger=False, enable_progress_bar=False, enable_model_summary=False)
        >>> _ = trainer.test(SmallCNN(), datamodule=DigitsDataModule(), verbose=False)
        >>> 0 <= float(trainer.callback_metrics["test/robust_accuracy/macro"]) <= 1
        True
    """

    prefix = "robust_"

    def __init__(
        self,
        num_classes: int,
        attack: str | AttackFactory = "pgd",
        eps: float = 0.1,
        steps: int = 20,
        bounds: InputBounds | None = None,
        class_names: Sequence[str] | None = None,
        input_key: Key | None = None,
        target_key: Key | None = None,
    ) -> None:
        super().__init__(num_classes, class_names, input_key, target_key)
        if not callable(attack) and attack not in (*ATTACKS, "autoattack"):
            raise ValueError(f"Unknown attack {attack!r}: use one of {sorted(ATTACKS) + ['autoattack']} or a factory.")
        if not eps > 0 or isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"eps must be positive and steps a positive integer, got eps={eps!r}, steps={steps!r}.")
        if bounds is not None and not isinstance(bounds, InputBounds):
            raise TypeError(f"bounds must be an InputBounds, got {type(bounds).__name__}.")
        self.attack, self.eps, self.steps, self.bounds = attack, eps, steps, bounds or InputBounds()
        self._seeds = BatchSeed("robust evaluation")  # random starts that a resumed run repeats

    @property
    def state_key(self) -> str:
        name = self.attack if isinstance(self.attack, str) else getattr(self.attack, "__name__", "factory")
        return self._generate_state_key(num_classes=self.num_classes, attack=name, eps=self.eps)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._seeds.setup(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seeds": self._seeds.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "seeds" in state_dict:  # absent from checkpoints of earlier versions
            self._seeds.load_state_dict(state_dict["seeds"])

    def _logits(
        self, trainer: Trainer, pl_module: LightningModule, x: Tensor, y: Tensor, position: tuple[int, ...]
    ) -> Tensor:
        bounds = self.bounds.to(x.device)
        bounds.check(x, "This evaluation batch's inputs")
        attack = build_attack(self._factory(), pl_module, bounds, self.eps, self.steps)
        # Outside fit the trainer's epoch counter says nothing about the weights: the same ones get the same draws.
        epoch = trainer.current_epoch if trainer.state.fn == TrainerFn.FITTING else 0
        seeded = self._seeds.fork(x.device, trainer.global_rank, epoch, *position)
        # Inference tensors cannot be differentiated: clone them with inference mode off.
        with torch.inference_mode(False), torch.enable_grad(), attack_mode(pl_module), seeded:
            x, y = x.clone(), torch.as_tensor(y, device=x.device).clone()
            with trainer.precision_plugin.forward_context():
                adversarial = perturb(attack, bounds, x, y)
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                return pl_module(adversarial)

    def _factory(self) -> str | AttackFactory:
        if self.attack == "autoattack":
            return lambda model, eps: torchattacks.AutoAttack(model, norm="Linf", eps=eps, n_classes=self.num_classes)
        return self.attack
