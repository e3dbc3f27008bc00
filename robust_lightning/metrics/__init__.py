"""Statistics over what a model sees: two-sample drift tests on embeddings and predictions."""

from robust_lightning.metrics.drift import (
    DriftReport,
    TestResult,
    chi2_test,
    drift_tests,
    ks_test,
    mmd_test,
    random_projection,
)

__all__ = ["DriftReport", "TestResult", "chi2_test", "drift_tests", "ks_test", "mmd_test", "random_projection"]
