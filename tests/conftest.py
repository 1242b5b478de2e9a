"""Shared fixtures (the models and clips themselves are in tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import AllLayersNet, make_all_layers_net, make_clip


@pytest.fixture(scope="module")
def single_thread():
    """Run a module's small tensor work on one thread.

    The workloads are tiny, so a second thread buys nothing, while an OpenMP pool on a busy
    shared machine can make them tens of times slower. The previous setting is restored.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def all_layers_net() -> AllLayersNet:
    return make_all_layers_net()


@pytest.fixture
def clip() -> torch.Tensor:
    return make_clip()
