import os
import sys
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
# one intra-op thread per xdist worker on this 2-core machine: oversubscribed OpenMP threads
# spin against each other and slow small tensor operations several-fold
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _WORKERS))

import builders  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    """Figures are registered with pyplot (so plt.savefig works after res.plot()); close
    them after each test so a long run does not hold hundreds open."""
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="session")
def pythia_dir(tmp_path_factory) -> Path:
    """A pythia-70m-shaped GPT-NeoX (random weights, seed 0) saved with save_pretrained."""
    return builders.save_pythia_like(tmp_path_factory.mktemp("pythia70m_random"))


@pytest.fixture(scope="session")
def pythia(pythia_dir):
    import hookscope as hs

    return hs.HookedModel.from_pretrained(str(pythia_dir))


@pytest.fixture(scope="session")
def pythia_hf(pythia_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(pythia_dir)).eval()


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50304, (2, 9), generator=g)
