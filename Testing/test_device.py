"""Device choice and precision: auto says what it chose, a missing GPU or an unknown name is one sentence."""

import pytest
import torch

from CDMSegmentLib.core.device import autocast, choose_device
from CDMSegmentLib.core.errors import CDMSegmentError

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")


@needs_no_cuda
def test_auto_falls_back_to_the_cpu_and_says_so():
    said = []
    assert choose_device("auto", said.append) == torch.device("cpu")
    assert said == ["device: CPU (no CUDA GPU found)"]


@needs_no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_one_sentence_with_what_to_do(name):
    with pytest.raises(CDMSegmentError, match="no usable CUDA GPU; choose the CPU"):
        choose_device(name)


@pytest.mark.parametrize("name", ["gpu", "mps0", ""])
def test_an_unknown_device_names_the_choices(name):
    with pytest.raises(CDMSegmentError, match="use auto, cpu or cuda"):
        choose_device(name)


def test_fp32_adds_no_autocast_and_bf16_computes_in_bf16_on_the_cpu():
    x = torch.ones(2, 2)
    with autocast(torch.device("cpu"), "fp32"):
        assert (x @ x).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16
