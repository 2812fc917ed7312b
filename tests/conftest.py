from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPOSITORY / "training" / "sample_data"
ZOO = REPOSITORY / "models" / "zoo"


@pytest.fixture(scope="session")
def trec_path() -> Path:
    """1,500 TREC questions committed with the repository (see training/sample_data/README.md)."""
    return SAMPLE_DATA / "trec.txt"


def export_tiny_language_model(bundle_dir: Path, work_dir: Path) -> dict:
    """Train a tiny character-aware LM for two epochs on the committed MR sample (any text
    serves a language model; the suite must not need ../shared/data) and export it to a bundle.
    Returns the bundle's metrics."""
    from models.text_encoding import tokenize
    from training.data.datasets import read_mr_dir
    from training.bundles.export_lm import export_language_model
    from training.jobs.language_model import train_language_model

    tokens = [token for example in read_mr_dir(SAMPLE_DATA / "mr") for token in (*tokenize(example.text), "<eos>")]
    cut = int(0.9 * len(tokens))
    train, valid = tokens[:cut], tokens[cut:]
    checkpoint = train_language_model(
        train, valid, work_dir / f"{bundle_dir.name}.pt", device="cpu", show_progress=False,
        overrides={"hidden_size": "48", "filters": "8,8,8,8,8,8", "recipe.epochs": "2"},
    )
    return export_language_model(checkpoint, bundle_dir, bundle_dir.name, valid)


@pytest.fixture(scope="session")
def tiny_lm_bundle(tmp_path_factory) -> Path:
    """One tiny LM bundle for the whole session (about ten seconds to train and export)."""
    folder = tmp_path_factory.mktemp("tiny_lm")
    export_tiny_language_model(folder / "char-lm-tiny", folder)
    return folder / "char-lm-tiny"
