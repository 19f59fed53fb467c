"""Errors a user can act on: one line saying what is wrong and what to do."""

import re
from typing import Optional


class CDMSegmentError(Exception):
    """Invalid input, model or configuration. The message is shown as is, without a traceback."""


class ModelFileError(CDMSegmentError):
    """A model file is missing, corrupt, foreign, or does not match its registry entry."""


class Cancelled(CDMSegmentError):
    """The user cancelled a running job; nothing was written."""

    def __init__(self, message: str = "cancelled by the user; nothing was written"):
        super().__init__(message)


MEMORY_ADVICE = ("use fewer slices per batch (--batch-size 1), crop the volume to the region to segment, close other "
                 "programs, or run on a machine with more memory")
# How the allocators say it: Python and numpy (MemoryError, "Unable to allocate"), torch's CPU allocator ("can't
# allocate memory", "not enough memory" on Windows), CUDA ("out of memory"), ITK and ONNX Runtime (C++ bad_alloc),
# the dynamic loader when a library cannot be mapped.
OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory",
                       "unable to allocate", "failed to allocate", "bad_alloc", "bad allocation",
                       "failed to map segment")


def out_of_memory(error: BaseException) -> Optional[CDMSegmentError]:
    """Any library's out-of-memory error as one line saying which memory ran out, how much was asked for, and what
    to do; None for any other error."""
    text = str(error)
    if not isinstance(error, MemoryError) and not any(w in text.lower() for w in OUT_OF_MEMORY_WORDS):
        return None
    which = "GPU memory" if "cuda" in text.lower() else "memory (RAM)"
    asked = re.search(r"allocate (\d+) bytes", text)
    amount = f" allocating {int(asked[1]) / 2 ** 20:.0f} MiB more" if asked else ""
    return CDMSegmentError(f"out of {which}{amount}; {MEMORY_ADVICE}")
