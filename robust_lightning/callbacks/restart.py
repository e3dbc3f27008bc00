"""Save and restore a run's training state, for restarting the model, or its classifier head, in the middle of fit."""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, WeightAveraging

from robust_lightning.callbacks.embedding import LOSSES, classifier_head


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
            "callbacks": _callback_states(trainer),
        }
    )


def head_state(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
    """Copies of the classifier head's weights (:func:`~robust_lightning.callbacks.embedding.classifier_head`),
    of the module's losses' state (ELR's targets) and of the callback states :func:`training_state`
    keeps, to restart the head from: what follows the model's answers restarts with the head."""
    restarting = {id(layer) for layer in classifier_head(pl_module)}
    restarting |= {id(module) for module in pl_module.modules() if isinstance(module, LOSSES)}
    names = {name for name, module in pl_module.named_modules() if id(module) in restarting}
    weights = {key: value for key, value in pl_module.state_dict().items() if _owner(key, names)}
    return copy.deepcopy({"head": weights, "callbacks": _callback_states(trainer)})


def _owner(key: str, names: set[str]) -> bool:
    """Whether a state_dict key belongs to one of the modules ``names`` (or to a submodule of one)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in names for i in range(1, len(parts)))


def _callback_states(trainer: Trainer) -> dict[str, Any]:
    return {c.state_key: c.state_dict() for c in trainer.callbacks if _restarts_with_model(c)}


def _restarts_with_model(callback: Any) -> bool:
    return getattr(callback, "restarts_with_model", False)


def restart_kind(state: dict[str, Any]) -> str:
    """Which restart a saved state is for: "head" (:func:`head_state`) or "model" (:func:`training_state`)."""
    return "head" if "head" in state else "model"


def load_training_state(trainer: Trainer, pl_module: LightningModule, state: dict[str, Any]) -> None:
    """Go back to a state of :func:`training_state` or :func:`head_state`."""
    if restart_kind(state) == "head":
        _load_head(trainer, pl_module, state["head"])
    else:
        pl_module.load_state_dict(state["model"])
        for optimizer, saved in zip(trainer.optimizers, state["optimizers"]):
            optimizer.load_state_dict(saved)
        for config, saved in zip(trainer.lr_scheduler_configs, state["schedulers"]):
            config.scheduler.load_state_dict(saved)
    saved_callbacks = state.get("callbacks", {})  # absent from checkpoints of earlier versions
    for callback in trainer.callbacks:
        if _restarts_with_model(callback) and callback.state_key in saved_callbacks:
            callback.load_state_dict(saved_callbacks[callback.state_key])


def _load_head(trainer: Trainer, pl_module: LightningModule, weights: dict[str, torch.Tensor]) -> None:
    """The head's saved weights back, and every optimizer's running state (Adam's moments) forgotten: the
    moments carry what the suspects taught the feature layers too, and on the digits forgetting them
    is what keeps a backdoor out on every seed. The learning rates and the schedules go on."""
    unexpected = pl_module.load_state_dict(weights, strict=False).unexpected_keys  # the others are left out on purpose
    if unexpected:
        raise RuntimeError(f"The saved classifier head does not fit this model (keys {unexpected}); this is a bug.")
    for optimizer in trainer.optimizers:
        optimizer.state.clear()


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
