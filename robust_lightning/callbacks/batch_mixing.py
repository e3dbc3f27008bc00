"""What Mixup and CutMix share: mix each training batch's inputs in place, and its loss through the criterion swap."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from robust_lightning.augment import mixed_targets
from robust_lightning.callbacks.adversarial_training import AdversarialTraining, attack_mode
from robust_lightning.callbacks.batch_seed import BatchSeed, SeededCallback
from robust_lightning.callbacks.criterion_swap import Compute, CriterionSwap
from robust_lightning.data.fields import Key, check_float_inputs, check_owns_storage, get_field, resolve_key
from robust_lightning.losses.sample_state import Mixing, PerSampleLoss


class BatchMixing(SeededCallback):
    """Base of :class:`~robust_lightning.callbacks.Mixup` and :class:`~robust_lightning.callbacks.CutMix`.

    At each training batch it draws ``lam ~ Beta(alpha, alpha)`` and a permutation of the batch,
    writes the mixed inputs into the batch in place (tuple, list and dict batches alike), and mixes
    the loss through the module's ``self.criterion`` by one rule:

    * a loss that takes class probabilities as targets (torch's ``CrossEntropyLoss`` without class
      weights, label smoothing included) gets one call with ``lam * onehot(y) + (1 - lam) * onehot(y[perm])``;
    * any other loss (the robust losses of :mod:`robust_lightning.losses`, a weighted CE) gets the
      two-term form ``lam * L(logits, y) + (1 - lam) * L(logits, y[perm])``. ELR is handled as in
      its paper's ELR+: its per-sample targets follow the model's predictions on the unmixed batch
      (one extra forward without gradients, in eval mode), once per step, and each mixed sample is
      held to the same mix of its two samples' targets.

    With :class:`~robust_lightning.callbacks.AdversarialTraining` the attack comes first and the
    mixing second: list AdversarialTraining before the mixing callback (the other order is
    refused), so that each sample is attacked with its own label and the adversarial samples are
    then mixed. TRADES, whose term compares clean and adversarial predictions of the same samples,
    is refused.

    The draws depend only on the run's seed and the batch's place (see
    :class:`~robust_lightning.callbacks.batch_seed.BatchSeed`), so a resumed run mixes each batch as
    the uninterrupted run would.
    """

    def __init__(
        self, alpha: float = 1.0, attr: str = "criterion", input_key: Key | None = None, target_key: Key | None = None
    ) -> None:
        if not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(
                f"alpha (of the Beta(alpha, alpha) mixing weights) must be a positive number, got {alpha!r}."
            )
        self.alpha, self.attr, self.input_key, self.target_key = float(alpha), attr, input_key, target_key
        self._swap: CriterionSwap | None = None
        self._mix: tuple[float, Tensor] | None = None
        self._seeds = BatchSeed("mixing")

    def mix(self, x: Tensor, lam: float, permutation: Tensor) -> tuple[Tensor, float]:
        """The mixed inputs and the share of each sample's own input in them."""
        raise NotImplementedError

    @property
    def state_key(self) -> str:
        return self._generate_state_key(alpha=self.alpha, attr=self.attr)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_company(trainer)
        self._seeds.setup(trainer)
        self._swap = CriterionSwap.of(pl_module, self.attr, by=type(self).__name__)

    def _check_company(self, trainer: Trainer) -> None:
        name = type(self).__name__
        position = trainer.callbacks.index(self)
        for index, callback in enumerate(trainer.callbacks):
            if isinstance(callback, BatchMixing) and callback is not self:
                raise ValueError(f"{name} and {type(callback).__name__} would both mix the batch: keep one of them.")
            if isinstance(callback, AdversarialTraining) and callback.trades:
                raise ValueError(
                    f"{name} cannot go with TRADES, whose term compares the clean and adversarial predictions of the "
                    "same samples. Use attack='pgd' or 'fgsm_rs' with mixing."
                )
            if isinstance(callback, AdversarialTraining) and index > position:
                raise ValueError(
                    f"AdversarialTraining comes after {name} in callbacks, so it would attack mixed inputs with one "
                    f"label. List AdversarialTraining before {name}: the attack comes first, then the mixing."
                )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap.add(self._mixed_loss)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._swap is not None:
            if isinstance(self._swap.active, PerSampleLoss):
                self._swap.active.mixing = None
            self._swap.remove(self._mixed_loss)
        self._mix = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        x = get_field(batch, resolve_key(batch, self.input_key, "input"))
        check_float_inputs(x, type(self).__name__)
        check_owns_storage(x, "mixed inputs")
        with self._seeds.fork_for(trainer, batch_idx, x.device):
            lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
            permutation = torch.randperm(len(x), device=x.device)
            mixed, lam = self.mix(x, lam, permutation)
        self._tell_per_sample_loss(trainer, pl_module, x, lam, permutation)
        x.copy_(mixed)  # in place: Lightning hands training_step this very batch
        self._mix = (lam, permutation)

    def _tell_per_sample_loss(
        self, trainer: Trainer, pl_module: LightningModule, x: Tensor, lam: float, permutation: Tensor
    ) -> None:
        loss = self._swap.active
        if not isinstance(loss, PerSampleLoss):
            return
        clean_logits = None
        if loss.uses_clean_logits:
            with torch.no_grad(), attack_mode(pl_module), trainer.precision_plugin.forward_context():
                clean_logits = pl_module(x).detach()
        loss.mixing = Mixing(lam, permutation, clean_logits)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._mix = None
        if isinstance(self._swap.active, PerSampleLoss):
            self._swap.active.mixing = None

    def _mixed_loss(
        self, compute: Compute, reduction: str, input: Tensor, target: Tensor, *args: Any, **kwargs: Any
    ) -> Tensor:
        if self._mix is None or len(target) != len(self._mix[1]):
            return compute(reduction, input, target, *args, **kwargs)  # not this step's batch
        lam, permutation = self._mix
        permutation = permutation.to(target.device)
        if target.is_floating_point():  # class probabilities from the dataset: mixed like the inputs
            return compute(reduction, input, lam * target + (1 - lam) * target[permutation], *args, **kwargs)
        loss = self._swap.active
        if type(loss) is nn.CrossEntropyLoss and loss.weight is None and not (target == loss.ignore_index).any():
            soft = mixed_targets(target, permutation, lam, input.shape[1]).to(input.dtype)
            return compute(reduction, input, soft, *args, **kwargs)
        first = compute(reduction, input, target, *args, **kwargs)
        return lam * first + (1 - lam) * compute(reduction, input, target[permutation], *args, **kwargs)
