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
