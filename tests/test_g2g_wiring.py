"""G2G wiring (SPEC §1) with a test double whose decoder output reveals which codes it got."""
import pytest
import torch

from g2g_fast.reference.g2g import disassemble, g2g_forward, make_pairs
from g2g_fast.reference.losses import code_cycle


class TagModel:
    """Image channel 0 holds a content tag, channel 1 a class tag. The encoders read the tags and
    the decoder writes them back, so every output says which codes produced it. Counts calls."""

    def __init__(self):
        self.calls = {"content": 0, "class": 0, "decode": 0}

    def encode_content(self, x):
        self.calls["content"] += 1
        return x[:, 0:1].clone()

    def encode_class(self, x):
        self.calls["class"] += 1
        return x[:, 1, 0, 0].clone()

    def decode(self, content, class_code):
        self.calls["decode"] += 1
        return torch.cat([content, class_code[:, None, None, None].expand_as(content)], dim=1)


def tagged_batch(B):
    """Image i has content tag i and class tag 100 + i."""
    x = torch.zeros(B, 2, 3, 3)
    x[:, 0] = torch.arange(B, dtype=torch.float32)[:, None, None]
    x[:, 1] = 100 + torch.arange(B, dtype=torch.float32)[:, None, None]
    return x, torch.arange(B)


def tags(img):
    return img[:, 0, 0, 0].tolist(), img[:, 1, 0, 0].tolist()


def test_mixes_and_reconstructions_carry_the_right_codes():
    x, y = tagged_batch(6)
    x1, _, x2, _ = make_pairs(x, y, "halves")
    model = TagModel()
    o = g2g_forward(model, x1, x2, short=True)
    assert tags(o.m1) == ([0, 1, 2], [103, 104, 105])   # content of x1, class of x2
    assert tags(o.m2) == ([3, 4, 5], [100, 101, 102])   # content of x2, class of x1
    assert tags(o.r1) == tags(x1) and tags(o.r2) == tags(x2)
    assert tags(o.s1) == tags(x1) and tags(o.s2) == tags(x2)
    # Both stages batched: each encoder once per stage, the decoder once per stage.
    assert model.calls == {"content": 2, "class": 2, "decode": 2}


def test_reassembly_feeds_the_mixes():
    """r1 must be decoded from E_A(m1) and E_B(m2): break m1's content tag and r1 follows it."""
    x, y = tagged_batch(4)
    x1, _, x2, _ = make_pairs(x, y, "halves")

    class Corrupting(TagModel):
        def decode(self, content, class_code):
            out = super().decode(content, class_code)
            if self.calls["decode"] == 1:
                out[:, 0] += 1000  # stage 1 outputs only
            return out

    o = g2g_forward(Corrupting(), x1, x2)
    assert tags(o.r1)[0] == [1000, 1001] and tags(o.r1)[1] == [100, 101]
    assert tags(o.r2)[0] == [1002, 1003] and tags(o.r2)[1] == [102, 103]


def test_pairings():
    x, y = tagged_batch(6)
    x1, y1, x2, y2 = make_pairs(x, y, "halves")
    assert y1.tolist() == [0, 1, 2] and y2.tolist() == [3, 4, 5]
    x1, y1, x2, y2 = make_pairs(x, y, "chain")
    assert y1.tolist() == [0, 1, 2, 3, 4] and y2.tolist() == [1, 2, 3, 4, 5]
    o = disassemble(TagModel(), x1, x2)
    assert tags(o.m1) == ([0, 1, 2, 3, 4], [101, 102, 103, 104, 105])
    for bad in (3, 1):
        with pytest.raises(ValueError, match="even batch"):
            make_pairs(x[:bad], y[:bad])
    with pytest.raises(ValueError, match="pairing"):
        make_pairs(x, y, "triples")


def test_code_cycle_pairs_each_code_with_the_mix_that_carries_it():
    """Bug fix (SPEC §4): the content cycle compares E_A(x1) with E_A(m1), not m2. A perfectly
    disentangling model has zero cycle loss; the original pairing would not."""
    x, y = tagged_batch(6)
    x1, _, x2, _ = make_pairs(x, y, "halves")
    o = g2g_forward(TagModel(), x1, x2)
    content, klass = code_cycle(o)
    assert content.item() == 0 and klass.item() == 0
    original_content = torch.nn.functional.mse_loss(o.a1, o.am2) + torch.nn.functional.mse_loss(o.a2, o.am1)
    assert original_content.item() > 0
