"""Shared fixtures: the offline tiny model, built once per test session."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(scope="session")
def tiny():
    import train

    return train.load_model("tiny", seed=0)
