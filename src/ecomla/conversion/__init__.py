"""Conversion: a request (options) checked against a model (plan), calibration statistics, the SVD
initialization of each layer, the model-level upcycling, and the checkpoint workflow."""

from .checkpoint import convert_checkpoint
from .stream import convert

__all__ = ["convert", "convert_checkpoint"]
