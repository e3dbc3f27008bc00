"""robust-lightning: robust training for PyTorch Lightning against poisoned data, noisy labels and attacks."""

import logging

from robust_lightning.auditing import Audit, audit
from robust_lightning.data.robust import RobustDataModule

__version__ = "0.1.0"
__all__ = ["Audit", "RobustDataModule", "__version__", "audit"]

_logger = logging.getLogger(__name__)
_logger.setLevel(logging.INFO)
# Like Lightning: show our INFO messages when the application has not configured logging itself.
if not logging.getLogger().handlers:
    _logger.addHandler(logging.StreamHandler())
    _logger.propagate = False
