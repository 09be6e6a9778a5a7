import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# the CPU fast paths without measuring them first (tests check numbers, not speed; test_cpu_fastpath.py
# tests the measuring itself)
os.environ.setdefault("FOCALNET_PL_CPU_FASTPATH", "on")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Many small ops: one intra-op thread is fastest, and robust on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
