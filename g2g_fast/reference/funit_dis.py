"""FUNIT's discriminator (GPPatchMcResDis, SPEC §2) and its pre-activation residual block, on the
generator's `Conv2dBlock` (reference/funit.py)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .funit import Conv2dBlock, init_kaiming
from .ops import pixel_rows


class ActFirstResBlock(nn.Module):
    """FUNIT's pre-activation residual block (LeakyReLU 0.2, reflect padding, no norm).

    Reproduces the original in-place activation: with an identity shortcut the block returns
    lrelu(x) + residual(x) (FUNIT's in-place LeakyReLU rewrote x before the add); with a learned
    shortcut, conv_s sees the un-activated x.
    """

    block = Conv2dBlock  # the fast model's subclass swaps in its own

    def __init__(self, fin, fout):
        super().__init__()
        self.learned_shortcut = fin != fout
        fhid = min(fin, fout)
        self.conv_0 = self.block(fin, fhid, 3, 1, 1, act="lrelu", act_first=True)
        self.conv_1 = self.block(fhid, fout, 3, 1, 1, act="lrelu", act_first=True)
        if self.learned_shortcut:
            self.conv_s = self.block(fin, fout, 1, 1, act="none", bias=False)

    def forward(self, x):
        shortcut = self.conv_s(x) if self.learned_shortcut else F.leaky_relu(x, 0.2)
        return shortcut + self.conv_1(self.conv_0(x))


class Discriminator(nn.Module):
    """FUNIT's GPPatchMcResDis: a multi-class patch discriminator.

    `D(x, y)` returns `(resp, feat)`: resp (B, H/16, W/16) is the patch map of each sample's own
    class y[b]; feat = lrelu(cnn_f(x)) (B, 1024, H/16, W/16) are the features for feature matching
    (the original in-place LeakyReLU of cnn_c rewrote the returned features).
    """

    # The fast model's subclass swaps in its own (the pad has no parameters: same keys).
    block, res_block, pad, avg_pool = Conv2dBlock, ActFirstResBlock, nn.ReflectionPad2d, nn.AvgPool2d

    def __init__(self, num_classes: int, nf: int = 64, n_res_blks: int = 10):
        super().__init__()
        if n_res_blks % 2:
            raise ValueError(f"Discriminator: n_res_blks must be even, got {n_res_blks}")
        res = self.res_block
        layers = [self.block(3, nf, 7, 1, 3, act="none")]
        for _ in range(n_res_blks // 2 - 1):
            nf_out = min(nf * 2, 1024)
            layers += [res(nf, nf), res(nf, nf_out), self.pad(1), self.avg_pool(kernel_size=3, stride=2)]
            nf = nf_out
        nf_out = min(nf * 2, 1024)
        layers += [res(nf, nf), res(nf, nf_out)]
        self.cnn_f = nn.Sequential(*layers)
        self.cnn_c = nn.Sequential(self.block(nf_out, num_classes, 1, 1, act="lrelu", act_first=True))
        self.num_classes = num_classes
        init_kaiming(self)

    def forward(self, x, y):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"Discriminator: {x.shape[0]} images but {y.shape[0]} labels")
        feat = F.leaky_relu(self.cnn_f(x), 0.2)
        out = self.cnn_c[0].conv(feat)  # cnn_c's own LeakyReLU is the one applied to feat
        # Each sample's own class map. A gather rather than out[arange(B), y]: the same values and
        # gradients, but its backward is a scatter, where advanced indexing's is index_put_ with
        # accumulate, which syncs with the host on CUDA and so cannot be captured in a CUDA graph.
        B, _, H, W = out.shape
        rows = pixel_rows(out)
        if rows is not None:  # channels_last: the same gather on the (B, H*W, K) view (its backward
            # then writes a channels_last gradient; see pixel_rows)
            return rows.gather(2, y.view(B, 1, 1).expand(B, H * W, 1)).view(B, H, W), feat
        resp = out.gather(1, y.view(B, 1, 1, 1).expand(B, 1, H, W)).squeeze(1)
        return resp, feat
