import pytest
import torch

from _devices import DEVICES, cuda_skip_reason


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda(sm=80): needs a CUDA GPU of compute capability sm/10 or newer and "
                                       "hfquant built with CUDA kernels; skipped otherwise, with the reason")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark in item.iter_markers("cuda"):
            why = cuda_skip_reason(mark.kwargs.get("sm", 80))
            if why:
                item.add_marker(pytest.mark.skip(reason=why))
                break


@pytest.fixture(params=DEVICES)
def device(request):
    """The device a test runs on: "cpu", and "cuda" where a usable GPU is present (skipped
    otherwise, with the reason). tests/ops/conftest.py pairs it with each device's kernel paths."""
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model_dir():
    from hfquant import data

    return str(data.default_model_dir("float32"))


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def wikitext():
    from hfquant import data

    return data.wikitext_test()
