import pytest
import torch

from loopdb.config import DiffusionConfig, ModelConfig
from loopdb.looped import LoopedLM

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


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(autouse=True)
def _no_threads_fight():
    torch.set_num_threads(min(2, torch.get_num_threads()))
