"""Synthetic weight files in the public layouts (built independently of the modules under test)."""
import torch


def resnet50_ft_shapes():
    """Key -> shape of the public `resnet50_ft` state dict, written out from its layout."""
    shapes = {}

    def conv_bn(name, cin, cout, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}_bn.{suffix}"] = (cout,)
        shapes[f"{name}_bn.num_batches_tracked"] = ()

    conv_bn("conv1_7x7_s2", 3, 64, 7)
    cin = 64
    for stage, blocks, width in ((2, 3, 64), (3, 4, 128), (4, 6, 256), (5, 3, 512)):
        for b in range(1, blocks + 1):
            conv_bn(f"conv{stage}_{b}_1x1_reduce", cin, width, 1)
            conv_bn(f"conv{stage}_{b}_3x3", width, width, 3)
            conv_bn(f"conv{stage}_{b}_1x1_increase", width, 4 * width, 1)
            if b == 1:
                conv_bn(f"conv{stage}_{b}_1x1_proj", cin, 4 * width, 1)
            cin = 4 * width
    shapes["classifier.weight"] = (8631, 2048, 1, 1)
    shapes["classifier.bias"] = (8631,)
    return shapes


def random_state(shapes, gen):
    """Random weights that keep activations O(1) through 50 layers (finite, non-degenerate)."""
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7, dtype=torch.int64)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("_bn.weight"):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 4:
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=gen) * fan_in ** -0.5
        else:  # BN bias / running_mean, classifier bias
            state[key] = 0.1 * torch.randn(shape, generator=gen)
    return state


def big_zeros(*shape):
    """Zeros expanded from a single element: the right shape, but one element on disk."""
    return torch.zeros(()).expand(shape)


VGG16_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256),
               12: (256, 256), 14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512),
               24: (512, 512), 26: (512, 512), 28: (512, 512)}


def vgg16_state(gen):
    """A full torchvision vgg16 state dict; layers past relu2_2 are (tiny on disk) zeros."""
    state = {}
    for idx, (cin, cout) in VGG16_CONVS.items():
        if idx <= 7:
            weight = torch.randn(cout, cin, 3, 3, generator=gen) * (9 * cin) ** -0.5
            state[f"features.{idx}.weight"] = weight
            state[f"features.{idx}.bias"] = 0.1 * torch.randn(cout, generator=gen)
        else:
            state[f"features.{idx}.weight"] = big_zeros(cout, cin, 3, 3)
            state[f"features.{idx}.bias"] = big_zeros(cout)
    for idx, (fin, fout) in {0: (25088, 4096), 3: (4096, 4096), 6: (4096, 1000)}.items():
        state[f"classifier.{idx}.weight"] = big_zeros(fout, fin)
        state[f"classifier.{idx}.bias"] = big_zeros(fout)
    return state
