"""Test-wide settings: nothing reaches the network, W&B stays offline, Dagster uses a temp home."""

import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ["WANDB_SILENT"] = "true"
os.environ.pop("WANDB_API_KEY", None)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: a second OpenMP thread turns others' load into stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
