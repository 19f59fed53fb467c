"""Device choice and precision: auto says what it chose, a missing GPU or an unknown name is one sentence."""

import pytest
import torch

from CDMSegmentLib.core.device import autocast, choose_device, cpu_has_bf16
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


@pytest.mark.parametrize("flags, expected", [("fpu avx2 fma", False), ("fpu avx512f avx512_bf16", True),
                                             ("fpu amx_bf16 amx_tile", True)])
def test_bf16_units_are_read_from_the_cpu_flags(tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: {flags}\n")
    assert cpu_has_bf16(cpuinfo) is expected


def test_the_cdm_difference_is_taken_in_fp32_under_bf16_autocast():
    """Branches A and B differ by little; under autocast the network runs in bf16 but its output is cast back,
    so the DDIM step and the difference of the two branches stay fp32."""
    from CDMSegmentLib.core.cdm import cdm_heatmap
    from CDMSegmentLib.core.schedule import NoiseSchedule
    from CDMSegmentLib.core.unet import ConditionalUNet, UNetConfig

    net = ConditionalUNet(UNetConfig(base_channels=8, channel_mults=(1, 2), attention_levels=()))
    torch.nn.init.normal_(net.head[-1].weight, std=0.05)
    seen = []
    net.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    x_0 = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad(), autocast(torch.device("cpu"), "bf16"):
        h = cdm_heatmap(net, NoiseSchedule("linear", 1000), x_0, t_start=300, steps=2, tau=0.0,
                        noise=torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert seen == [torch.bfloat16, torch.bfloat16] and h.dtype == torch.float32
