"""Helpers for tests and benchmarks: tiny random-weight models built in milliseconds."""

from .models import PRESETS, make_model

__all__ = ["PRESETS", "make_model"]
