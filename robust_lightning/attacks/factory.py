"""torchattacks attacks by name, built on a model seen from the unit box of its inputs."""

from __future__ import annotations

from collections.abc import Callable

import torchattacks
from torch import Tensor, nn

from robust_lightning.attacks.bounds import InputBounds, UnitBoxModel

AttackFactory = Callable[[nn.Module, float], torchattacks.attack.Attack]

# name -> (model, eps, steps, alpha) -> attack; alpha None takes each method's usual step.
ATTACKS: dict[str, Callable[..., torchattacks.attack.Attack]] = {
    "fgsm": lambda model, eps, steps, alpha: torchattacks.FGSM(model, eps=eps),
    # Wong et al. 2020, "fast is better than free": a random start, then one step of 1.25 eps.
    "fgsm_rs": lambda model, eps, steps, alpha: torchattacks.FFGSM(model, eps=eps, alpha=alpha or 1.25 * eps),
    # Madry et al. 2018; step eps/4 as in the design notes' PGD-7 reference.
    "pgd": lambda model, eps, steps, alpha: torchattacks.PGD(model, eps=eps, alpha=alpha or eps / 4, steps=steps),
    "pgd_l2": lambda model, eps, steps, alpha: torchattacks.PGDL2(model, eps=eps, alpha=alpha or eps / 4, steps=steps),
    # TRADES' inner maximization (Zhang et al. 2019): PGD on the KL divergence from the clean prediction.
    "trades": lambda model, eps, steps, alpha: torchattacks.TPGD(model, eps=eps, alpha=alpha or eps / 4, steps=steps),
}


def perturb(attack: torchattacks.attack.Attack, bounds: InputBounds, x: Tensor, y: Tensor) -> Tensor:
    """Adversarial versions of ``x`` (in the data's own range) against labels ``y``."""
    if isinstance(attack, torchattacks.PGDL2) and x.ndim != 4:
        raise ValueError(
            f"pgd_l2 (torchattacks' PGDL2) attacks 4-D image batches only, and these inputs have shape "
            f"{tuple(x.shape)}. Use attack='pgd' (L-inf) for other inputs."
        )
    if bounds.is_unit:
        return attack(x.detach(), y).to(x.dtype)
    # In the inputs' dtype (bf16-true trains a bf16 model), though the bounds are float32.
    return bounds.from_unit(attack(bounds.to_unit(x).to(x.dtype).detach(), y)).to(x.dtype)


def build_attack(
    attack: str | AttackFactory,
    model: nn.Module,
    bounds: InputBounds,
    eps: float,
    steps: int = 7,
    alpha: float | None = None,
) -> torchattacks.attack.Attack:
    """The attack on ``model`` through :class:`UnitBoxModel`, on the model's device.

    ``attack`` is a name from :data:`ATTACKS` or ``factory(unit_box_model, eps) -> Attack``
    for any other torchattacks attack (e.g. ``lambda m, eps: torchattacks.APGD(m, eps=eps)``).
    Built at each use, so that it follows the model's device (torchattacks fixes it at construction).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> attack = build_attack("pgd", model, InputBounds(), eps=0.1, steps=3)
        >>> x, y = torch.rand(5, 4), torch.randint(0, 2, (5,))
        >>> bool((attack(x, y) - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    unit_model = model if bounds.is_unit else UnitBoxModel(model, bounds)  # skip an identity map per forward
    if callable(attack):
        return attack(unit_model, eps)
    return ATTACKS[attack](unit_model, eps, steps, alpha)
