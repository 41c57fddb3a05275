"""Is the shape family's swap at chance because of the class probe? (issue 23, 2026-12-04)

`evaluate`'s class probe (probes.py: 300 Adam steps on the 2048 training images) classifies real
held-out images of the shape family at only 0.38 (scheme family: 1.00), so swap accuracy there can
never reach the 0.8 target. This script trains a stronger probe once (8192 training-split images,
random 90-degree rotations and flips, which keep the shape class; 4000 steps: 0.87 on the held-out
images) and scores the mixes (and the short reconstructions) of the runs given, on the pairs
`evaluate` uses (data seed 0, test split, K-shot 4 class codes for FUNIT generators):

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/demo/issue23/s1205/check_shape_swap.py RUN_DIR ...

Measured (the runs of reports.sh): swap 0.13-0.19 and short reconstructions classified at
0.15-0.30 for every FUNIT2FUNIT setting and CycleFUNIT: with a probe that reads the shape, the
generators still do not draw the class's outline, even from an image's own codes.
"""
import math
import os
import sys

import torch
import torch.nn.functional as F
from g2g_fast.evaluate import prepare_data
from g2g_fast import probes as P
from g2g_fast import metrics as M
from g2g_fast.reference.g2g import mean_class_code
from g2g_fast.translate import load_generator
from types import SimpleNamespace
path = os.path.join(os.environ.get('TMPDIR', '/tmp'), 'g2g_shape_probe.pt')
train, held, nc, ident, where = prepare_data('synthetic', image_size=32, seed=0, synthetic_family='shape', heldout_split='test')
if not os.path.exists(path):
    big, _, _, _, _ = prepare_data('synthetic', image_size=32, seed=0, synthetic_family='shape', heldout_split='test', synthetic_per_class=1024, probe_train=8192)
    x, y = big.x, big.y
    gen = torch.Generator().manual_seed(0); torch.manual_seed(0); probe = P.ImageProbe(nc)
    opt = torch.optim.Adam(probe.parameters(), lr=P.PROBE_LR); steps = 4000
    n = len(x); order, pos = torch.randperm(n, generator=gen), 0
    for step in range(steps):
        if pos + 64 > n: order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + 64]; pos += 64
        xb = torch.rot90(x[idx], int(torch.randint(4, (1,), generator=gen)), (2, 3))
        if torch.rand(1, generator=gen).item() < 0.5: xb = xb.flip(3)
        loss = F.cross_entropy(probe(xb), y[idx]); opt.zero_grad(); loss.backward(); opt.step()
        for g in opt.param_groups: g["lr"] = P.PROBE_LR * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
    torch.save(probe.state_dict(), path)
probe = P.ImageProbe(nc); probe.load_state_dict(torch.load(path, weights_only=True)); probe.eval()
print('probe held acc', (probe.predict(held.x).argmax(1) == held.y).float().mean().item())
i1, i2 = M.pair_indices(held.y, 256, 0); s1, s2 = held.subset(i1), held.subset(i2)
for run in sys.argv[1:]:
    gen, _ = load_generator(SimpleNamespace(funit=None, checkpoint=run + '/checkpoints/last.pt', raw=False, image_size=None))
    _, codes = M.encode_all(gen, held.x, 64)
    cc = None
    if hasattr(gen, 'enc_class_model'):
        cc = tuple(mean_class_code(codes[M.kshot_indices(held.y, i, 4, 0 + j)]) for j, i in enumerate((i1, i2)))
    out = M.run_pairs(gen, s1.x, s2.x, 32, 'cpu', cc)
    p1, p2 = probe.predict(out['m1']).argmax(1), probe.predict(out['m2']).argmax(1)
    ps = probe.predict(out['s1']).argmax(1)
    swap = ((p1 == s2.y).float().mean() + (p2 == s1.y).float().mean()).item() / 2
    kept = ((p1 == s1.y).float().mean() + (p2 == s2.y).float().mean()).item() / 2
    print(run, 'swap %.3f kept %.3f short-recon acc %.3f' % (swap, kept, (ps == s1.y).float().mean().item()), flush=True)
