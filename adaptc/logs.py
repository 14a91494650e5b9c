"""Loggers that speak at import time, not about the user's work, quieted by the entry points
(the CLI, the demo; a library user's logging stays theirs).

torchao (installed with the ``quant`` extra; transformers imports it with any model
class) warns that its CUDA kernels do not load on a CPU, and registers enums that torch's
pytree logs about.
"""

from __future__ import annotations

import logging

__all__ = ["IMPORT_TIME_LOGGERS", "quiet_import_time_loggers"]

IMPORT_TIME_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_import_time_loggers() -> None:
    """Show only errors from :data:`IMPORT_TIME_LOGGERS`."""
    for name in IMPORT_TIME_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
