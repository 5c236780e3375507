"""Draft width L, the dense anchor head and their readouts."""

import pytest
import torch

from conftest import VOCAB, tiny_model
from loopdb.config import preset
from loopdb.families import family_of
from loopdb.maths.elbo import prior_kl
from loopdb.objectives.drafting import DraftDiffusionObjective, draft_targets
from loopdb.objectives.next_token import DenseObjective, DiffusionObjective
from loopdb.readouts import drafting, generation
from loopdb.sampling import DENSE, DIFFUSION, anchor_sampler


def tokens(batch=2, length=13, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def drafting_model(width=4, anchor_weight=1.0, seed=0):
    model = tiny_model(seed, draft_width=width)
    model.anchor_head = anchor_weight > 0  # trained with DraftDiffusionObjective(anchor_weight)
    with torch.no_grad():
        model.slot_embedding.normal_(0, 0.5)
    return model


def test_draft_width_one_is_todays_model():
    """L=1: the draft path gives today's logits and today's loss, bit for bit, with today's parameters."""
    model = tiny_model(draft_width=1)
    assert model.slot_embedding is None
    assert sorted(model.state_dict()) == sorted(tiny_model().state_dict())
    x = tokens(2, 12)
    z = torch.randn(2, 12, 32)
    context = model.encode(x)
    assert torch.equal(model.denoise_draft(z[:, :, None], 0.7, context)[:, :, 0], model.denoise(z, 0.7, context))
    batch = tokens(3, 17, seed=1)
    today, _ = DiffusionObjective().loss(model, batch, torch.Generator().manual_seed(4))
    drafted, _ = DraftDiffusionObjective().loss(model, batch, torch.Generator().manual_seed(4))
    assert torch.equal(today, drafted)


def test_the_family_builds_todays_objective_unless_drafts_or_anchor_are_asked_for():
    config = preset("tiny")
    config.model.vocab_size = VOCAB
    assert type(family_of(config).objective(config)) is DiffusionObjective
    config.train.anchor_weight = 0.5
    assert isinstance(family_of(config).objective(config), DraftDiffusionObjective)


def test_anchor_weight_zero_is_todays_loss_and_the_anchor_adds_dense_ce():
    model = tiny_model(draft_width=1)
    batch = tokens(3, 17, seed=2)
    today, _ = DiffusionObjective().loss(model, batch, torch.Generator().manual_seed(9))
    without, _ = DraftDiffusionObjective(anchor_weight=0.0).loss(model, batch, torch.Generator().manual_seed(9))
    assert torch.equal(today, without)
    weighted, stats = DraftDiffusionObjective(anchor_weight=0.5).loss(model, batch, torch.Generator().manual_seed(9))
    dense, _ = DenseObjective().loss(model, batch, torch.Generator())
    assert torch.allclose(stats["anchor_ce"], dense)
    assert torch.allclose(weighted, today + 0.5 * dense)


def test_slots_attend_within_their_position_and_to_clean_keys_up_to_it():
    model = drafting_model(width=3)
    x = tokens(1, 10)
    z = torch.randn(1, 10, 3, 32)
    base = model.denoise_draft(z, 0.7, model.encode(x))
    # another position's slot: only that position may change
    changed = z.clone()
    changed[0, 6, 1] += 3.0
    out = model.denoise_draft(changed, 0.7, model.encode(x))
    others = [p for p in range(10) if p != 6]
    assert torch.allclose(out[:, others], base[:, others], atol=1e-6)
    assert not torch.allclose(out[:, 6, 0], base[:, 6, 0], atol=1e-4)  # a sibling slot does see it
    # a clean token at position 5: positions before it are unchanged, positions from it on may change
    changed_x = x.clone()
    changed_x[0, 5] = (x[0, 5] + 1) % VOCAB
    out = model.denoise_draft(z, 0.7, model.encode(changed_x))
    assert torch.allclose(out[:, :5], base[:, :5], atol=1e-6)
    assert not torch.allclose(out[:, 5:], base[:, 5:], atol=1e-4)


def test_draft_objective_trains_each_slot_on_its_own_future_token():
    batch = torch.arange(8)[None]
    assert draft_targets(batch, 3)[0].tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [5, 6, 7]]
    model = drafting_model(width=3)
    model.train()
    loss, stats = DraftDiffusionObjective(1.0, draft_fraction=0.5).loss(model, tokens(2, 17), torch.Generator())
    loss.backward()
    assert model.slot_embedding.grad.abs().sum(-1).gt(0).all()  # every slot got a gradient
    assert "anchor_ce" in stats


def test_block_elbo_at_one_loop_is_prior_plus_joint_reconstruction_from_pure_noise():
    model = drafting_model(width=2)
    windows = tokens(2, 9)
    bound, anchor = drafting.block_bounds(model, windows, 1, torch.Generator().manual_seed(3))
    assert bound.shape == anchor.shape == (2, 4)
    generator = torch.Generator().manual_seed(3)
    context = model.encode(windows[:, :-1])
    positions = torch.arange(4) * 2
    block = draft_targets(windows, 2)[:, positions]
    y = model.targets(block)
    sigma = DIFFUSION.grid(model, 1)[0]
    z = y + sigma * torch.randn(y.shape, generator=generator)
    logits = model.denoise_draft(z, sigma, context, positions)
    nll = -torch.log_softmax(logits, -1).gather(-1, block[..., None]).squeeze(-1)
    expected = (prior_kl(y, sigma, model.sigma_data) + nll).sum(-1)
    assert torch.allclose(bound, expected, atol=1e-4)
    dense = -torch.log_softmax(model.dense_logits(context), -1).gather(-1, windows[:, 1:, None]).squeeze(-1)
    assert torch.allclose(anchor, dense.view(2, 4, 2).sum(-1), atol=1e-5)


def _oracle_drafter(corrupt_from=None):
    """Drafts the anchor's own greedy continuation (from a copy of the cache); drafts from index
    ``corrupt_from`` on are replaced by a wrong token."""
    def drafter(model, context, next_token, num_loops, generator):
        drafts, token = [], next_token
        for index in range(model.draft_width - 1):
            context = model.encode(torch.tensor([[token]]), cache=context)
            token = int(model.dense_logits(context)[0, -1].argmax())
            drafts.append(token if corrupt_from is None or index < corrupt_from else (token + 1) % VOCAB)
        return drafts
    return drafter


@pytest.mark.parametrize("drafter,accepted", [(drafting.greedy_drafter, None), (_oracle_drafter(), 3),
                                              (_oracle_drafter(corrupt_from=1), 1), (_oracle_drafter(0), 0)])
def test_speculative_decoding_is_exactly_anchor_greedy_decoding(drafter, accepted):
    """50 tokens from a 16-token window: the window slides several times along the way."""
    model = drafting_model(width=4)
    prompt = tokens(1, 5, seed=3)[0].tolist()
    greedy = generation.generate(model, prompt, 50, 1, temperature=0, sampler=anchor_sampler(model))
    speculative, stats = drafting.speculative_generate(model, prompt, 50, 2, drafter=drafter)
    assert speculative == greedy
    if accepted is not None:  # every full-width verification accepts exactly the drafts before the corruption
        assert max(stats["accepted"]) == accepted and stats["accepted"].count(accepted) > len(stats["accepted"]) / 2
        assert stats["verifications"] < (50 if accepted == 0 else 30)


def test_parallel_decoding_emits_L_tokens_per_draft(monkeypatch):
    model = drafting_model(width=4)
    calls = []
    original = drafting.draft_logits
    monkeypatch.setattr(drafting, "draft_logits", lambda *a, **k: calls.append(1) or original(*a, **k))
    new = drafting.parallel_generate(model, [1, 2, 3], 30, 2, seed=1)
    assert len(new) == 30 and all(0 <= t < VOCAB for t in new)
    assert len(calls) == 8  # ceil(30 / 4)
    assert new == drafting.parallel_generate(model, [1, 2, 3], 30, 2, seed=1)


def test_anchor_head_needs_a_trained_anchor():
    with pytest.raises(ValueError, match="anchor"):
        anchor_sampler(tiny_model())
    view = anchor_sampler(drafting_model())
    assert view is DENSE and not view.has_loops


@pytest.fixture(scope="module")
def draft_run(data_dir, tmp_path_factory):
    """A 3-step tiny-draft run folder made by `loopdb train`."""
    from conftest import SMALL_RUN
    from loopdb.cli import main

    run = tmp_path_factory.mktemp("runs") / "draft"
    assert main(["train", "--preset", "tiny-draft", "--data", str(data_dir), "--out", str(run), "--quiet",
                 *SMALL_RUN, "--max_steps=3"]) == 0
    return run


def test_cli_scores_block_elbo_benches_decoding_and_samples_speculatively(draft_run, capsys, tmp_path):
    import json

    from loopdb.cli import main

    assert main(["score", str(draft_run), "--readout", "block_elbo", "--loops", "1,2", "--max-windows", "2",
                 "--samples", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["block_elbo_bpb"]) == {"1", "2"} and report["anchor_bpb"] > 0 and report["draft_width"] == 4
    assert main(["bench", "decode", str(draft_run), "--loops", "1,2", "--prompts", "1", "--tokens", "9",
                 "--json", "--plot", str(tmp_path / "plots")]) == 0
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png")) == [
        "acceptance_vs_loops.png", "parallel_gen_ppl_vs_loops.png", "tokens_per_s_vs_loops.png"]
    bench = json.loads(capsys.readouterr().out)
    assert set(bench["accepted"]) == set(bench["tokens_per_s"]) == {"1", "2"}
    assert bench["identical"] is True and bench["greedy_tokens_per_s"] > 0
    assert main(["sample", str(draft_run), "--speculative", "--loops", "2", "--prompt", "KING.",
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("KING.")
    assert main(["score", str(draft_run), "--readout", "anchor", "--loops", "1", "--max-windows", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bpb"]["1"] > 0


def test_lm_eval_readout_anchor_scores_with_the_anchor_head(draft_run, data_dir):
    from loopdb.data.storage import load_tokens
    from loopdb.evaluation.lm_eval_model import LoopDBLM
    from loopdb.runs.folder import load_model

    lm = LoopDBLM(run=str(draft_run), readout="anchor", num_loops=4)
    model, _ = load_model(draft_run)
    tokens = load_tokens(data_dir, "test")[:12].tolist()
    (logprob, _), = lm.score_windows([(tokens, 11)])
    with torch.no_grad():
        dense = torch.log_softmax(model.dense_logits(model.encode(torch.tensor([tokens[:-1]]))), -1)
    expected = dense[0].gather(-1, torch.tensor(tokens[1:])[:, None]).sum()
    assert logprob == pytest.approx(float(expected), abs=1e-4)


def test_cli_refuses_drafting_readouts_on_a_plain_run(data_dir, tmp_path, capsys):
    from conftest import SMALL_RUN
    from loopdb.cli import main

    run = tmp_path / "plain"
    assert main(["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(run), "--quiet", *SMALL_RUN,
                 "--max_steps=1"]) == 0
    assert main(["score", str(run), "--readout", "block_elbo", "--loops", "1", "--max-windows", "1"]) == 2
    assert main(["bench", "decode", str(run), "--loops", "1", "--prompts", "1", "--tokens", "2"]) == 2
    assert "draft_width" in capsys.readouterr().err


def test_next_token_readouts_of_a_drafting_model_read_slot_0_of_the_joint_draft():
    from loopdb.readouts import scoring

    model = drafting_model(width=3)
    windows = tokens(1, 9)
    generator = torch.Generator().manual_seed(2)
    logprobs = scoring.predictive_logprobs(model, windows, 2, 1, generator)
    context = model.encode(windows[:, :-1])
    z = DIFFUSION.initial_state(model, (1, 8, 32), 2, torch.Generator().manual_seed(2), "cpu")
    assert z.shape == (1, 8, 3, 32)
    state = z
    grid = DIFFUSION.grid(model, 2)
    logits = model.denoise_draft(state, grid[0], context)
    state = state + (grid[1] - grid[0]) * (state - model.soft_denoised(logits)) / grid[0]  # one Euler step
    last = torch.log_softmax(model.denoise_draft(state, grid[1], context)[:, :, 0], -1)
    assert torch.allclose(logprobs, last.gather(-1, windows[:, 1:, None]).squeeze(-1), atol=1e-5)
    assert len(generation.generate(model, [1, 2], 5, 2)) == 5


def test_likelihood_logits_add_the_exact_gaussian_evidence_of_each_slot():
    """likelihood_logits: logits = network + <z, y_v> / sigma^2, so an untrained drafter is already
    sure of every slot's token at small sigma (logits of scale 1/sigma^2, which a bare network
    behind the final norm can barely reach)."""
    plain, evidenced = drafting_model(), tiny_model(0, draft_width=4, likelihood_logits=True)
    evidenced.load_state_dict(plain.state_dict())  # same weights: only the logits' evidence differs
    x, future = tokens(2, 6), tokens(2, 24, seed=3).view(2, 6, 4, 1)[..., 0]
    context = plain.encode(x)
    for sigma in (0.05, 2.0):
        z = plain.targets(future) + sigma * torch.randn(2, 6, 4, 32, generator=torch.Generator().manual_seed(1))
        network = plain.denoise_draft(z, sigma, context)
        evidence = z @ plain.target_table().t() / sigma**2
        assert torch.allclose(evidenced.denoise_draft(z, sigma, context), network + evidence, atol=1e-3, rtol=1e-5)
    small = plain.targets(future) + 0.05 * torch.randn(2, 6, 4, 32, generator=torch.Generator().manual_seed(2))
    def confidence(model):
        return torch.softmax(model.denoise_draft(small, 0.05, context), -1).gather(-1, future[..., None]).min()

    assert confidence(evidenced) > 0.99 and confidence(plain) < 0.5


def test_study_scores_the_anchor_once_and_the_block_elbo_per_loop_count(draft_run):
    """score_member (compare, study): block_elbo per K, the anchor head at K=1 only (K changes nothing)."""
    from loopdb.evaluation.members import score_member

    bounds = score_member(draft_run, (1, 2), 1, 2, 0, readout="block_elbo")
    assert set(bounds) == {"1", "2"} and all(0 < v < 50 for v in bounds.values())
    anchor = score_member(draft_run, (1, 2), 1, 2, 0, readout="anchor")
    assert set(anchor) == {"1"} and 0 < anchor["1"] < 50
