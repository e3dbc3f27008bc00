"""The robust losses against their formulas, written out independently here, and their failure modes."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch.nn.functional import one_hot

from robust_lightning.losses import (
    LOSSES,
    ELRLoss,
    ForwardCorrectionLoss,
    GCELoss,
    HardBootstrapLoss,
    NCERCELoss,
    SCELoss,
    SoftBootstrapLoss,
    TaylorCELoss,
    estimate_transition,
    generalized_cross_entropy,
    symmetric_cross_entropy,
)

K = 10
TRANSITION = torch.eye(K) * 0.6 + torch.roll(torch.eye(K), 1, dims=1) * 0.4  # 40% flipped to the next class


def elr_with_buffer(num_samples: int = 20) -> ELRLoss:
    loss = ELRLoss(num_classes=K)
    loss.resize(num_samples)
    return loss


def expected(name: str, logits: torch.Tensor, y: torch.Tensor, ema: torch.Tensor | None = None) -> torch.Tensor:
    """Each loss's per-sample value, from its paper's formula on the softmax probabilities."""
    p = logits.softmax(1)
    onehot = one_hot(y, K).to(p)
    p_y = (p * onehot).sum(1)
    rce = -(p * onehot.clamp_min(1e-4).log()).sum(1)
    if name == "gce":
        return (1 - p_y**0.7) / 0.7
    if name == "sce":
        return 0.1 * -p_y.log() + 1.0 * rce
    if name == "nce_rce":
        return (-p_y.log()) / (-p.log().sum(1)) + 1.0 * rce
    if name == "bootstrap_soft":
        return -((0.95 * onehot + 0.05 * p) * p.log()).sum(1)
    if name == "bootstrap_hard":
        z = one_hot(p.argmax(1), K).to(p)
        return -((0.8 * onehot + 0.2 * z) * p.log()).sum(1)
    if name == "taylor":
        return (1 - p_y) + (1 - p_y) ** 2 / 2
    if name == "forward":
        return -(p @ TRANSITION.to(p))[torch.arange(len(y)), y].log()
    if name == "elr":
        clamped = p.clamp(1e-4, 1 - 1e-4)
        target = 0.3 * clamped.detach() / clamped.detach().sum(1, keepdim=True)  # one update from zero targets
        return -p_y.log() + 3.0 * (1 - (target * clamped).sum(1)).log()
    raise KeyError(name)


def build(name: str, **kwargs) -> torch.nn.Module:
    if name == "forward":
        return ForwardCorrectionLoss(transition=TRANSITION, **kwargs)
    if name == "elr":
        loss = ELRLoss(num_classes=K, **kwargs)
        loss.resize(50)
        return loss
    return LOSSES[name](**kwargs)


def call(loss: torch.nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if isinstance(loss, ELRLoss):
        return loss(logits, y, ids=torch.arange(len(y)))
    return loss(logits, y)


ROBUST = [name for name in LOSSES if name != "ce"]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, K, generator=g, dtype=torch.float64) * 3, torch.randint(0, K, (16,), generator=g)


@pytest.mark.parametrize("name", ROBUST)
def test_values_and_gradients_match_the_papers_formulas(name, batch):
    logits, y = batch
    mine, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    value = call(build(name, reduction="none").double(), mine, y)
    reference = expected(name, theirs, y)
    torch.testing.assert_close(value, reference)
    (grad_mine,) = torch.autograd.grad(value.sum(), mine)
    (grad_theirs,) = torch.autograd.grad(reference.sum(), theirs)
    torch.testing.assert_close(grad_mine, grad_theirs)


@pytest.mark.parametrize("name", ROBUST)
def test_gradcheck_in_float64(name, batch):
    logits, y = batch
    loss = build(name).double()
    if isinstance(loss, ELRLoss):  # the EMA step changes the buffer at every call: check the regularized term alone
        loss.train(False)
    assert torch.autograd.gradcheck(lambda x: call(loss, x, y[:6]), logits[:6].clone().requires_grad_())


@pytest.mark.parametrize("name", ROBUST)
def test_class_weights_and_every_reduction(name, batch):
    logits, y = batch
    weight = torch.linspace(0.5, 2.0, K, dtype=torch.float64)
    terms = expected(name, logits, y) * weight[y]
    for reduction, want in [("none", terms), ("sum", terms.sum()), ("mean", terms.sum() / weight[y].sum())]:
        got = call(build(name, weight=weight, reduction=reduction).double(), logits, y)
        torch.testing.assert_close(got, want.to(got.dtype), msg=f"{name}, reduction={reduction}")


@pytest.mark.parametrize("name", ROBUST)
@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_extreme_logits_give_finite_losses_and_gradients(name, autocast):
    logits = torch.tensor([[1e4, -1e4] + [0.0] * (K - 2), [-1e4] * K, [1e4] * K, [-1e4, 1e4] + [0.0] * (K - 2)])
    logits = logits.clone().requires_grad_()
    y = torch.tensor([0, 3, 9, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = call(build(name), logits.bfloat16() if autocast else logits, y)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all(), name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: GCELoss(q=0), r"q must lie in \(0.0, 1.0\]"),
        (lambda: GCELoss(q=1.5), r"q must lie in"),
        (lambda: SCELoss(alpha=-0.1), "alpha must lie in"),
        (lambda: SCELoss(alpha=0, beta=0), "leaves no loss"),
        (lambda: NCERCELoss(beta=float("nan")), "beta must lie in"),
        (lambda: SoftBootstrapLoss(beta=1.2), "beta must lie in"),
        (lambda: HardBootstrapLoss(beta=-0.5), "beta must lie in"),
        (lambda: TaylorCELoss(order=0), "order must be a positive integer"),
        (lambda: TaylorCELoss(order=2.5), "order must be a positive integer"),
        (lambda: ELRLoss(num_classes=10, lam=-1), "lam must lie in"),
        (lambda: ELRLoss(num_classes=10, beta=1.5), "beta must lie in"),
        (lambda: ForwardCorrectionLoss(transition=torch.ones(3, 3)), "must sum to 1"),
        (lambda: ForwardCorrectionLoss(transition=torch.tensor([[1.0, 0.0], [1.0, 0.0]])), "Columns \\[1\\]"),
        (lambda: ForwardCorrectionLoss(), "a transition matrix, or num_classes"),
        (lambda: GCELoss(reduction="avg"), "reduction must be one of"),
        (lambda: GCELoss(weight=[1.0, -1.0]), "non-negative weight per class"),
    ],
)
def test_bad_hyperparameters_are_refused_with_the_allowed_range(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_functional_forms_check_like_the_classes_and_agree_with_them(batch):
    logits, y = batch
    torch.testing.assert_close(generalized_cross_entropy(logits, y, q=0.5), GCELoss(q=0.5)(logits, y))
    torch.testing.assert_close(symmetric_cross_entropy(logits, y), SCELoss()(logits, y))
    with pytest.raises(ValueError, match="q must lie in"):
        generalized_cross_entropy(logits, y, q=0.0)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (one_hot(torch.arange(4) % K, K).float(), "integer class indices"),
        (torch.tensor([0, 1, 2]), r"shape \(4,\)"),
        (torch.tensor([0, 1, 2, K]), r"Labels must lie in \[0, 9\]"),
    ],
)
def test_bad_targets_get_a_clear_error(target, message):
    with pytest.raises(ValueError, match=message):
        GCELoss()(torch.randn(4, K), target)


def test_elr_keeps_a_running_target_per_sample_and_is_plain_ce_in_eval_mode():
    loss = elr_with_buffer()
    g = torch.Generator().manual_seed(1)
    first, second = torch.randn(3, K, generator=g), torch.randn(3, K, generator=g)
    ids, y = torch.tensor([4, 9, 13]), torch.tensor([1, 2, 3])
    loss(first, y, ids=ids)
    loss(second, y, ids=ids)
    clamp = lambda z: z.softmax(1).clamp(1e-4, 1 - 1e-4) / z.softmax(1).clamp(1e-4, 1 - 1e-4).sum(1, keepdim=True)
    torch.testing.assert_close(loss.ema_targets[ids], 0.7 * 0.3 * clamp(first) + 0.3 * clamp(second))
    assert loss.ema_targets.abs().sum(1).nonzero().flatten().tolist() == [4, 9, 13]
    loss.eval()
    torch.testing.assert_close(loss(first, y), torch.nn.functional.cross_entropy(first, y))


def test_elr_without_ids_names_robust_data_module():
    with pytest.raises(RuntimeError, match="RobustDataModule"):
        ELRLoss(num_classes=K)(torch.randn(2, K), torch.tensor([0, 1]))
    with pytest.raises(IndexError, match="holds 20 samples"):
        elr_with_buffer(20)(torch.randn(1, K), torch.tensor([0]), ids=torch.tensor([20]))


def test_elr_state_dict_of_a_bound_loss_loads_into_a_fresh_one():
    loss = elr_with_buffer(30)
    loss(torch.randn(4, K), torch.tensor([0, 1, 2, 3]), ids=torch.tensor([0, 5, 6, 29]))
    fresh = ELRLoss(num_classes=K)
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.ema_targets, loss.ema_targets)


def test_anchor_points_recover_a_known_transition_matrix():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, K, (5000,), generator=g)
    # Half the samples are certain of their clean class, as a network fitted to noisy labels is of many.
    confidence = (2 * torch.rand(5000, generator=g)[:, None]).clamp(max=1)
    clean_probs = confidence * one_hot(clean, K) + (1 - confidence) / K
    noisy_probs = clean_probs @ TRANSITION  # what a model fitted to the noisy labels predicts
    torch.testing.assert_close(estimate_transition(noisy_probs), TRANSITION, atol=0.01, rtol=0)


def test_forward_correction_estimates_after_its_warm_up_and_corrects_from_then_on():
    class Source:
        batch_ids, num_train, current_epoch = torch.arange(8), 8, 0

    loss = ForwardCorrectionLoss(num_classes=K, warmup_epochs=1)
    loss.bind(Source)
    logits, y = torch.randn(8, K), torch.arange(8)
    torch.testing.assert_close(loss(logits, y), torch.nn.functional.cross_entropy(logits, y))
    Source.current_epoch = 1
    corrected = loss(logits, y)
    assert loss.estimated and not loss.needs_ids
    torch.testing.assert_close(loss.transition, estimate_transition(logits.softmax(1)))
    torch.testing.assert_close(corrected, -(logits.softmax(1) @ loss.transition).log()[torch.arange(8), y].mean())
    restored = ForwardCorrectionLoss(num_classes=K)
    restored.load_state_dict(loss.state_dict())
    assert restored.estimated and torch.equal(restored.transition, loss.transition)


def test_rce_constant_is_the_papers_clamp():
    assert math.isclose(
        SCELoss(alpha=0, beta=1)(torch.tensor([[0.0, -1e4]]), torch.tensor([1])).item(), -math.log(1e-4), rel_tol=1e-6
    )


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_loss_config_is_the_registered_class_at_its_documented_defaults(name):
    config = OmegaConf.load(Path(__file__).parents[1] / "conf" / "loss" / f"{name}.yaml")
    assert get_class(config._target_) is LOSSES[name]
    defaults = inspect.signature(LOSSES[name]).parameters
    for key in set(config) - {"_target_", "num_classes"}:  # num_classes comes from the data
        assert defaults[key].default == config[key], f"conf/loss/{name}.yaml's {key} is not the class's default"


def test_a_given_identity_transition_stays_given_after_a_reload():
    given = ForwardCorrectionLoss(transition=torch.eye(K))
    reloaded = ForwardCorrectionLoss(transition=torch.eye(K))
    reloaded.load_state_dict(given.state_dict())
    assert reloaded.estimated and not reloaded.needs_ids


def test_forward_correction_records_float64_logits_into_its_float32_buffer():
    loss = ForwardCorrectionLoss(num_classes=K)
    loss.resize(10)
    logits = torch.randn(4, K, dtype=torch.float64)
    loss(logits, torch.arange(4), ids=torch.tensor([1, 3, 5, 7]))
    torch.testing.assert_close(loss.records[[1, 3, 5, 7]], logits.softmax(1).float())


def test_forward_correction_refuses_a_transition_that_disagrees_with_num_classes():
    with pytest.raises(ValueError, match="num_classes=10 but transition is 2x2"):
        ForwardCorrectionLoss(transition=torch.eye(2), num_classes=10)
    with pytest.raises(ValueError, match="warmup_epochs must be an integer"):
        ForwardCorrectionLoss(num_classes=10, warmup_epochs=2.5)
    with pytest.raises(ValueError, match="num_classes must be an integer"):
        ELRLoss(num_classes=2.5)
    with pytest.raises(ValueError, match="weight has 3 entries for 10 classes"):
        ELRLoss(num_classes=10, weight=[1.0, 1.0, 1.0])
