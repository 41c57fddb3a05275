"""The reference AdaIN / instance norm (g2g_fast.reference.ops.adain_ref) against FUNIT's own
batch-norm formulation and nn.InstanceNorm2d."""
import pytest
import torch
import torch.nn.functional as F

from g2g_fast.reference.funit import Generator
from g2g_fast.reference.ops import adain_ref


def funit_adain(x, weight, bias, eps=1e-5):
    """FUNIT's AdaptiveInstanceNorm2d: batch_norm in training mode on a (1, B*C, H, W) view."""
    B, C, H, W = x.shape
    out = F.batch_norm(x.reshape(1, B * C, H, W), torch.zeros(B * C), torch.ones(B * C),
                       weight.reshape(-1), bias.reshape(-1), True, 0.1, eps)
    return out.view(B, C, H, W)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 8, 16, 16), (1, 4, 2, 1)])  # batch_norm refuses 1 value per channel; H=W=1 below
def test_adain_equals_batchnorm_formulation(shape):
    x = torch.randn(shape) * 3 + 1.5
    w, b = torch.randn(shape[:2]), torch.randn(shape[:2])
    torch.testing.assert_close(adain_ref(x, w, b), funit_adain(x, w, b), rtol=1e-5, atol=1e-5)


def test_affine_free_equals_instance_norm_and_act_residual():
    x = torch.randn(2, 5, 9, 7) * 2 - 1
    r = torch.randn_like(x)
    ref = F.instance_norm(x, eps=1e-5)
    torch.testing.assert_close(adain_ref(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adain_ref(x, act="relu", residual=r), F.relu(ref) + r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adain_ref(x, act="lrelu", slope=0.1), F.leaky_relu(ref, 0.1), rtol=1e-5, atol=1e-5)
    w = torch.randn(5)
    torch.testing.assert_close(adain_ref(x, w), ref * w[None, :, None, None], rtol=1e-5, atol=1e-5)


def test_generator_uses_instance_statistics_in_train_and_eval():
    g = Generator(nf=8, nf_mlp=16, latent_dim=4)
    x = torch.randn(3, 3, 32, 32)
    buffers = {k: v.clone() for k, v in g.state_dict().items() if "running" in k}
    y_train = g(x, x.flip(0))
    y_eval = g.eval()(x, x.flip(0))
    torch.testing.assert_close(y_train, y_eval, rtol=0, atol=0)
    for k, v in buffers.items():  # FUNIT's AdaIN buffers exist but are never updated or read
        torch.testing.assert_close(g.state_dict()[k], v, rtol=0, atol=0)


def test_constant_plane_gives_bias_not_nan():
    x = torch.full((2, 3, 4, 4), 7.0)  # zero variance: eps keeps it finite
    w, b = torch.randn(2, 3), torch.randn(2, 3)
    y = adain_ref(x, w, b)
    torch.testing.assert_close(y, b[:, :, None, None].expand_as(y))


def test_keeps_channels_last_and_dtype():
    x = torch.randn(2, 6, 5, 5).to(memory_format=torch.channels_last).to(torch.bfloat16)
    y = adain_ref(x, act="relu")
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)


def test_bad_arguments_are_named():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="weight"):
        adain_ref(x, torch.randn(3, 2))
    with pytest.raises(ValueError, match="act"):
        adain_ref(x, act="gelu")
    with pytest.raises(ValueError, match="residual"):
        adain_ref(x, residual=torch.randn(2, 3, 4, 5))
