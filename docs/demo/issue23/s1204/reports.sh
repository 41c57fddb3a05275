#!/bin/bash
# The issue-23 reports of 2026-12-04: the trained runs linked into one folder per comparison and
# evaluated together (ablate finds them trained: same settings and steps). Run from /tmp/e25, whose
# code is the commit's but for options.py, from before the demo preset adopted dec_norm=none.
cd /tmp/e25
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/e25
link() { # link FAMILY_DIR REPORT VARIANT...
  src=$1; rep=$2; shift 2
  for v in "$@"; do mkdir -p runs/$rep/$v; for s in runs/$src/$v/seed_*; do cp -al $s runs/$rep/$v/; done; done
}
rm -rf runs/rep_*
link scheme rep_scheme3 class_shots_4 dec_norm_none
link shape rep_shape3 class_shots_4 dec_norm_none
mkdir -p runs/rep_scheme1 runs/rep_shape1
for v in class_shots_4 dec_norm_none nf_16 content_adv_w_1+content_adv_memory_512 dec_norm_none+content_adv_w_1; do
  mkdir -p runs/rep_scheme1/$v; cp -al runs/scheme/$v/seed_0 runs/rep_scheme1/$v/; done
for v in class_shots_4 dec_norm_none dec_norm_none+content_adv_w_1; do
  mkdir -p runs/rep_shape1/$v; cp -al runs/shape/$v/seed_0 runs/rep_shape1/$v/; done
mkdir -p runs/rep_shape1/nf_16; cp -al runs/nf16_shape/nf_16/seed_0 runs/rep_shape1/nf_16/
A="python -m g2g_fast.ablate"
( $A --sweep class_shots=4 --sweep dec_norm=none --seeds 3 --out runs/rep_scheme3 -- --preset demo > logs/rep_scheme3.log 2>&1
  $A --sweep class_shots=4 --sweep dec_norm=none --sweep nf=16 --sweep content_adv_w=1+content_adv_memory=512 \
     --sweep dec_norm=none+content_adv_w=1 --seeds 1 --out runs/rep_scheme1 -- --preset demo > logs/rep_scheme1.log 2>&1 ) &
( $A --sweep class_shots=4 --sweep dec_norm=none --seeds 3 --out runs/rep_shape3 -- --preset demo --synthetic-family shape > logs/rep_shape3.log 2>&1
  $A --sweep class_shots=4 --sweep dec_norm=none --sweep nf=16 --sweep dec_norm=none+content_adv_w=1 --seeds 1 \
     --out runs/rep_shape1 -- --preset demo --synthetic-family shape > logs/rep_shape1.log 2>&1 ) &
wait
