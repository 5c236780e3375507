"""The vision families (docs/method.md#vision): ViT classifier and DiT generator with DiffusionBlocks."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

from conftest import assert_only_block_has_gradients
from loopdb import images as images_lib  # noqa: E402
from loopdb.cli import main  # noqa: E402
from loopdb.config import Config, ConfigError  # noqa: E402
from loopdb.families import build_model, check_config, family_of  # noqa: E402
from loopdb.readouts import vision as vision_readouts  # noqa: E402
from loopdb.sampling.vision import classify, generate_images  # noqa: E402
from loopdb.training.trainer import step_generator  # noqa: E402
from loopdb.models.vit import ViTClassifier  # noqa: E402

SMALL = ["--d_model=32", "--n_heads=4", "--n_layers=4", "--num_blocks=4", "--batch_size=8", "--warmup_steps=1"]


def small_config(family: str, objective: str = "diffusion", **diffusion) -> Config:
    config = Config()
    config.model.family, config.train.objective = family, objective
    config.model.d_model, config.model.n_heads = 32, 4
    for key, value in diffusion.items():
        setattr(config.diffusion, key, value)
    config.validate()
    return config


def build(family: str, objective: str = "diffusion", seed: int = 0, **diffusion):
    torch.manual_seed(seed)
    config = small_config(family, objective, **diffusion)
    model = build_model(config)
    with torch.no_grad():  # break the zero init so every path carries signal
        for name, parameter in model.named_parameters():
            if "modulation" in name or "final_linear" in name:
                parameter.normal_(0, 0.05)
    return model.eval()


def objective_for(family: str, objective: str = "diffusion"):
    """The loss the family trains its model with (the model holds none)."""
    config = small_config(family, objective)
    return family_of(config).objective(config)


def digit_batch(count: int = 8) -> dict:
    data = images_lib.load_digits()
    return {"images": data.train_images[:count], "labels": data.train_labels[:count]}


def record_blocks(monkeypatch, model) -> list:
    """Spy on model.forward: each call appends (sigmas, block_index)."""
    calls = []
    original = model.forward

    def spy(*args):
        calls.append((args[2] if isinstance(model, ViTClassifier) else args[1], args[-1]))
        return original(*args)

    monkeypatch.setattr(model, "forward", spy)
    return calls


# -- data ------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_and_disjoint():
    train, test = images_lib.fixed_split(1797)
    again_train, again_test = images_lib.fixed_split(1797)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    assert (len(train), len(test)) == (1437, 360)
    assert not set(train) & set(test) and len(set(train) | set(test)) == 1797
    first, second = images_lib.load_digits(), images_lib.load_digits()
    assert torch.equal(first.test_images, second.test_images) and torch.equal(first.test_labels, second.test_labels)
    assert first.train_images.shape == (1437, 1, 8, 8)
    assert first.train_images.min() == -1 and first.train_images.max() == 1
    assert set(first.test_labels.tolist()) == set(range(10))


def test_npz_and_folder_loaders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(20) % 2
    np.savez(tmp_path / "set.npz", images=pictures, labels=labels)
    data = images_lib.load_image_data(tmp_path / "set.npz")
    assert data.train_images.shape == (16, 3, 4, 4) and data.test_images.shape == (4, 3, 4, 4)
    assert data.classes == ["0", "1"]
    for index, picture in enumerate(pictures):
        folder = tmp_path / "folder" / ("cat" if labels[index] else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(folder / f"{index}.png")
    from_folder = images_lib.load_image_data(tmp_path / "folder")
    assert from_folder.classes == ["cat", "dog"] and from_folder.train_images.shape == (16, 3, 4, 4)
    with pytest.raises(images_lib.DataError):
        images_lib.load_image_data(tmp_path / "missing.npz")


def test_vision_config_validation():
    config = small_config("vit")
    config.model.n_layers = 6
    with pytest.raises(ConfigError, match="must be a multiple of num_blocks"):
        config.validate()
    with pytest.raises(ConfigError, match="diffusion or dense"):
        check_config(Config().apply_overrides({"family": "dit", "objective": "bptt"}))


# -- ViT ------------------------------------------------------------------------------------------
def test_label_targets_and_estimate_use_the_same_normalised_table():
    model = build("vit")
    table = F.normalize(model.label_table.weight, dim=-1) * model.target_norm  # computed here, independently
    labels = torch.tensor([0, 3, 9])
    assert torch.allclose(model.targets(labels), table[labels])
    assert torch.allclose(model.targets(labels).norm(dim=-1), torch.full((3,), model.target_norm))
    assert abs(model.target_norm / 32**0.5 - model.sigma_data) < 1e-6  # per-dimension scale = sigma_data (2.1)
    logits = torch.randn(5, 10)
    assert torch.allclose(model.soft_denoised(logits), torch.softmax(logits, -1) @ table, atol=1e-6)
    # a confident prediction's estimate is that label's target, not a raw-table row
    assert torch.allclose(model.soft_denoised(F.one_hot(labels, 10) * 1e4), table[labels], atol=1e-5)


def test_sampler_runs_the_block_that_training_assigns_to_each_sigma(monkeypatch):
    model = build("vit", block_overlap=0.0)
    partition = model.partition
    for block_index in range(4):  # training: sigmas drawn for a block are owned by it at inference
        lo, hi = partition.training_range(block_index)
        sigmas = model.schedule.sample_sigmas(200, torch.Generator().manual_seed(block_index), lo, hi)
        assert {partition.owner(float(s)) for s in sigmas} == {block_index}
    calls = record_blocks(monkeypatch, model)
    batch = digit_batch(2)
    classify(model, batch["images"], 4, torch.Generator().manual_seed(0))
    assert [block for _, block in calls] == [0, 1, 2, 3]  # T = B: every block once, input side first
    calls.clear()
    classify(model, batch["images"], 9, torch.Generator().manual_seed(0))
    for sigma, block in calls:
        lo, hi = partition.training_range(block)
        assert lo * (1 - 1e-6) <= float(sigma[0]) <= hi * (1 + 1e-6)
    assert len(calls) == 9


@pytest.mark.parametrize("family", ["vit", "dit"])
def test_only_the_sampled_block_gets_gradients(family):
    model = build(family).train()
    seen = set()
    for step in range(12):
        model.zero_grad(set_to_none=True)
        loss, stats = objective_for(family).loss(model, digit_batch(), step_generator(0, step), step)
        loss.backward()
        chosen = int(stats["block"])
        seen.add(chosen)
        assert_only_block_has_gradients([list(b.parameters()) for b in model.blocks], chosen)
    assert len(seen) > 1
    dense = build(family, objective="dense").train()
    loss, _ = objective_for(family, "dense").loss(dense, digit_batch(), step_generator(0, 0))
    loss.backward()
    assert all(p.grad is not None for p in dense.blocks.parameters())  # end to end: every layer


def test_vit_dense_ignores_steps_and_diffusion_is_seeded_by_its_noise():
    batch = digit_batch(4)
    dense = build("vit", objective="dense")
    assert torch.equal(classify(dense, batch["images"], 1, torch.Generator().manual_seed(0)),
                       classify(dense, batch["images"], 7, torch.Generator().manual_seed(1)))
    model = build("vit")
    first = classify(model, batch["images"], 4, torch.Generator().manual_seed(0))
    assert torch.equal(first, classify(model, batch["images"], 4, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, classify(model, batch["images"], 4, torch.Generator().manual_seed(1)))


# -- DiT ------------------------------------------------------------------------------------------
def test_cfg_scale_one_is_the_conditional_model(monkeypatch):
    model = build("dit")
    z = torch.randn(3, 1, 8, 8) * 2
    sigma = torch.tensor([2.0, 0.5, 0.05])
    labels = torch.tensor([1, 4, 7])
    conditional = model(z, sigma, labels, 1)
    assert torch.allclose(model.guided(z, sigma, labels, 1.0, 1), conditional, atol=1e-5)
    assert not torch.allclose(model.guided(z, sigma, labels, 3.0, 1), conditional, atol=1e-3)  # the null class matters
    # whole sampler: guidance 1 walks the same trajectory as the purely conditional denoiser
    guided = generate_images(model, labels, 6, 1.0, torch.Generator().manual_seed(0))
    monkeypatch.setattr(model, "guided", lambda z, s, y, scale, block: model(z, s, y, block))
    assert torch.allclose(guided, generate_images(model, labels, 6, 1.0, torch.Generator().manual_seed(0)), atol=1e-4)


def test_dit_sampler_steps_run_their_owning_block_only(monkeypatch):
    model = build("dit", block_overlap=0.0)
    calls = record_blocks(monkeypatch, model)
    generate_images(model, torch.tensor([0, 1]), 8, 2.0, torch.Generator().manual_seed(0))
    assert len(calls) == 8
    for sigma, block in calls:
        assert block == model.partition.owner(float(sigma[0]))
        lo, hi = model.partition.training_range(block)
        assert lo * (1 - 1e-6) <= float(sigma[0]) <= hi * (1 + 1e-6)
    assert [block for _, block in calls] == sorted(block for _, block in calls)  # input-side block first
    dense = build("dit", objective="dense")
    calls = record_blocks(monkeypatch, dense)
    generate_images(dense, torch.tensor([0]), 3, 2.0, torch.Generator().manual_seed(0))
    assert [block for _, block in calls] == [None] * 3  # every layer at every step


def test_dit_label_dropout_uses_the_null_class(monkeypatch):
    model = build("dit", label_dropout=0.5).train()
    seen = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda z, s, y, b: seen.append(y) or original(z, s, y, b))
    objective_for("dit").loss(model, digit_batch(64), step_generator(0, 0))
    labels = seen[0]
    assert 10 < int((labels == model.null_class).sum()) < 54


def test_frechet_distance_is_zero_for_equal_moments_and_grows_with_shift():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 5))
    mu, cov = features.mean(0), np.cov(features, rowvar=False)
    assert abs(vision_readouts.frechet_distance(mu, cov, mu, cov)) < 1e-6
    assert abs(vision_readouts.frechet_distance(mu + 1.0, cov, mu, cov) - 5.0) < 1e-6


# -- command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["vit", "dit"])
def test_train_then_score_json_shapes(family, tmp_path, capsys):
    run = tmp_path / family
    assert main(["train", "--preset", f"tiny-{family}", "--out", str(run), "--quiet", "--max_steps=2",
                 "--eval_every=2", "--eval_loops=2", *SMALL]) == 0
    assert json.loads((run / "data.json").read_text())["data_dir"] is None  # no text corpus needed
    capsys.readouterr()
    if family == "vit":
        assert main(["score", str(run), "--json", "--loops", "1,4", "--samples", "1"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert set(report["accuracy"]) == {"1", "4"}
        assert all(0 <= value <= 1 for value in report["accuracy"].values())
    else:
        assert main(["score", str(run), "--json", "--steps", "2,3", "--images-per-class", "3"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert set(report["sample_accuracy"]) == set(report["frechet_distance"]) == {"2", "3"}
        assert all(0 <= value <= 1 for value in report["sample_accuracy"].values())
        assert report["real_test"]["accuracy"] > 0.8  # the judge itself reads real digits
        assert (run / "quality_classifier.pkl").exists()
        grid = tmp_path / "grid.png"
        assert main(["sample", str(run), "--steps", "3", "--cfg", "2.0", "--out", str(grid), "--columns", "2"]) == 0
        assert grid.stat().st_size > 0
