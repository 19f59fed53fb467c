"""Errors a user can act on: one line saying what is wrong and what to do."""


class CDMSegmentError(Exception):
    """Invalid input, model or configuration. The message is shown as is, without a traceback."""


class ModelFileError(CDMSegmentError):
    """A model file is missing, corrupt, foreign, or does not match its registry entry."""


class Cancelled(CDMSegmentError):
    """The user cancelled a running job; nothing was written."""

    def __init__(self, message: str = "cancelled by the user; nothing was written"):
        super().__init__(message)
