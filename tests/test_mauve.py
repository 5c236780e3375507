"""MAUVE (loopdb.readouts.quality): the score of a set against itself, against a far-away set, and the
frontier's area against the mauve-text package's own where it has no ties."""

import numpy as np
import pytest
import torch

pytest.importorskip("mauve", reason="pip install 'loopdb[mauve]'")

from loopdb.config import DiffusionConfig, ModelConfig  # noqa: E402
from loopdb.models.looped import LoopedLM  # noqa: E402
from loopdb.readouts.quality import frontier_area, judge_features, mauve_score  # noqa: E402


def features(count=60, shift=0.0, seed=0):
    return torch.from_numpy(np.random.RandomState(seed).randn(count, 8) + shift)


def test_mauve_of_a_set_against_itself_is_one():
    sample = features()
    assert mauve_score(sample, sample) == pytest.approx(1.0, abs=1e-9)


def test_mauve_of_sets_far_apart_is_near_zero():
    assert mauve_score(features(seed=0), features(shift=3.0, seed=1)) < 0.05


def test_mauve_orders_a_nearer_set_above_a_farther_one():
    reference = features(seed=0)
    assert mauve_score(reference, features(shift=0.3, seed=1)) > mauve_score(reference, features(shift=1.0, seed=1))


@pytest.mark.parametrize("shift", [0.3, 1.0])
def test_the_frontier_area_is_the_packages_score_where_no_points_tie(shift):
    import mauve

    result = mauve.compute_mauve(p_features=features(seed=0).numpy(), q_features=features(shift=shift, seed=1).numpy(),
                                 seed=0)
    assert frontier_area(result.divergence_curve) == pytest.approx(result.mauve, abs=1e-9)


def test_features_come_from_a_dense_judge_only():
    config = ModelConfig(vocab_size=50, context=8, d_model=16, n_heads=2)
    dense = LoopedLM(config, DiffusionConfig(), loop="dense").eval()
    assert judge_features(dense, [[1, 2, 3], [4, 5, 6, 7]]).shape == (2, 16)
    with pytest.raises(ValueError, match="dense judge"):
        judge_features(LoopedLM(config, DiffusionConfig()).eval(), [[1, 2, 3]])
