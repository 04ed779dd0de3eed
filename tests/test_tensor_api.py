"""The shared tensor API holds on every backend (see hyper_parallel/tensor_api.py)."""

import pytest

from hyper_parallel.tensor_api import SHARED_TENSOR_METHODS
from tests.cases import tensor_api_cases as tc


@pytest.mark.backends("torch", "mindspore")
def test_every_shared_method_on_every_backend(worlds, backend):
    assert worlds.run(backend, 2, tc.every_shared_method) == [len(SHARED_TENSOR_METHODS)] * 2
