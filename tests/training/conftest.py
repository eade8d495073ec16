"""The training tests compare quantized layers with the float arithmetic they are trained in
(fake quantization, trainable scales): they run the weight-only kernels (the default int8
activations for calls of 16 tokens or more round the activations too; tested in tests/nn and
tests/ops)."""
import pytest

import hfquant


@pytest.fixture(autouse=True)
def _weight_only():
    with hfquant.settings(int8_activations_min_m=None):
        yield
