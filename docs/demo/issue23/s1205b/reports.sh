#!/bin/bash
# Issue 23's reports of 2026-12-05 (third session): the runs of jobs.txt (/tmp/e28/runs) linked into one
# folder per family, evaluated together by ablate (it finds them trained: same config and steps).
# The demo preset is the variant dec_norm_none; demo-paper (single-image class codes, r_w 3, FUNIT's
# decoder) is class_shots_0+r_w_3+dec_norm_in, the same settings as `--preset demo-paper` (scheme
# family only: the paper's shape-family runs were dropped for time).
cd /tmp/e28
export OMP_NUM_THREADS=1 PYTHONPATH=/work/main   # the committed code (its demo preset: 2400 steps)
link() { mkdir -p $2; cp -al $1 $2/; }   # link RUN_DIR rep/REPORT/VARIANT
PAPER=class_shots_0+r_w_3+dec_norm_in
for fam in scheme shape; do
  for s in 0 1 2; do
    link runs/$fam/demo/seed_$s rep/$fam/dec_norm_none
    [ -d runs/$fam/paper/seed_$s ] && link runs/$fam/paper/seed_$s rep/$fam/$PAPER
  done
done
A="python -m g2g_fast.ablate --steps 2400 --seeds 3"
$A --sweep dec_norm=none --sweep class_shots=0+r_w=3+dec_norm=in --out rep/scheme -- --preset demo > logs/rep_scheme.log 2>&1 &
$A --sweep dec_norm=none --out rep/shape -- --preset demo --synthetic-family shape > logs/rep_shape.log 2>&1 &
wait  # (run as two steps: the shape report while the paper's runs still trained; the scheme report,
      # on the then idle machine, with OMP_NUM_THREADS=2)
# the tables: python /work/main/docs/demo/issue23/s1205/summarize.py rep/scheme rep/shape
