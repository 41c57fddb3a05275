#!/bin/bash
# Issue 23's reports of 2026-12-04 (second session): trained runs (/tmp/e25: the first session's,
# /tmp/e26: this one's, both trained by `python -m g2g_fast.train ... --preset demo` as in worker.sh)
# linked into one folder per comparison and evaluated together by ablate (it finds them trained).
cd /tmp/e26
export OMP_NUM_THREADS=1 PYTHONPATH=/tmp/e26
link() { mkdir -p $2; cp -al $1 $2/; }   # link RUN_DIR rep/REPORT/VARIANT
rm -rf rep
for fam in scheme shape; do
  for s in 0 1 2; do
    link /tmp/e25/runs/$fam/dec_norm_none/seed_$s rep/${fam}3/dec_norm_none
    link /tmp/e25/runs/$fam/class_shots_4/seed_$s rep/${fam}3/dec_norm_in
    link /tmp/e25/runs/$fam/dec_norm_none/seed_$s rep/approaches_$fam/funit2funit
    link runs/approaches_$fam/cyclefunit/seed_$s rep/approaches_$fam/cyclefunit
  done
  link /tmp/e25/runs/$fam/dec_norm_none+content_adv_w_1/seed_0 rep/${fam}3/content_adv_w_1
  for s in 1 2; do link runs/$fam/dec_norm_none+content_adv_w_1/seed_$s rep/${fam}3/content_adv_w_1; done
  link /tmp/e25/runs/$fam/dec_norm_none/seed_0 rep/${fam}1/dec_norm_none
done
for s in 0 1 2; do link runs/naive_shape/naive/seed_$s rep/naive_shape/naive; done
link runs/scheme/dec_norm_none+content_adv_w_3/seed_0 rep/scheme1/content_adv_w_3
link runs/scheme/dec_norm_none+n_downs_content_1/seed_0 rep/scheme1/n_downs_content_1
link runs/shape/dec_norm_none+n_downs_content_3/seed_0 rep/shape1/n_downs_content_3
link runs/shape/dec_norm_none+n_downs_content_1/seed_0 rep/shape1/n_downs_content_1
link runs/shape/dec_norm_none+content_dim_0/seed_0 rep/shape1/content_dim_0
A="python -m g2g_fast.ablate"
S="--synthetic-family shape"
( $A --sweep dec_norm=none,in --sweep content_adv_w=1 --seeds 3 --out rep/scheme3 -- --preset demo > logs/rep_scheme3.log 2>&1
  $A --sweep dec_norm=none --sweep content_adv_w=3 --sweep n_downs_content=1 --seeds 1 --out rep/scheme1 -- --preset demo > logs/rep_scheme1.log 2>&1
  $A --approaches --variants funit2funit,cyclefunit --seeds 3 --out rep/approaches_scheme -- --preset demo --set class_shots=4 --set dec_norm=none > logs/rep_app_scheme.log 2>&1 ) &
( $A --sweep dec_norm=none,in --sweep content_adv_w=1 --seeds 3 --out rep/shape3 -- --preset demo $S > logs/rep_shape3.log 2>&1
  $A --sweep dec_norm=none --sweep n_downs_content=3,1 --sweep content_dim=0 --seeds 1 --out rep/shape1 -- --preset demo $S > logs/rep_shape1.log 2>&1
  $A --approaches --variants funit2funit,cyclefunit --seeds 3 --out rep/approaches_shape -- --preset demo --set class_shots=4 --set dec_norm=none $S > logs/rep_app_shape.log 2>&1
  $A --approaches --variants naive --seeds 3 --out rep/naive_shape -- --preset demo $S > logs/rep_naive_shape.log 2>&1 ) &
wait
# The 2026-12-03 reports whose runs were not kept, with the seed 2 runs of jobs.txt added (each
# evaluated by `python -m g2g_fast.evaluate` with the report's seeds; ablate's report code recomputes):
D=/work/main/docs/demo/issue23; AS="python $D/s1205/add_seed.py"
$AS $D/coco_scheme/ablation.json rep/coco_scheme "class_shots_4+class_encoder_coco=runs/old_scheme/class_shots_4+class_encoder_coco/seed_2"
$AS $D/shape/ablation.json rep/shape_old "class_shots_0=runs/old_shape/class_shots_0/seed_2" "class_shots_4=runs/old_shape/class_shots_4/seed_2" "class_shots_4+r_w_10=/tmp/e25/runs/shape/class_shots_4/seed_2"
$AS $D/coco_shape/ablation.json rep/coco_shape "class_shots_0=runs/old_shape/class_shots_0/seed_2" "class_shots_4=runs/old_shape/class_shots_4/seed_2" "class_shots_4+class_encoder_coco=runs/old_shape/class_shots_4+class_encoder_coco/seed_2"
