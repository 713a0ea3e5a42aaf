"""Test set-up: 8 simulated CPU devices, quiet TensorFlow, a private cache directory."""

import os
import tempfile

# Before JAX is imported anywhere: the tests run on a simulated 8-device CPU mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("FLANJAX_CACHE", tempfile.mkdtemp(prefix="flanjax-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from flanjax.quiet import quiet_libraries  # noqa: E402

quiet_libraries()  # as the command line does, before TensorFlow loads

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


def pytest_configure(config):
    # Templated tasks (FLAN's, the README's) tokenize with the default vocabulary: point it at
    # the quickstart's byte-level BPE, trained on the spot (any text encodes).
    if "FLANJAX_TOKENIZER" not in os.environ:
        import tasks.quickstart

        os.environ["FLANJAX_TOKENIZER"] = tasks.quickstart.tokenizer_dir()
