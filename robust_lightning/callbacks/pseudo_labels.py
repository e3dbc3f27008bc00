"""Train on the inputs of excluded samples, labelled by the model's own confident predictions (FixMatch)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from robust_lightning.augment import random_shift
from robust_lightning.callbacks.batch_seed import BatchSeed, SeededCallback
from robust_lightning.callbacks.criterion_swap import Compute, CriterionSwap
from robust_lightning.callbacks.embedding import as_training_batch, side_forward
from robust_lightning.data import RobustDataModule
from robust_lightning.data.fields import Key, check_float_inputs, get_field, resolve_key


class PseudoLabels(SeededCallback):
    """Learn from the samples a filter excluded, through their inputs alone: FixMatch (Sohn et al., NeurIPS 2020).

    An excluded sample's label is not trusted, but its input is a real sample of some class.
    Each epoch goes once through :class:`~robust_lightning.data.RobustDataModule`'s excluded ids,
    in a random order, in batches of ``batch_size`` spread evenly over the epoch's training steps
    (a step takes several at once when there are more batches than steps; under DDP the ranks
    share the pass): the excluded samples are trained on as often as the
    others, through their inputs alone, at about the cost of training on them. A step that gets
    such a batch adds, through the module's ``self.criterion``,
    ``weight * mean(1[max p(x) >= threshold] * CE(f(augment(x)), argmax p(x)))``: the model's
    prediction on the input, where it is confident, becomes the target of the same input
    augmented (FixMatch's consistency term, its defaults ``threshold=0.95`` and weight 1). The
    pseudo-label comes from the same step's weights, without gradients. (FixMatch draws a fixed
    multiple of the labelled batch every step; one pass per epoch is what keeps the cost of an
    exclusion filter with pseudo-labels near that of training on everything.)

    Against poisoning this completes an exclusion filter
    (:class:`~robust_lightning.callbacks.PoisonFilter`): flipped samples are trained toward their
    true class instead of lost, and a triggered input toward the class of its digit, which
    unlearns the trigger. The excluded samples still never contribute their given labels.
    Before anything is excluded it does nothing. PoisonFilter's reclassification then judges held-out
    samples by a model trained toward its own confident answers on them: a clean sample it gets
    confidently wrong stays out (measured in docs/pages/filtering.md).

    For ``reduction="none"`` the term is added to every element, so that the mean of the result
    is the loss's mean plus the term; ``"sum"`` adds it times the batch size, keeping its weight
    relative to a per-sample mean.

    Args:
        threshold: the confidence a prediction needs to become a target, in (0, 1].
        weight: the term's weight against the module's loss.
        batch_size: excluded samples per batch of the term; default, the size of the first training batch.
        augment: ``augment(x) -> x``, what the student sees; :func:`~robust_lightning.augment.random_shift`
            (up to one pixel) by default, which needs image batches. ``None`` trains on the inputs as they are.
        attr: the module's loss attribute.
        input_key: where the inputs are in a batch; found by convention by default.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from robust_lightning import RobustDataModule
        >>> from robust_lightning.callbacks import PoisonFilter
        >>> from robust_lightning.data import DigitsDataModule
        >>> from robust_lightning.models import SmallCNN
        >>> import tempfile
        >>> filter_ = PoisonFilter(start_epoch=1, every_n_epochs=0, dirpath=tempfile.mkdtemp())
        >>> trainer = Trainer(max_epochs=2, callbacks=[filter_, PseudoLabels()], logger=False,
        ...                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> data = RobustDataModule(DigitsDataModule())
        >>> trainer.fit(SmallCNN(), datamodule=data)
        >>> bool(data.excluded.any())  # the restarted model trained on these inputs, without their labels
        True
    """

    def __init__(
        self,
        threshold: float = 0.95,
        weight: float = 1.0,
        batch_size: int | None = None,
        augment: Callable[[Tensor], Tensor] | None = random_shift,
        attr: str = "criterion",
        input_key: Key | None = None,
    ) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < threshold <= 1:
            raise ValueError(f"threshold (the confidence a pseudo-label needs) must lie in (0, 1], got {threshold!r}.")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight must be a positive finite number, got {weight!r}.")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1
        ):
            raise ValueError(
                f"batch_size must be an integer >= 1 or None (the training batch's size), got {batch_size!r}."
            )
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a function of the inputs or None, got {type(augment).__name__}.")
        self.threshold, self.weight = float(threshold), float(weight)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.augment, self.attr, self.input_key = augment, attr, input_key
        self._swap: CriterionSwap | None = None
        self._data: RobustDataModule | None = None
        self._module: LightningModule | None = None
        self._pending: tuple[Tensor, Tensor] | None = None
        self._plan: tuple[int, dict[int, Tensor]] | None = None  # (epoch, ids of each step that gets a batch)
        self._chunk: int | None = None
        self._inputs_checked = False
        self._seeds = BatchSeed(f"pseudo_labels/{attr}")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attr=self.attr)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._data = RobustDataModule.from_trainer(trainer, by="PseudoLabels")
        self._swap = CriterionSwap.of(pl_module, self.attr, by="PseudoLabels")
        self._module = pl_module
        self._seeds.setup(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap.add(self._term, outermost=True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._swap is not None:
            self._swap.remove(self._term)
        self._pending = self._plan = self._chunk = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._pending = None
        inputs = get_field(batch, resolve_key(batch, self.input_key, "input"))
        if not self._inputs_checked:
            self._check_inputs(trainer, batch_idx, inputs)
        self._chunk = self._chunk or self.batch_size or len(inputs)
        if self._plan is None or self._plan[0] != trainer.current_epoch:
            self._plan = (trainer.current_epoch, self._epoch_plan(trainer))
        ids = self._plan[1].get(batch_idx)
        if ids is None:
            return
        with self._seeds.fork_for(trainer, batch_idx, inputs.device):
            excluded = as_training_batch(trainer, self._data.training_batch(ids))
            weak = get_field(excluded, resolve_key(excluded, self.input_key, "input"))
            self._pending = (weak, weak if self.augment is None else self.augment(weak))

    def _epoch_plan(self, trainer: Trainer) -> dict[int, Tensor]:
        """This rank's share of one pass over the excluded ids, in batches, keyed by the step that takes each."""
        pool, steps = self._data.excluded_ids, trainer.num_training_batches
        if not len(pool) or not 0 < steps < math.inf:
            return {}
        with self._seeds.fork(torch.device("cpu"), trainer.current_epoch):  # the same order on every rank
            order = pool[torch.randperm(len(pool))]
        return spread_pass(order, trainer.global_rank, trainer.world_size, self._chunk, steps)

    def state_dict(self) -> dict[str, Any]:
        # The batch size taken from the first batch, so that a run resumed mid-epoch plans as the first did.
        return {**super().state_dict(), **({"chunk": self._chunk} if self._chunk else {})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._chunk = state_dict.get("chunk", self._chunk)

    def _check_inputs(self, trainer: Trainer, batch_idx: int, inputs: Any) -> None:
        """Fail at the first batch, not epochs later when the filter first excludes something."""
        check_float_inputs(inputs, "PseudoLabels")
        if self.augment is not None:
            try:
                with self._seeds.fork_for(trainer, batch_idx, inputs.device):  # the global RNG stays untouched
                    self.augment(inputs[:1])
            except (ValueError, TypeError) as error:
                raise type(error)(
                    f"PseudoLabels cannot augment these inputs: {error} PseudoLabels(augment=None) trains on them "
                    "as they are; from the command line, filter=exclude_only runs the filter without pseudo-labels."
                ) from error
        self._inputs_checked = True

    def _term(self, compute: Compute, reduction: str, input: Tensor, target: Tensor, *args, **kwargs) -> Tensor:
        loss = compute(reduction, input, target, *args, **kwargs)
        pending, self._pending = self._pending, None  # once per training step
        if pending is None or not self._module.training:
            return loss
        term = self.weight * self.consistency(*pending)
        return loss + (term * len(input) if reduction == "sum" else term)

    def consistency(self, weak: Tensor, strong: Tensor) -> Tensor:
        """FixMatch's unlabelled term: cross-entropy of ``strong``'s logits to the confident predictions on ``weak``."""
        with side_forward():
            with torch.no_grad():
                confidence, guess = _logits(self._module, weak).softmax(1).max(1)
            terms = nn.functional.cross_entropy(_logits(self._module, strong), guess, reduction="none")
        return (terms * (confidence >= self.threshold)).mean()


def _logits(module: LightningModule, x: Tensor) -> Tensor:
    logits = module(x)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise TypeError(
            f"PseudoLabels reads class logits from {type(module).__name__}.forward(x), a 2-D tensor (batch, classes); "
            "it returned something else. Return the logits from forward (and compute anything else in training_step)."
        )
    return logits.float()


def spread_pass(order: Tensor, rank: int, world_size: int, batch_size: int, steps: int) -> dict[int, Tensor]:
    """Rank ``rank``'s share of ``order`` in batches of ``batch_size``, keyed by the step (of ``steps``) that takes each.

    The order is wrapped round to a multiple of the ranks, as DistributedSampler pads, so that every
    rank takes as many batches: a collective in the extra forward (SyncBatchNorm) must not wait for
    a rank that has none. With more batches than steps, a step takes several, joined.

    >>> plan = spread_pass(torch.arange(5), rank=1, world_size=2, batch_size=2, steps=4)
    >>> {step: ids.tolist() for step, ids in plan.items()}
    {0: [1, 3], 2: [0]}
    """
    share = math.ceil(len(order) / world_size)
    order = order.repeat(math.ceil(share * world_size / len(order)))[: share * world_size]
    batches = order[rank::world_size].split(batch_size)
    plan: dict[int, list[Tensor]] = {}
    for index, batch in enumerate(batches):
        plan.setdefault(index * steps // len(batches), []).append(batch)
    return {step: torch.cat(parts) for step, parts in plan.items()}
