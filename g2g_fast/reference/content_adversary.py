"""An adversarial class classifier on the content code (issue 23; `content_adv_w` > 0).

What it is for: the content code E_A(x) should say nothing about x's class (the class code says
that), but nothing in G2G's objective keeps the class out of it, and a spatial content code that
draws the object's silhouette gives the class away (`leak_class_from_content_acc` 0.38-0.45 at the
demo, chance 0.125). The remedy of domain-adversarial training (Ganin & Lempitsky 2015), with the
"confusion" objective of Tzeng et al. 2015 for the encoder:

* the adversary A learns to tell the class from the content codes of the step's real images and
  of the last `content_adv_memory` images before them (cross-entropy, its own Adam, on codes
  detached from G), after G's update;
* G gets `content_adv_w` x the cross-entropy of A's prediction against the *uniform* distribution
  over the classes (least, ln C, when A cannot tell), through A with A's weights frozen. Unlike a
  reversed gradient, this is bounded below: G is pushed towards "A cannot tell", not towards
  "A is confidently wrong", which would itself tell the class.

A sees the code as the evaluation's leakage probe does (`g2g_fast.probes.code_features`): average-
pooled to at most 4x4, flattened and standardised per feature, here by the statistics of the
memory and the step's codes (detached), so the encoder cannot hide a direction by shrinking it.
`content_adv_hidden` 0 makes A linear (the probe's family); > 0 puts one ReLU layer of that width
in between.

What it cannot do: a min-max game makes the *current* A uncertain; an encoder may get there by
moving the class to directions A has not learnt yet rather than by dropping it, and a probe fitted
afresh afterwards (the evaluation's) then still reads it. On a toy linear encoder whose code keeps
a noise-free class signal this is what happens (A near chance, a fresh probe perfect), as Elazar &
Goldberg (EMNLP 2018) found for adversarial removal in text; what it does on the demo is measured
in docs/evaluation.md.

Plain PyTorch in fp32 (autocast off) on both backends: a few kFLOPs per image, nothing to fuse.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

POOL = 4  # as probes.code_features: what the leakage probe reads
EPS = 1e-5  # variance floor of the standardisation (a constant feature has no class to tell)


def pooled_size(image_size: int, n_downs_content: int) -> int:
    """Side of the pooled code: the content code's side (image_size / 2**n_downs), at most POOL."""
    return min(POOL, image_size >> n_downs_content)


class ContentAdversary(nn.Module):
    """(N, C, h, w) content codes -> (N, num_classes) logits.

    `memory` M > 0: the pooled codes and labels of the last M images seen (a ring buffer, saved
    with the module so that resume is exact). With the demo's batch of 8 images and 8 classes a
    step shows A about one image a class, too few to learn from or to standardise by; so A learns
    from the memory plus the step's codes each step, and the statistics that standardise the
    features are those of the same set (detached: G is judged on the step's codes alone)."""

    def __init__(self, channels: int, side: int, num_classes: int, hidden: int = 0, memory: int = 0):
        super().__init__()
        self.side, self.memory = side, memory
        dim = channels * side * side
        self.net = nn.Linear(dim, num_classes) if hidden == 0 else nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        if memory:
            self.register_buffer("mem_features", torch.zeros(memory, dim))
            self.register_buffer("mem_labels", torch.zeros(memory, dtype=torch.long))
            self.register_buffer("mem_count", torch.zeros((), dtype=torch.long))  # rows written so far

    def pooled(self, codes: torch.Tensor) -> torch.Tensor:
        # fp32 statistics whatever the step's precision (the engineering rules' reductions).
        # Flattened pixel-major (h, w, C): a view of a channels_last map, where a (C, h, w) flatten
        # would copy it to NCHW first; A's linear layer does not care about the order.
        return F.adaptive_avg_pool2d(codes.float(), self.side).permute(0, 2, 3, 1).flatten(1)

    def remembered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) in the memory (none without one, or before the first step)."""
        if not self.memory:
            weight = self.net.weight if isinstance(self.net, nn.Linear) else self.net[0].weight
            return weight.new_zeros(0, weight.shape[1]), torch.zeros(0, dtype=torch.long, device=weight.device)
        n = min(int(self.mem_count), self.memory)
        return self.mem_features[:n], self.mem_labels[:n]

    @staticmethod
    def standardize(f: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """f standardised per feature by the mean and spread of `ref` (two-pass)."""
        mean = ref.mean(0, keepdim=True)
        var = (ref - mean).square().mean(0, keepdim=True)
        return (f - mean) * torch.rsqrt(var + EPS)

    def features(self, codes: torch.Tensor) -> torch.Tensor:
        """The step's codes as A reads them: standardised by the memory and the step's codes."""
        f = self.pooled(codes)
        ref = torch.cat([self.remembered()[0], f.detach()])
        return self.standardize(f, ref.detach())

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        with torch.autocast(codes.device.type, enabled=False):
            return self.net(self.features(codes))

    def training_logits(self, codes: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A's own step: logits and labels of the memory and the step's (detached) codes, all
        standardised alike; then the step's codes go into the memory."""
        with torch.autocast(codes.device.type, enabled=False):
            f = self.pooled(codes.detach())
            mf, my = self.remembered()
            every, labels = torch.cat([mf, f]), torch.cat([my, y])
            logits = self.net(self.standardize(every, every))
        self.remember(f, y)
        return logits, labels

    @torch.no_grad()
    def remember(self, f: torch.Tensor, y: torch.Tensor) -> None:
        if not self.memory:
            return
        f, y = f[-self.memory:], y[-self.memory:]
        rows = (int(self.mem_count) + torch.arange(f.shape[0], device=f.device)) % self.memory
        self.mem_features[rows] = f
        self.mem_labels[rows] = y
        self.mem_count += f.shape[0]


def confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the prediction against the uniform distribution: ln C at best."""
    return -F.log_softmax(logits.float(), dim=1).mean()


def adversary_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(1) == y).float().mean()
