"""Console logging of the command-line tools: one format, one switch, no third-party chatter."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"

# Libraries that log what is not the user's business: bitsandbytes (imported by diffusers and
# pyiqa) warns at import about optional CPU kernels; httpx logs every request at INFO.
QUIET_LOGGERS = {
    "bitsandbytes": logging.ERROR,
    "httpx": logging.WARNING,
    "httpcore": logging.WARNING,
}


def setup_logging(level: int = logging.INFO, fmt: str = LOG_FORMAT) -> None:
    """Log `level` and above to stderr in the tools' format (call once, from a `main`)."""
    logging.basicConfig(level=level, format=fmt)
    for name, quiet in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(quiet, level))
    # huggingface_hub prints through its own handler; without this each line appears twice
    logging.getLogger("huggingface_hub").propagate = False
    import cv2  # its decoders' warnings ("PNG input buffer is incomplete") repeat our errors

    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
