"""The tiny net, toy data and single-thread fixtures of tests/daft_core/test_finetune.py, shared here."""

from tests.daft_core.test_finetune import _single_thread, data, pretrained

__all__ = ["_single_thread", "data", "pretrained"]
