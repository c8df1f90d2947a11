"""Which epoch is 'best': the latest within noise of the highest validation F1."""

from __future__ import annotations

import math

import pytest

from cellst.train.selection import initial_best, paired_se, update_best


def test_paired_se_is_the_standard_error_of_the_differences():
    # differences 0.1, 0.3: std (ddof=1) 0.1414, / sqrt(2)
    assert paired_se([0.5, 0.7], [0.4, 0.4]) == pytest.approx(0.1)
    assert paired_se([0.5, 0.7], [0.4, 0.6]) == pytest.approx(0.0)
    assert paired_se([0.5], [0.1]) == math.inf
    with pytest.raises(ValueError, match="same images"):
        paired_se([0.5, 0.6], [0.5])


def _replay(history, within_se):
    best = initial_best()
    for epoch, items in enumerate(history, start=1):
        best = update_best(best, epoch, sum(items) / len(items), items, within_se)
    return best


def test_a_later_epoch_within_noise_takes_the_best_name():
    # epoch 2 is the top (0.6); epoch 3 is 0.05 lower with a paired SE of 0.1: within noise
    best = _replay([[0.2, 0.4], [0.5, 0.7], [0.55, 0.55]], within_se=1.0)
    assert (best["epoch"], best["val_f1"]) == (3, pytest.approx(0.55))
    assert (best["top_epoch"], best["top_f1"]) == (2, pytest.approx(0.6))
    assert best["top_items"] == [0.5, 0.7]


def test_a_later_epoch_beyond_noise_does_not():
    # epoch 3 is 0.2 lower, every image lower by the same amount: SE 0, clearly worse
    best = _replay([[0.5, 0.7], [0.3, 0.5]], within_se=1.0)
    assert best["epoch"] == 1
    # compared with the top, not with the epoch that last took the name: epoch 3 is within
    # noise of epoch 2, which is within noise of the top, but it is clearly below the top
    best = _replay([[0.5, 0.7], [0.6, 0.5], [0.4, 0.6]], within_se=1.0)
    assert (best["epoch"], best["top_epoch"]) == (2, 1)


def test_zero_is_the_highest_f1_earliest_on_ties():
    history = [[0.2, 0.4], [0.5, 0.7], [0.55, 0.55], [0.6, 0.6]]
    assert _replay(history, within_se=0.0)["epoch"] == 2
    assert _replay(history, within_se=1.0)["epoch"] == 4


def test_one_validation_image_picks_the_latest_epoch():
    assert _replay([[0.9], [0.1], [0.5]], within_se=1.0)["epoch"] == 3
    assert _replay([[0.9], [0.1], [0.5]], within_se=0.0)["epoch"] == 1


def test_a_state_saved_before_the_rule_resumes():
    """A training state written before this rule held only val_f1 and epoch: the first
    comparison after resuming is strict, and the rule takes over from the next top."""
    old = {"val_f1": 0.6, "epoch": 4}
    best = update_best(old, 5, 0.59, [0.59, 0.59], within_se=1.0)
    assert best["epoch"] == 4
    best = update_best(best, 6, 0.65, [0.6, 0.7], within_se=1.0)
    best = update_best(best, 7, 0.64, [0.7, 0.58], within_se=1.0)
    assert (best["epoch"], best["top_epoch"]) == (7, 6)
    with pytest.raises(ValueError, match="within_se"):
        update_best(best, 8, 0.5, [0.5, 0.5], within_se=-1)


def test_a_prefix_of_the_validation_items_covers_every_modality():
    """Validation scores the first ``train.val_max_items`` validation ids; they came sorted,
    so 4 of 6 items (the demo's recipe) left a whole modality out on most seeds, and the
    best checkpoint was chosen without it. They now come interleaved by modality."""
    import pandas as pd

    from cellst.train.validate import split_train_val

    modalities = ["brightfield", "dic", "fluorescence", "phase_contrast"]
    items = pd.DataFrame(
        {
            # ids that sort by modality, as a store of one folder per modality has them
            "id": [f"{m[:2]}{k:02d}" for m in modalities for k in range(10)],
            "modality": [m for m in modalities for _ in range(10)],
        }
    )
    by_id = dict(zip(items["id"], items["modality"], strict=True))
    for seed in range(6):
        train, val = split_train_val(items, 0.15, seed)
        assert sorted(train + val) == sorted(items["id"]) and not set(train) & set(val)
        assert train == sorted(train)
        assert {by_id[i] for i in val[:4]} == set(modalities), (seed, val)
        for m in modalities:  # each modality's own items stay in id order
            mine = [i for i in val if by_id[i] == m]
            assert mine == sorted(mine) and len(mine) == 2  # round(0.15 * 10)
