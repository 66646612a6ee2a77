"""The export's two errors, each one line for the CLI, and the check for the optional package
an export needs (mlflow and tensorboard are optional extras)."""
from __future__ import annotations

MLFLOW_PACKAGE, TENSORBOARD_PACKAGE = "mlflow", "tensorboard"


class TrackerError(RuntimeError):
    """The tracker cannot be reached or refuses the export (exit 3); one line."""


class MissingPackage(RuntimeError):
    """An optional package is not installed (exit 2); the message says what to install."""


def require(package: str) -> None:
    """Is `package` installed? (found, not imported: mlflow's import alone takes seconds)"""
    import importlib.util
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingPackage(
            f"exporting to {package} needs the {package} package: pip install "
            f"'deep-shallow-study[{package}]' (or pip install {package})") from None



def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
