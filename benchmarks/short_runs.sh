#!/bin/bash
# Short trainings of the shipped toy / digits configs with the code in SRC_DIR (a checkout or a
# `git worktree add` of another commit), written to OUT_DIR. Run it for two commits and compare every
# safetensors file under the two OUT_DIRs bitwise: a refactor that must change no number leaves them equal.
#   usage: benchmarks/short_runs.sh SRC_DIR OUT_DIR
SRC=$1; OUT=$2
F="train.progress_bar=false train.report_to=none train.checkpointing_steps=1000 eval.enabled=false"
run() { name=$1; shift; (cd $SRC && PYTHONPATH=$SRC HF_HUB_OFFLINE=1 python -m distill train "$@" $F output_dir=$OUT/$name > $OUT/$name.log 2>&1) || echo "FAIL $name"; }
mkdir -p $OUT
run sim_g8 configs/sim_gaussians8.yaml train.max_steps=20
run sim_g8_cond configs/sim_gaussians8.yaml train.max_steps=20 teacher.conditional=true teacher.guidance_scale=2.5 sim.init_denoiser_steps=5
run ui_g8 configs/uni_instruct_gaussians8.yaml train.max_steps=20
run prog_g8 configs/progressive_gaussians8.yaml progressive.start_steps=4 progressive.steps_per_round=3 progressive.init_denoiser_steps=5
run guided_g8 configs/guided_gaussians8.yaml guided.start_steps=4 guided.steps_per_round=3 guided.init_denoiser_steps=5 guided.stage_one_steps=3
run sim_digits configs/sim_digits.yaml train.max_steps=6 train.batch_size=8
run ui_digits configs/uni_instruct_digits.yaml train.max_steps=6 train.batch_size=8
run prog_digits configs/progressive_digits.yaml progressive.start_steps=4 progressive.steps_per_round=2 train.batch_size=8
run teacher_cond configs/teacher_digits_cond.yaml train.max_steps=6 train.batch_size=8
run msd_g8 configs/msd_gaussians8.yaml train.max_steps=10 msd.tsm_steps=5 train.batch_size=64
run msd_digits configs/msd_digits.yaml train.max_steps=4 train.batch_size=8
run mar_digits configs/mar_digits.yaml train.max_steps=6 train.batch_size=8 mar.depth=1 mar.width=32 mar.head_width=32
# a hybrid export: the builtin conditional teacher's first step, then the progressive digits student
(cd $SRC && PYTHONPATH=$SRC HF_HUB_OFFLINE=1 python -m distill train configs/progressive_digits.yaml progressive.start_steps=4 progressive.steps_per_round=2 train.batch_size=8 teacher.path=builtin:digits-cond $F output_dir=$OUT/prog_cond > $OUT/prog_cond.log 2>&1 && PYTHONPATH=$SRC HF_HUB_OFFLINE=1 python -m distill hybrid distill/assets/digits_teacher_cond $OUT/prog_cond/pipeline --num-base-steps 1 --out $OUT/hybrid > $OUT/hybrid.log 2>&1) || echo "FAIL hybrid"

