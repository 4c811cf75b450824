"""The "fusedres" logger: tuning results and every fallback that changes which kernel runs."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("fusedres")

_handler_checked = False
_logged: set[str] = set()


def log(message: str, level: int = logging.INFO) -> None:
    """Log `message`; the first time, make sure it is seen (a stderr handler on the "fusedres"
    logger at INFO, unless logging is already configured somewhere up the tree)."""
    global _handler_checked
    if not _handler_checked:
        _handler_checked = True
        if not logger.hasHandlers():
            logger.addHandler(logging.StreamHandler(sys.stderr))
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
    logger.log(level, message)


def log_once(message: str, level: int = logging.INFO) -> None:
    """`log`, once per distinct message in this process."""
    if message not in _logged:
        _logged.add(message)
        log(message, level)
