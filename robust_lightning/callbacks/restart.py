"""Save and restore a run's training state, for restarting the model in the middle of fit."""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, WeightAveraging


def training_state(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """Copies of the weights, optimizer and scheduler states, to restart from.

    Also the states of callbacks with ``restarts_with_model = True``, whose state belongs to the
    model's training (a RobustLoss's per-sample targets), so that a restarted model starts with
    them afresh, as it does when the same loss is the module's own criterion.
    """
    return copy.deepcopy(
        {
            "model": pl_module.state_dict(),
            "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
            "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
            "callbacks": {c.state_key: c.state_dict() for c in trainer.callbacks if _restarts_with_model(c)},
        }
    )


def _restarts_with_model(callback: Any) -> bool:
    return getattr(callback, "restarts_with_model", False)


def load_training_state(trainer: Trainer, pl_module: LightningModule, state: dict[str, Any]) -> None:
    pl_module.load_state_dict(state["model"])
    for optimizer, saved in zip(trainer.optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    for config, saved in zip(trainer.lr_scheduler_configs, state["schedulers"]):
        config.scheduler.load_state_dict(saved)
    saved_callbacks = state.get("callbacks", {})  # absent from checkpoints of earlier versions
    for callback in trainer.callbacks:
        if _restarts_with_model(callback) and callback.state_key in saved_callbacks:
            callback.load_state_dict(saved_callbacks[callback.state_key])


def reset_early_stopping(trainer: Trainer) -> None:
    """Let EarlyStopping judge the restarted model on its own: its best score so far belongs to the old one."""
    for callback in trainer.callbacks:
        if isinstance(callback, EarlyStopping):
            if callback.stopped_epoch:  # it stopped the old model in this very epoch
                trainer.should_stop = False
            callback.wait_count = 0
            callback.stopped_epoch = 0
            callback.best_score = torch.tensor(torch.inf if callback.monitor_op == torch.lt else -torch.inf)


def announce_restart(trainer: Trainer) -> None:
    """Tell callbacks whose state follows the model (PerClassMetrics' alerts, weight averages) that a new model starts."""
    for callback in trainer.callbacks:
        if isinstance(callback, WeightAveraging):
            _restart_average(callback, trainer.lightning_module)
        if hasattr(callback, "on_model_restart"):
            callback.on_model_restart(trainer)


def _restart_average(callback: WeightAveraging, pl_module: LightningModule) -> None:
    # An average of the old model's weights and the restarted one's belongs to neither. Until its next update
    # (an epoch away for an average updated per epoch) it holds the restarted weights, which it copies again at
    # that update, as an AveragedModel that has averaged nothing does. Lightning keeps it in a private attribute.
    average = getattr(callback, "_average_model", None)
    if average is None:
        return
    current = pl_module.state_dict()
    with torch.no_grad():
        for key, kept in average.module.state_dict().items():
            kept.copy_(current[key])
    average.n_averaged.zero_()
