"""User-facing errors that need no torch to import (the CLI catches them)."""


class DatasetError(RuntimeError):
    """A dataset is missing or unreadable; the message says which files are expected where."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot run the study as asked (e.g. GPUs per trial on a cluster without
    GPUs); the message names what the cluster has."""
