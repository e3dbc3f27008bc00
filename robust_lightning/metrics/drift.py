"""Two-sample tests that tell whether current data is drawn from the distribution of a reference sample.

Written on torch and scipy rather than taken from alibi-detect, whose licence is not open source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy import stats
from torch import Tensor


@dataclass(frozen=True)
class TestResult:
    """A test statistic and its p-value (already corrected for the test's own multiple comparisons)."""

    statistic: float
    p_value: float


def _check_samples(reference: Tensor, current: Tensor) -> None:
    if reference.ndim != 2 or current.ndim != 2 or reference.shape[1] != current.shape[1]:
        raise ValueError(
            f"Drift tests compare two (samples, features) tensors with the same features, got shapes "
            f"{tuple(reference.shape)} and {tuple(current.shape)}."
        )
    if len(reference) < 2 or len(current) < 2:
        raise ValueError(f"Drift tests need at least 2 samples on each side, got {len(reference)} and {len(current)}.")
    if not (torch.isfinite(reference).all() and torch.isfinite(current).all()):
        raise ValueError("Drift tests got NaN or inf features; check the model's outputs for these inputs.")


def random_projection(features: int, dims: int, seed: int = 0) -> Tensor:
    """A fixed ``(features, dims)`` Gaussian projection, the same for the same seed on every process."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(features, dims, generator=generator) / dims**0.5


def ks_test(reference: Tensor, current: Tensor, projection: Tensor | None = None) -> TestResult:
    """Per-feature two-sample Kolmogorov-Smirnov tests, Bonferroni-corrected over the features.

    With ``projection`` the features are first projected (e.g. by :func:`random_projection`), which
    keeps the number of tests, and so the correction, small for wide embeddings.
    The statistic is the largest KS distance over the features.

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> same = ks_test(torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g))
        >>> shifted = ks_test(torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g) + 0.5)
        >>> same.p_value > 0.05, shifted.p_value < 1e-6
        (True, True)
    """
    _check_samples(reference, current)
    if projection is not None:
        reference, current = reference @ projection, current @ projection
    result = stats.ks_2samp(reference.double().numpy(), current.double().numpy(), axis=0)
    corrected = min(1.0, float(result.pvalue.min()) * reference.shape[1])
    return TestResult(float(result.statistic.max()), corrected)


def mmd_test(
    reference: Tensor, current: Tensor, permutations: int = 1000, generator: torch.Generator | None = None
) -> TestResult:
    """Maximum mean discrepancy with a Gaussian kernel, and its permutation-test p-value.

    The kernel's bandwidth is the median distance between the pooled samples (Gretton 2012's
    heuristic). The statistic is the biased estimate of MMD²; the p-value is
    ``(1 + #permutations at least as large) / (1 + permutations)``, so it is never below
    ``1 / (1 + permutations)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> same = mmd_test(torch.randn(100, 3, generator=g), torch.randn(100, 3, generator=g), generator=g)
        >>> shifted = mmd_test(torch.randn(100, 3, generator=g), torch.randn(100, 3, generator=g) + 1, generator=g)
        >>> same.p_value > 0.05, shifted.p_value
        (True, 0.000999000999000999)
    """
    _check_samples(reference, current)
    if permutations < 1:
        raise ValueError(f"permutations must be a positive integer, got {permutations!r}.")
    pooled = torch.cat([reference, current]).double()
    distances = torch.cdist(pooled, pooled).square()
    bandwidth = distances[distances > 0].median() if bool((distances > 0).any()) else torch.tensor(1.0)
    kernel = torch.exp(-distances / bandwidth)
    n, m = len(reference), len(current)
    signs = torch.cat([torch.full((n,), 1.0 / n), torch.full((m,), -1.0 / m)]).double()
    # Every permutation at once: MMD² of a split is sᵀKs for the split's signed weights s.
    shuffled = torch.stack([signs[torch.randperm(n + m, generator=generator)] for _ in range(permutations)])
    null = ((shuffled @ kernel) * shuffled).sum(1)
    observed = float(signs @ kernel @ signs)
    p_value = (1 + int((null >= observed).sum())) / (1 + permutations)
    return TestResult(observed, p_value)


def chi2_test(reference: Tensor, current: Tensor, num_classes: int) -> TestResult:
    """Pearson's chi-square test that two samples of class indices share one class distribution.

    Example:
        >>> chi2_test(torch.tensor([0, 1] * 50), torch.tensor([0] * 90 + [1] * 10), num_classes=2).p_value < 1e-6
        True
    """
    counts = torch.stack([torch.bincount(t.long(), minlength=num_classes) for t in (reference, current)])
    observed = counts[:, counts.sum(0) > 0]  # a class neither sample holds says nothing
    if observed.shape[1] < 2:
        return TestResult(0.0, 1.0)
    statistic, p_value, _, _ = stats.chi2_contingency(observed.numpy(), correction=False)
    return TestResult(float(statistic), float(p_value))


@dataclass(frozen=True)
class DriftReport:
    """The results of :func:`drift_tests`, and one verdict for all of them.

    :attr:`p_value` is the smallest p-value times the number of tests (Bonferroni), so ``alpha``
    bounds the chance that data from the reference distribution is flagged by any test.
    """

    tests: dict[str, TestResult]
    alpha: float

    @property
    def p_value(self) -> float:
        return min(1.0, min(test.p_value for test in self.tests.values()) * len(self.tests))

    @property
    def drift(self) -> bool:
        return self.p_value < self.alpha


# Per-pixel KS on wider inputs would cost more than it tells: a seeded subset of the features is tested.
MAX_INPUT_FEATURES = 4096


def drift_tests(
    reference: dict[str, Tensor],
    current: dict[str, Tensor],
    num_classes: int,
    alpha: float = 0.01,
    projection: Tensor | None = None,
    permutations: int = 1000,
    generator: torch.Generator | None = None,
) -> DriftReport:
    """Compare current data with a reference sample on inputs, embeddings, labels and predictions.

    ``reference`` and ``current`` hold ``features`` (embeddings), ``labels`` and ``logits``, and
    optionally ``inputs``. The tests:

    * ``inputs``: KS per input feature, Bonferroni-corrected (noise, blur, a stamped patch);
    * ``embedding_ks``: KS per dimension of the embeddings' random ``projection``, corrected;
    * ``embedding_mmd``: MMD on the embeddings, with a permutation test;
    * ``labels`` and ``predictions``: chi-square on the label and predicted-class distributions.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> def sample(shift):
        ...     features = torch.randn(200, 8, generator=g) + shift
        ...     return {"features": features, "labels": torch.randint(0, 3, (200,), generator=g),
        ...             "logits": features[:, :3]}
        >>> drift_tests(sample(0.0), sample(0.0), 3, generator=g).drift
        False
        >>> report = drift_tests(sample(0.0), sample(0.3), 3, generator=g)
        >>> report.drift, sorted(report.tests)
        (True, ['embedding_ks', 'embedding_mmd', 'labels', 'predictions'])
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}.")
    tests = {}
    if "inputs" in reference:
        inputs = reference["inputs"].flatten(1).float(), current["inputs"].flatten(1).float()
        if inputs[0].shape[1] > MAX_INPUT_FEATURES:
            chosen = torch.randperm(inputs[0].shape[1], generator=generator)[:MAX_INPUT_FEATURES]
            inputs = inputs[0][:, chosen], inputs[1][:, chosen]
        tests["inputs"] = ks_test(*inputs)
    tests["embedding_ks"] = ks_test(reference["features"], current["features"], projection)
    tests["embedding_mmd"] = mmd_test(reference["features"], current["features"], permutations, generator)
    tests["labels"] = chi2_test(reference["labels"], current["labels"], num_classes)
    tests["predictions"] = chi2_test(reference["logits"].argmax(1), current["logits"].argmax(1), num_classes)
    return DriftReport(tests, alpha)
