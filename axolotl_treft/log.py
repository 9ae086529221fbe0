"""Loggers that show up in Axolotl's output (and only once under multi-process training)."""

from __future__ import annotations

import logging


def get_logger(name: str):
    try:
        from axolotl.utils.logging import get_logger as axolotl_logger
    except ImportError:  # used outside an Axolotl install
        return logging.getLogger(name)
    return axolotl_logger(name)
