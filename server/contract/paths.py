"""Where facegallery keeps its files by default: the user's data and cache directories (platformdirs)."""

from __future__ import annotations

from pathlib import Path

import platformdirs

__all__ = ["APP_NAME", "user_data_dir", "user_cache_dir"]

#: The application name under the platform's data and cache directories.
APP_NAME = "facegallery"


def user_data_dir() -> Path:
    """``<user data dir>/facegallery``, e.g. ``~/.local/share/facegallery`` (galleries, the default model)."""
    return Path(platformdirs.user_data_dir(APP_NAME))


def user_cache_dir() -> Path:
    """``<user cache dir>/facegallery``, e.g. ``~/.cache/facegallery`` (derived files safe to delete)."""
    return Path(platformdirs.user_cache_dir(APP_NAME))
