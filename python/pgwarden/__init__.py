"""pgwarden: an identity-aware, auditing Layer-7 gateway for PostgreSQL."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pgwarden")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__"]
