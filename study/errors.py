"""User-facing errors that need no torch to import (the CLI catches them)."""


class DatasetError(RuntimeError):
    """A dataset is missing or unreadable; the message says which files are expected where."""
