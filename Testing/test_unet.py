import pytest
import torch

from CDMSegmentLib.core.unet import ConditionalUNet, UNetConfig, timestep_embedding

from conftest import TINY_UNET


@pytest.mark.parametrize("h, w", [(32, 32), (33, 31), (17, 40), (8, 8)])
def test_output_shape_equals_input_for_odd_sizes(h, w):
    net = ConditionalUNet(UNetConfig(**{**TINY_UNET.to_dict(), "in_channels": 2}))
    torch.nn.init.normal_(net.head[-1].weight)
    x = torch.randn(3, 2, h, w)
    out = net(x, torch.tensor([0, 5, 999]), net.class_embedding(torch.tensor([0, 1, 1])))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_class_embedding_reaches_the_output():
    torch.manual_seed(0)
    net = ConditionalUNet(TINY_UNET)
    torch.nn.init.normal_(net.head[-1].weight)
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([10])
    a = net(x, t, net.class_embedding(torch.tensor([0])))
    b = net(x, t, net.class_embedding(torch.tensor([1])))
    assert (a - b).abs().max() > 1e-4


def test_class_embedding_reaches_every_residual_block():
    net = ConditionalUNet(TINY_UNET)
    blocks = [m for m in net.modules() if m.__class__.__name__ == "ResBlock"]
    emb = net.class_embedding(torch.tensor([1])).detach().requires_grad_(True)
    net.head[-1].weight.data.normal_()
    net(torch.randn(1, 1, 16, 16), torch.tensor([3]), emb).sum().backward()
    assert len(blocks) == 2 * 1 + 2 + 2 * 1  # down levels, middle, up levels
    assert all(b.emb.weight.grad is not None and b.emb.weight.grad.abs().sum() > 0 for b in blocks)


def test_torchscript_matches_eager_and_exports_class_embedding():
    net = ConditionalUNet(TINY_UNET).eval()
    torch.nn.init.normal_(net.head[-1].weight)
    scripted = torch.jit.script(net)
    x, t = torch.randn(2, 1, 24, 24), torch.tensor([1, 2])
    emb = scripted.class_embedding(torch.tensor([0, 1]))
    assert torch.allclose(scripted(x, t, emb), net(x, t, emb), atol=1e-6)


def test_torch_export_traces_the_network():
    net = ConditionalUNet(TINY_UNET).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    emb = net.class_embedding(torch.tensor([0, 1])).detach()
    exported = torch.export.export(net, (x, t, emb))
    assert torch.allclose(exported.module()(x, t, emb), net(x, t, emb), atol=1e-6)


def test_timestep_embedding_shape_and_range():
    e = timestep_embedding(torch.tensor([0, 10, 999]), 16)
    assert e.shape == (3, 16)
    assert e.abs().max() <= 1.0
    assert torch.allclose(e[0, :8], torch.ones(8))  # cos(0) = 1
