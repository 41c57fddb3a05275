"""Frozen pretrained networks of CycleFUNIT: the VGGFace2 identity encoder and VGG16 relu2_2.

Weight files are synthesised here in the public layouts (built independently of the modules under
test), so the tests check that such files load strictly and that the networks compute what §4 says.
"""

import pytest
import torch
import torch.nn.functional as F

from fakes import big_zeros, resnet50_ft_shapes
from g2g_fast.reference.identity import IdentityEncoder
from g2g_fast.reference.weights import read_state_dict
from g2g_fast.reference.vgg import VGGPerceptual, perceptual_l1

# Written out here rather than imported, so a wrong constant in the modules is caught.
VGGFACE2_MEAN = torch.tensor([131.0912, 103.8827, 91.4953]).view(1, 3, 1, 1)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def encoder(id_file):
    """Loaded once: the tests below only run it (hooks they add are removed again)."""
    return IdentityEncoder.from_file(id_file[0])


def test_resnet50_ft_layout_has_320_entries():
    assert len(resnet50_ft_shapes()) == 320


def test_identity_loads_and_encodes(encoder, id_file):
    state = id_file[1]
    sd = encoder.state_dict()
    assert not any(k.startswith("classifier") for k in sd)
    assert len(sd) == 318
    for key in ("conv5_3_1x1_increase.weight", "conv4_2_3x3_bn.running_var"):
        torch.testing.assert_close(sd[key], state[key])

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = encoder(x)
    assert out.shape == (2, encoder.out_dim) == (2, 2048)
    assert torch.isfinite(out).all()
    assert out.std() > 0


def test_read_state_dict_unwraps(tmp_path):
    inner = {"conv1_7x7_s2.weight": torch.randn(2, 3)}
    for name, saved in (("plain.pth", inner), ("wrapped.pth", {"state_dict": inner, "epoch": 3})):
        torch.save(saved, tmp_path / name)
        loaded = read_state_dict(tmp_path / name)
        assert list(loaded) == list(inner)
        torch.testing.assert_close(loaded["conv1_7x7_s2.weight"], inner["conv1_7x7_s2.weight"])
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth"):
        read_state_dict(tmp_path / "list.pth")


def test_identity_strides_and_ceil_pool(encoder):
    """Spatial sizes pin the strides (in block 1's 1x1_reduce) and the ceil-mode max-pool."""
    sizes = {}
    names = ("conv2_1_1x1_reduce", "conv3_1_1x1_reduce", "conv4_1_1x1_reduce",
             "conv5_1_1x1_reduce", "conv5_1_3x3", "conv5_1_1x1_proj")
    hooks = [getattr(encoder, name).register_forward_hook(
        lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape[-2:]))) for name in names]
    try:
        encoder(torch.zeros(1, 3, 224, 224))
    finally:
        for h in hooks:
            h.remove()
    # 112 -> max-pool 3x3 s2: ceil gives 56, floor would give 55.
    assert sizes["conv2_1_1x1_reduce"] == (56, 56)
    assert sizes["conv3_1_1x1_reduce"] == (28, 28)
    assert sizes["conv4_1_1x1_reduce"] == (14, 14)
    for name in ("conv5_1_1x1_reduce", "conv5_1_3x3", "conv5_1_1x1_proj"):
        assert sizes[name] == (7, 7)


def test_identity_preprocessing(encoder):
    x = torch.full((1, 3, 32, 48), 0.2)
    pre = encoder.preprocess(x)
    assert pre.shape == (1, 3, 224, 224)
    expected = 1.2 * 127.5 - VGGFACE2_MEAN
    torch.testing.assert_close(pre, expected.expand_as(pre))
    # Non-224 inputs are resized bilinearly (align_corners=False) before the network.
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    resized = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    torch.testing.assert_close(encoder(x), encoder(resized))
    assert "mean_rgb" not in encoder.state_dict()


def resnet50_ft_functional(state, x):
    """Independent forward of the resnet50_ft trunk from a state dict (input preprocessed)."""
    def conv_bn(name, h, stride=1, padding=0):
        h = F.conv2d(h, state[f"{name}.weight"], stride=stride, padding=padding)
        bn = {k: state[f"{name}_bn.{k}"] for k in ("running_mean", "running_var", "weight", "bias")}
        return F.batch_norm(h, **bn, training=False, eps=1e-5)

    h = F.relu(conv_bn("conv1_7x7_s2", x, stride=2, padding=3))
    h = F.max_pool2d(h, 3, stride=2, ceil_mode=True)
    for stage, blocks in ((2, 3), (3, 4), (4, 6), (5, 3)):
        for b in range(1, blocks + 1):
            p = f"conv{stage}_{b}"
            stride = 2 if b == 1 and stage > 2 else 1
            y = F.relu(conv_bn(f"{p}_1x1_reduce", h, stride=stride))
            y = F.relu(conv_bn(f"{p}_3x3", y, padding=1))
            y = conv_bn(f"{p}_1x1_increase", y)
            h = F.relu(y + (conv_bn(f"{p}_1x1_proj", h, stride=stride) if b == 1 else h))
    return F.avg_pool2d(h, 7, stride=1).flatten(1)


def test_identity_matches_functional_reference(encoder, id_file):
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(4)) * 2 - 1
    expected = resnet50_ft_functional(id_file[1], (x + 1) * 127.5 - VGGFACE2_MEAN)
    torch.testing.assert_close(encoder(x), expected)


def test_identity_frozen_eval_and_input_gradient(encoder):
    encoder.train()
    assert not any(m.training for m in encoder.modules())
    assert not encoder.conv3_2_3x3_bn.training
    assert not any(p.requires_grad for p in encoder.parameters())

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    x.requires_grad_()
    out = encoder(x)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in encoder.parameters())
    # Eval mode: BatchNorm uses running stats, so each sample's code is independent of the batch.
    torch.testing.assert_close(encoder(x[:1]), out[:1].detach())


@pytest.mark.parametrize("corruption", ["rename", "reshape"])
def test_identity_wrong_file_raises(tmp_path, corruption):
    # Only keys and shapes are checked before loading, so all-zero tensors suffice (and are fast).
    state = {k: big_zeros(*shape) for k, shape in resnet50_ft_shapes().items()}
    if corruption == "rename":
        state["conv3_2_3x3.weigth"] = state.pop("conv3_2_3x3.weight")
        bad_keys = ["conv3_2_3x3.weight", "conv3_2_3x3.weigth"]
    else:
        state["conv4_1_1x1_proj.weight"] = torch.zeros(1024, 512, 3, 3)
        bad_keys = ["conv4_1_1x1_proj.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        IdentityEncoder.from_file(path)
    assert str(path) in str(err.value)
    for key in bad_keys:
        assert key in str(err.value)


def test_vgg_loads_and_matches_manual_relu2_2(vgg_file):
    path, state = vgg_file
    vgg = VGGPerceptual.from_file(path)
    assert sorted(vgg.state_dict()) == sorted(f"features.{i}.{p}" for i in (0, 2, 5, 7)
                                              for p in ("weight", "bias"))
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    out = vgg(x)
    assert out.shape == (2, 128, 16, 24)

    h = ((x + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD
    for idx in (0, 2, 5, 7):
        if idx == 5:
            h = F.max_pool2d(h, 2)
        weight, bias = state[f"features.{idx}.weight"], state[f"features.{idx}.bias"]
        h = F.relu(F.conv2d(h, weight, bias, padding=1))
    torch.testing.assert_close(out, h)


def test_vgg_frozen_and_normalisation(vgg_file):
    vgg = VGGPerceptual.from_file(vgg_file[0])
    vgg.train()
    assert not any(m.training for m in vgg.modules())
    assert not any(p.requires_grad for p in vgg.parameters())
    assert len(vgg.state_dict()) == 8  # mean/std buffers are not persistent

    # A [-1, 1] image whose [0, 1] value is the ImageNet mean normalises to 0; mean + std to 1.
    at_mean = (IMAGENET_MEAN * 2 - 1).expand(1, 3, 4, 4)
    torch.testing.assert_close(vgg.normalize(at_mean), torch.zeros(1, 3, 4, 4))
    one_std = ((IMAGENET_MEAN + IMAGENET_STD) * 2 - 1).expand(1, 3, 4, 4)
    torch.testing.assert_close(vgg.normalize(one_std), torch.ones(1, 3, 4, 4))


@pytest.mark.parametrize("corruption", ["missing", "reshape"])
def test_vgg_wrong_file_raises(vgg_file, tmp_path, corruption):
    state = dict(vgg_file[1])
    if corruption == "missing":
        del state["features.5.weight"]
        bad_key = "features.5.weight"
    else:
        state["features.7.bias"] = torch.zeros(64)
        bad_key = "features.7.bias"
    path = tmp_path / "bad_vgg.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as err:
        VGGPerceptual.from_file(path)
    assert str(path) in str(err.value) and bad_key in str(err.value)


def test_perceptual_l1(vgg_file):
    vgg = VGGPerceptual.from_file(vgg_file[0])
    gen = torch.Generator().manual_seed(6)
    a = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    b = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    torch.testing.assert_close(perceptual_l1(None, a, b), (a - b).abs().mean())
    assert perceptual_l1(vgg, a, a).item() == 0
    loss = perceptual_l1(vgg, a, b)
    torch.testing.assert_close(loss, (vgg(a) - vgg(b)).abs().mean())
    assert loss > 0
