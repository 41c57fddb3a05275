"""The naive approach's networks (SPEC §5): symmetric BN encoders and a LORD-style AdaIN generator."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import adain_ref


def _check_size(image_size: int) -> None:
    if image_size % 32 or image_size < 32:
        raise ValueError(f"naive approach: image_size must be a multiple of 32 (>= 32), got {image_size}")


class NaiveEncoder(nn.Module):
    """3->32->64->128->256->512 stride-2 4x4 convs (no bias) + BN + LeakyReLU(0.2), then a conv
    whose kernel covers the remaining map (4 at 128 px, 2 at 64 px) to 256 + BN + LeakyReLU."""

    def __init__(self, image_size: int = 128, code_dim: int = 256, widths=(32, 64, 128, 256, 512)):
        super().__init__()
        _check_size(image_size)
        layers, cin = [], 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 4, 2, 1, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(0.2)]
            cin = w
        last_k = image_size // 2 ** len(widths)
        layers += [nn.Conv2d(cin, code_dim, last_k, 1, 0, bias=False), nn.BatchNorm2d(code_dim),
                   nn.LeakyReLU(0.2)]
        self.model = nn.Sequential(*layers)
        self.out_dim = code_dim

    def forward(self, x):
        return self.model(x).flatten(1)


class Modulation(nn.Module):
    """Per AdaIN layer a Linear(code -> 2 * channels); LORD reads the concatenation as
    (B, layers, channels, 2) with [..., 0] = bias and [..., 1] = weight."""

    def __init__(self, code_dim: int, n_layers: int, channels: int):
        super().__init__()
        self.n_layers, self.channels = n_layers, channels
        self.adain_per_layer = nn.ModuleList(nn.Linear(code_dim, 2 * channels) for _ in range(n_layers))

    def forward(self, code):
        params = torch.cat([f(code) for f in self.adain_per_layer], dim=-1)
        return params.reshape(-1, self.n_layers, self.channels, 2)


class LordGenerator(nn.Module):
    """LORD's generator: content code -> 3 Linear+lrelu(0.01) -> 256 x H/16 x W/16 -> 4 x [nearest
    up x2, conv3x3, lrelu, AdaIN(class code)] -> conv5x5 + lrelu -> conv7x7 -> tanh.

    The output ends in tanh because images are in [-1, 1] (the original's sigmoid could not
    produce dark pixels)."""

    def __init__(self, image_size: int = 128, code_dim: int = 256, channels: int = 256, n_adain: int = 4):
        super().__init__()
        _check_size(image_size)
        self.h0 = image_size // 16
        self.channels = channels
        hw = self.h0 * self.h0
        self.fc_layers = nn.Sequential(
            nn.Linear(code_dim, hw * 32), nn.LeakyReLU(0.01),
            nn.Linear(hw * 32, hw * 64), nn.LeakyReLU(0.01),
            nn.Linear(hw * 64, hw * channels), nn.LeakyReLU(0.01),
        )
        self.adain_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, 1, 1) for _ in range(n_adain))
        self.modulation = Modulation(code_dim, n_adain, channels)
        self.last_conv_layers = nn.Sequential(
            nn.Conv2d(channels, 64, 5, 1, 2), nn.LeakyReLU(0.01), nn.Conv2d(64, 3, 7, 1, 3),
        )

    def forward(self, content_code, class_code):
        x = self.grid(self.fc_layers(content_code).view(-1, self.channels, self.h0, self.h0))
        # One unbind of a 3-D view, then an index per layer: indexing the 4-D (B, layers, C, 2)
        # tensor per layer would give one zero-filled 4-D gradient per index in the backward.
        params = self.modulation(class_code)
        B, n, C, _ = params.shape
        bias, weight = (t.view(B, n, C) for t in params.reshape(B, n * C, 2).unbind(-1))
        for i, conv in enumerate(self.adain_convs):
            x = F.leaky_relu(conv(F.interpolate(x, scale_factor=2, mode="nearest")), 0.01)
            x = self.norm(x, weight[:, i], bias[:, i])  # AdaIN after the activation
        return torch.tanh(self.last_conv_layers(x))

    # What the fast model (g2g_fast.models.naive) replaces: the AdaIN op, and the layout of the
    # first feature map (the FC output read as NCHW).
    def norm(self, x, weight, bias):
        return adain_ref(x, weight, bias)

    def grid(self, x):
        return x


class NaiveModel(nn.Module):
    """E_A (content) and E_B (class), separate weights, same architecture, plus the generator."""

    generator_class = LordGenerator  # the fast model's subclass swaps in its own

    def __init__(self, image_size: int = 128, code_dim: int = 256, gen_channels: int = 256):
        super().__init__()
        self.enc_a = NaiveEncoder(image_size, code_dim)
        self.enc_b = NaiveEncoder(image_size, code_dim)
        self.gen = self.generator_class(image_size, code_dim, gen_channels)

    def encode_content(self, x):
        return self.enc_a(x)

    def encode_class(self, x):
        return self.enc_b(x)

    def decode(self, content, class_code):
        return self.gen(content, class_code)
