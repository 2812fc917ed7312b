"""The drawn-digit check set (training/evaluation/drawn_digits.py) and the picture jitter of digit training
(training/data/picture_jitter.py): what they draw is checked by hand-countable properties."""

from __future__ import annotations

import numpy as np
import pytest

from models.image_encoding import GRID, INK_SCALE, grid_from_grey, resize
from training.evaluation.drawn_digits import LINE_WIDTHS, SLANTS, STYLES, WIDTHS, DrawnDigit, drawn_grids, picture
from training.data.image_data import digits
from training.data.picture_jitter import FINE, PAD, Jitter, pick, redraw, redrawn_copies

TRAIN, _, _ = digits()


def column_centre(rows: np.ndarray) -> float:
    """The ink-weighted mean column of a block of grid rows."""
    weights = rows.sum(axis=0)
    return float((weights * np.arange(len(weights))).sum() / weights.sum())


def test_every_digit_is_drawn_in_every_style_and_setting():
    grids, labels, names = drawn_grids()
    per_setting = len(LINE_WIDTHS) * len(SLANTS) * len(WIDTHS)
    assert len(grids) == sum(len(styles) for styles in STYLES.values()) * per_setting == len(set(names))
    assert sorted(set(labels)) == [str(d) for d in range(10)]
    assert grids.shape[1:] == (GRID, GRID) and grids.min() >= 0 and np.allclose(grids.max(axis=(1, 2)), INK_SCALE)


def test_a_one_is_a_stem_in_the_middle_columns_and_a_zero_has_a_hole():
    one = grid_from_grey(picture(DrawnDigit("1", "stem", 0.08, 0.0, 1.0)))
    # A thin upright stem: cropped to its ink and centred, it lands in columns 3 and 4, top to bottom.
    assert one[:, 3:5].sum() > 0.95 * one.sum() and (one[:, 3:5].max(axis=1) > 8).all()
    zero = grid_from_grey(picture(DrawnDigit("0", "oval", 0.08, 0.0, 1.0)))
    assert zero[3:5, 3:5].max() < 4 and zero[0].max() > 8 and zero[-1].max() > 8  # paper inside, ink above and below


def test_a_right_slant_puts_the_top_of_a_stem_right_of_its_foot():
    leaning = grid_from_grey(picture(DrawnDigit("1", "stem", 0.08, 0.25, 1.0)))
    # 0.25 of the height over the 6 rows between these blocks' centres: about 1.5 cells (1.3 after averaging)
    assert column_centre(leaning[:2]) > column_centre(leaning[-2:]) + 1.0


def test_a_redrawing_that_changes_nothing_is_how_a_picture_of_the_grid_is_read():
    grid = TRAIN[0][7]  # a 7 of the training set
    still = redraw(grid)
    np.testing.assert_allclose(still, grid_from_grey(np.pad(resize(grid / INK_SCALE, FINE), PAD)), atol=1e-4)
    assert still.shape == (GRID, GRID) and still.max() == pytest.approx(INK_SCALE)


ONE = next(grid for grid, label in zip(*TRAIN) if label == 1)


def test_a_right_slant_moves_the_top_of_a_one_right_of_its_foot():
    upright, leaning = redraw(ONE), redraw(ONE, slant=0.5)
    lean = column_centre(leaning[:2]) - column_centre(leaning[-2:])
    assert lean > column_centre(upright[:2]) - column_centre(upright[-2:]) + 1.0
    left = redraw(ONE, slant=-0.5)
    assert column_centre(left[:2]) - column_centre(left[-2:]) < lean - 2.0


def test_a_thicker_pen_inks_more_cells_and_a_thinner_one_fewer():
    zero = next(grid for grid, label in zip(*TRAIN) if label == 0)
    inked = {pen: int((redraw(zero, pen=pen) > 4).sum()) for pen in (-2, 0, 3)}
    assert inked[-2] < inked[0] < inked[3]
    assert redraw(zero, pen=3)[3:5, 3:5].mean() > redraw(zero)[3:5, 3:5].mean()  # the hole fills in


def test_a_narrower_digit_keeps_its_height_and_loses_width():
    zero = next(grid for grid, label in zip(*TRAIN) if label == 0)
    narrow = redraw(zero, width=0.6)
    inked_columns = lambda grid: int((grid.max(axis=0) > 4).sum())
    assert inked_columns(narrow) < inked_columns(redraw(zero))
    assert (narrow.max(axis=1) > 4).sum() >= 7  # still top to bottom: the crop keeps the height


def test_a_quarter_turn_turns_a_one_on_its_side():
    flat = redraw(ONE, degrees=90)
    rows, columns = int((flat.max(axis=1) > 8).sum()), int((flat.max(axis=0) > 8).sum())
    assert columns >= 6 and rows <= 4  # a bar across the grid (the set's 1s are thick), not a stem down it


def test_pick_keeps_or_replaces_each_digit_as_the_share_says():
    grids = TRAIN[0][:40]
    copies = redrawn_copies(grids, 3, Jitter(), np.random.default_rng(1))
    assert copies.shape == (3, 40, GRID, GRID)
    np.testing.assert_array_equal(pick(grids, copies, 0.0, np.random.default_rng(2)), grids)
    replaced = pick(grids, copies, 1.0, np.random.default_rng(2))
    for index in range(40):
        assert any(np.array_equal(replaced[index], copies[c, index]) for c in range(3))
    with pytest.raises(ValueError, match="redraws 8x8 digit grids"):
        redrawn_copies(np.zeros((2, 28, 28), np.float32), 1, Jitter(), np.random.default_rng(0))


def test_check_drawn_scores_a_bundle_through_onnxruntime_as_training_did(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import REPOSITORY
    from training.bundles.export_image import export_image_bundle
    from training.jobs.image import train_image_cnn

    test = digits()[1]
    checkpoint = train_image_cnn(TRAIN, test, [str(d) for d in range(10)], preset="digits", epochs=4)
    assert checkpoint["metrics"]["drawn_images"] == len(drawn_grids()[0])
    export_image_bundle(checkpoint, tmp_path / "quick-digits", "quick-digits", test[0])
    run = subprocess.run([sys.executable, "-m", "training", "check-drawn", "--bundle", str(tmp_path / "quick-digits")],
                         capture_output=True, text=True, cwd=REPOSITORY)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["n"] == checkpoint["metrics"]["drawn_images"]
    # The same pictures, torch in training and onnxruntime here: the same figure, misses listed one per line.
    assert result["drawn_accuracy"] == pytest.approx(checkpoint["metrics"]["drawn_accuracy"])
    assert run.stdout.count("misread: ") == round((1 - result["drawn_accuracy"]) * result["n"])
