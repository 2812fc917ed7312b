from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPOSITORY / "training" / "sample_data"
ZOO = REPOSITORY / "models" / "zoo"


@pytest.fixture(scope="session")
def trec_path() -> Path:
    """1,500 TREC questions committed with the repository (see training/sample_data/README.md)."""
    return SAMPLE_DATA / "trec.txt"
