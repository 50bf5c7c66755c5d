"""Shared test setup: offline Hugging Face, deterministic hypothesis in CI, paths to ../shared."""

import os
from pathlib import Path

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TINY_GPT2 = SHARED / "models" / "tiny-gpt2-shakespeare"
SHAKESPEARE = SHARED / "data" / "shakespeare"


@pytest.fixture(scope="session")
def tiny_gpt2_dir() -> Path:
    """../shared/models/tiny-gpt2-shakespeare, or skip when ../shared is absent."""
    if not (TINY_GPT2 / "model.safetensors").exists():
        pytest.skip("../shared/models/tiny-gpt2-shakespeare is not available")
    return TINY_GPT2


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """../shared/data/shakespeare, or skip when ../shared is absent."""
    if not (SHAKESPEARE / "val.txt").exists():
        pytest.skip("../shared/data/shakespeare is not available")
    return SHAKESPEARE
