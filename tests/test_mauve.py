"""MAUVE (loopdb.readouts.quality): the score of a set against itself, against a far-away set, and the
frontier's area against the mauve-text package's own where it has no ties; on a trained judge's features,
held-out text scores high and random tokens and text with its tokens shuffled near zero."""

import numpy as np
import pytest
import torch

pytest.importorskip("mauve", reason="pip install 'loopdb[mauve]'")

from loopdb.config import DiffusionConfig, ModelConfig  # noqa: E402
from loopdb.models.looped import LoopedLM  # noqa: E402
from loopdb.readouts.quality import frontier_area, judge_features, judge_perplexity, mauve_score  # noqa: E402


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
    with pytest.raises(ValueError, match="2 tokens or more"):
        judge_features(dense, [[1, 2, 3], [4]])


def test_features_see_word_order():
    """The same tokens in another order give other features (a mean over positions of the states alone
    would be close to a bag of tokens)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=50, context=8, d_model=16, n_heads=2)
    dense = LoopedLM(config, DiffusionConfig(), loop="dense").eval()
    text = [3, 14, 15, 9, 26, 5]
    forward, backward = judge_features(dense, [text, text[::-1]])
    assert (forward - backward).abs().max() > 1e-2 * forward.abs().max()


@pytest.fixture(scope="module")
def judge(data_dir, tmp_path_factory):
    """A small dense judge, 600 steps on the test corpus (seconds): long enough to have learned some word
    order (after 100 steps its perplexity of text with its tokens shuffled was within 10% of the text's,
    and no features of it could tell the two apart)."""
    from conftest import small_config
    from loopdb.training.trainer import Trainer

    trainer = Trainer(small_config(max_steps=600, objective="dense", eval_every=10**6, checkpoint_every=10**6),
                      data_dir, tmp_path_factory.mktemp("judge") / "run", progress=False, log_tensorboard=False)
    trainer.train()
    return trainer.model.eval()


def held_out_and_reference(data_dir, count=40, length=16):
    from loopdb.evaluation.study import held_out_texts

    texts = held_out_texts(data_dir, "test", 2 * count, length)
    return texts[1::2], texts[0::2]


def test_on_judge_features_held_out_text_scores_high_and_random_tokens_near_zero(judge, data_dir):
    texts, reference = held_out_and_reference(data_dir)
    reference_features = judge_features(judge, reference)
    generator = torch.Generator().manual_seed(0)
    random_tokens = [torch.randint(judge.config.vocab_size, (len(text),), generator=generator).tolist()
                     for text in texts]
    assert mauve_score(judge_features(judge, reference), reference_features) == pytest.approx(1.0, abs=1e-9)
    assert mauve_score(judge_features(judge, texts), reference_features) > 0.5
    assert mauve_score(judge_features(judge, random_tokens), reference_features) < 0.1


def test_on_judge_features_shuffled_token_text_scores_near_zero(judge, data_dir):
    texts, reference = held_out_and_reference(data_dir)
    generator = torch.Generator().manual_seed(0)
    shuffled = [[text[i] for i in torch.randperm(len(text), generator=generator).tolist()] for text in texts]
    prompt = reference[0][:1]
    assert judge_perplexity(judge, prompt, shuffled) > 2 * judge_perplexity(judge, prompt, texts)  # it knows order
    assert mauve_score(judge_features(judge, shuffled), judge_features(judge, reference)) < 0.1
