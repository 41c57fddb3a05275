#!/bin/bash
# issue 23's reports: the finished runs copied into one folder per report, every run evaluated on the
# same held-out pairs (data seed 0, synthetic test split) with the same probes
set -e
export OMP_NUM_THREADS=1
R=/work/runs_exp
cd /work/main
for fam in scheme shape; do
  F=$R/final_$fam; rm -rf $F; mkdir -p $F
  cp -a $R/kshot_$fam/class_shots_0 $R/kshot_$fam/class_shots_4 $F/
  cp -a $R/rw10_$fam/r_w_10 "$F/class_shots_4+r_w_10"
  if [ $fam = shape ]; then rm -rf $F/*/seed_2; fi  # stopped for time: two seeds on the shape family
  C=$R/final_coco_$fam; rm -rf $C; mkdir -p $C/class_shots_0 $C/class_shots_4 "$C/class_shots_4+class_encoder_coco"
  for s in 0 1; do cp -a $R/kshot_$fam/class_shots_0/seed_$s $C/class_shots_0/; cp -a $R/kshot_$fam/class_shots_4/seed_$s $C/class_shots_4/
                   cp -a $R/coco_$fam/class_shots_4/seed_$s "$C/class_shots_4+class_encoder_coco/"; done
  A=$R/final_approaches_$fam; rm -rf $A; mkdir -p $A/funit2funit; cp -a $R/rw10_$fam/r_w_10/seed_* $A/funit2funit/; cp -a $R/cyc_$fam/cyclefunit $A/
done
( python -m g2g_fast.ablate --sweep class_shots=0,4 --sweep class_shots=4+r_w=10 --seeds 3 --out $R/final_scheme -- --preset demo-paper > $R/final_scheme.log 2>&1 ) &
( python -m g2g_fast.ablate --sweep class_shots=0,4 --sweep class_shots=4+r_w=10 --seeds 2 --out $R/final_shape -- --preset demo-paper --synthetic-family shape > $R/final_shape.log 2>&1 ) &
( python -m g2g_fast.ablate --sweep class_shots=0,4 --sweep class_shots=4+class_encoder=coco --seeds 2 --out $R/final_coco_scheme -- --preset demo-paper > $R/final_coco_scheme.log 2>&1 ) &
( python -m g2g_fast.ablate --sweep class_shots=0,4 --sweep class_shots=4+class_encoder=coco --seeds 2 --out $R/final_coco_shape -- --preset demo-paper --synthetic-family shape > $R/final_coco_shape.log 2>&1 ) &
( python -m g2g_fast.ablate --approaches --variants funit2funit,cyclefunit --seeds 3 --out $R/final_approaches_scheme -- --preset demo --set class_shots=4 > $R/final_approaches_scheme.log 2>&1 ) &
( python -m g2g_fast.ablate --approaches --variants funit2funit,cyclefunit --seeds 2 --out $R/final_approaches_shape -- --preset demo --set class_shots=4 --synthetic-family shape > $R/final_approaches_shape.log 2>&1 ) &
wait
