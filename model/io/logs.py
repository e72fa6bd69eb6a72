"""Console logging of the command-line tools: one format, one switch."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO, fmt: str = LOG_FORMAT) -> None:
    """Log `level` and above to stderr in the tools' format (call once, from a `main`)."""
    logging.basicConfig(level=level, format=fmt)
