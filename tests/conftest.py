"""Session fixtures for the test suite: offline tiny model pools built once per session."""

from __future__ import annotations

import os
import tempfile

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
# the conflict-analysis cache of this test run: never the user's ~/.cache/moerge
os.environ["MOERGE_ANALYSIS_CACHE"] = tempfile.mkdtemp(prefix="moerge-analysis-cache-")

from typing import Any

import pytest

from moerge.testing.tiny import make_pool


@pytest.fixture(scope="session")
def llama_pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Untied llama (hidden 32, 2 layers): base, expert_0, expert_1, lora_0 and data."""
    return make_pool(tmp_path_factory.mktemp("llama_pool"), family="llama", tie=False)


@pytest.fixture(scope="session")
def qwen2_pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Qwen2 with tied embeddings and q/k/v biases: base, expert_0, expert_1, lora_0 and data."""
    return make_pool(tmp_path_factory.mktemp("qwen2_pool"), family="qwen2", tie=True)


@pytest.fixture(scope="session")
def tied_llama_pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Llama with tied embeddings: base, expert_0, expert_1, lora_0 and data."""
    return make_pool(tmp_path_factory.mktemp("tied_llama_pool"), family="llama", tie=True)
