"""Batched generation: left-padded prompts give, row by row, what one prompt at a time gives."""

import pytest
import torch

from loopdb.config import DiffusionConfig, ModelConfig
from loopdb.models.stacked import StackedLM
from loopdb.readouts import generation

from conftest import VOCAB, tiny_model

PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [4], [6, 6, 1, 2]]  # unequal lengths: rows 2 and 3 are left-padded


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_generation_equals_one_prompt_at_a_time(model, temperature, use_cache):
    seeds = [3, 4, 5]
    batched = generation.generate_batch(model, PROMPTS, 6, 4, temperature=temperature, top_k=20, seeds=seeds,
                                        use_cache=use_cache)  # 7 + 6 < context 16: no slide
    alone = [generation.generate(model, prompt, 6, 4, temperature=temperature, top_k=20, seed=seed)
             for prompt, seed in zip(PROMPTS, seeds)]
    assert batched == alone


def test_left_padding_leaves_a_rows_logits_unchanged(model):
    """The padded row's clean stream and denoiser output match the unpadded row's to float rounding."""
    short = torch.tensor([[4, 8, 1]])
    padded = torch.tensor([[0, 0, 0, 4, 8, 1], [1, 2, 3, 4, 5, 6]])
    z = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(0))
    alone = model.denoise(z[:1], 0.5, model.encode(short))[0, -1]
    batched = model.denoise(z, 0.5, model.encode(padded, pad=torch.tensor([3, 0])))[0, -1]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loop", ["recurrent", "dense"])  # objective bptt, dense
def test_batched_generation_for_the_other_objectives(loop):
    model = tiny_model()
    model.loop = loop
    batched = generation.generate_batch(model, PROMPTS, 4, 2, temperature=0.0)
    assert batched == [generation.generate(model, prompt, 4, 2, temperature=0.0) for prompt in PROMPTS]


def test_batched_generation_of_the_stacked_model():
    torch.manual_seed(0)
    config = ModelConfig(family="stacked", vocab_size=VOCAB, context=16, d_model=32, n_heads=4, n_layers=4,
                         num_blocks=2)
    model = StackedLM(config, DiffusionConfig()).eval()
    batched = generation.generate_batch(model, PROMPTS, 4, 2, temperature=0.0)
    assert batched == [generation.generate(model, prompt, 4, 2, temperature=0.0) for prompt in PROMPTS]


def test_a_sliding_window_still_matches_the_cacheless_run(model):
    prompts = [[5, 9, 2, 7, 1, 3, 8, 2, 2], [4, 1]]
    cached = generation.generate_batch(model, prompts, 20, 2, seeds=[1, 2], top_k=20)  # 29 > 16: slides
    uncached = generation.generate_batch(model, prompts, 20, 2, seeds=[1, 2], top_k=20, use_cache=False)
    assert cached == uncached and all(len(row) == 20 for row in cached)


def test_a_cache_grows_in_place_and_an_older_context_extended_again_is_copied():
    from loopdb.layers import extend_cache

    generator = torch.Generator().manual_seed(0)
    start, one, two, other = (torch.randn(2, 3, n, 4, generator=generator) for n in (5, 1, 2, 1))
    with torch.no_grad():
        first = extend_cache(start, one)  # a new buffer with room to grow
        second = extend_cache(first, two)  # the newest view: written in place, same buffer
        assert second.data_ptr() == first.data_ptr()
        branch = extend_cache(first, other)  # an older view extended again: must not touch `second`
        assert branch.data_ptr() != second.data_ptr()
    torch.testing.assert_close(second, torch.cat([start, one, two], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(branch, torch.cat([start, one, other], dim=2), rtol=0, atol=0)


def test_generation_reports_the_prefill_time(model):
    stats = {}
    generation.generate_batch(model, [[1, 2, 3]], 2, 2, temperature=0.0, stats=stats)
    assert stats["prefill_seconds"] > 0
    generation.generate_batch(model, [[1, 2, 3]], 2, 2, temperature=0.0, use_cache=False, stats=stats)
    assert stats["prefill_seconds"] == 0.0


def sequence_model(kind: str):
    """A tiny BPTT model (sequence recurrence) or sequence-joint DiffusionBlocks model (a text model, or a
    task model that denoises the whole window), its zero-initialised paths broken so every path carries
    signal."""
    from loopdb.config import Config
    from loopdb.families import build_model, check_config

    config = Config()
    config.model.vocab_size, config.model.context, config.model.d_model, config.model.n_heads = VOCAB, 16, 32, 4
    config.model.recurrence = "sequence"
    if kind == "bptt":
        config.train.objective = "bptt"
    else:
        config.diffusion.sigma_min, config.diffusion.grid = 0.02, "geometric"
    torch.manual_seed(0)
    model = build_model(check_config(config)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modulation" in name:
                parameter.normal_(0, 0.1)
    model.targets_are_next_tokens = kind != "joint-task"
    return model


@pytest.mark.parametrize("kind", ["bptt", "joint", "joint-task"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_sequence_models_decode_rows_of_one_prompt_length_together_each_as_alone(kind, use_cache, monkeypatch):
    """Four prompts of two lengths: two batches of two rows, 20 new tokens (the 16-token window slides)."""
    model = sequence_model(kind)
    prompts, seeds = [[5, 9, 2], [6, 6, 1, 2], [4, 1, 7], [3, 2, 1, 8]], [3, 4, 5, 6]
    alone = [generation.generate(model, prompt, 20, 3, temperature=1.0, top_k=20, seed=seed, use_cache=use_cache)
             for prompt, seed in zip(prompts, seeds)]
    step = "decode" if kind == "bptt" else "denoise"
    rows_per_call, original = [], getattr(model, step)

    def spy(first, *args, **kwargs):
        rows_per_call.append(first.shape[0])
        return original(first, *args, **kwargs)

    monkeypatch.setattr(model, step, spy)
    batched = generation.generate_batch(model, prompts, 20, 3, temperature=1.0, top_k=20, seeds=seeds,
                                        use_cache=use_cache)
    assert batched == alone and all(len(row) == 20 for row in batched)
    assert set(rows_per_call) == {2}  # every call decodes the two rows of one prompt length at once
