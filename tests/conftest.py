"""Shared fixtures: the ../shared data directory and the converted default model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"test data directory {SHARED_DIR} is missing (it sits beside the repository)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def golden(shared_dir: Path) -> list[dict]:
    """dlib 20.0.1's own outputs, one dict per image (see ../shared/README.md)."""
    lines = (shared_dir / "golden_dlib" / "golden.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
