#!/bin/bash
# The data of the four arms of ab3.py, then the A/B itself (session of 2026-12-04, 12:2x-14:2x UTC).
set -e
source /work/main/.venv/bin/activate
HERE=/work/main/docs/results/written-prompts-3
SETS=/work/main/docs/results/written-prompts-2
DATA=/work/main/src/distillspec/data          # builtin:chat and builtin:chat-pool (1361) before
C=/root/.cache/distillspec/demo-data/60df9c0bf06411c1   # the demo's v9 data (./dev demo made it)
mkdir -p /work/runs/alpha3 && cd /work/runs/alpha3
# E: one T=1 sample of the target per prompt of the demo's 2385 training prompts (15.1 min).
distillspec datagen --target builtin:smollm2-135m --data $C/prompts.jsonl --out t1-answers.jsonl \
  --temperature 1 --max-new-tokens 64 --batch-size 128 --seed 1
cat $C/answers.jsonl t1-answers.jsonl > E-answers.jsonl
ARM_C=$C/answers.jsonl ARM_E=$PWD/E-answers.jsonl python $HERE/ab3.py C E
# W: five helpers' 1500 new requests (written-1..5.jsonl), minus those close to anything the
# project has or evaluates on, or to an earlier kept one (the rule of ../written-prompts-2/).
python $SETS/dedupe2.py kept-1-4.jsonl $HERE/written-{1,2,3,4}.jsonl -- $DATA/chat_prompts.jsonl \
  $DATA/chat_pool_prompts.jsonl $SETS/other-eval-written.jsonl
python $SETS/dedupe2.py kept-5.jsonl $HERE/written-5.jsonl -- $DATA/chat_prompts.jsonl \
  $DATA/chat_pool_prompts.jsonl $SETS/other-eval-written.jsonl kept-1-4.jsonl
cat kept-1-4.jsonl kept-5.jsonl > new-written.jsonl          # 916 + 286 = 1202
distillspec datagen --target builtin:smollm2-135m --data new-written.jsonl --out new-answers.jsonl \
  --temperature 0 --max-new-tokens 64 --batch-size 128
cat $C/answers.jsonl new-answers.jsonl > W-answers.jsonl
cat E-answers.jsonl new-answers.jsonl > WE-answers.jsonl
# (WE's first run was killed at a session boundary during top-k scoring; rerun alone as
#  ARM_WE=$PWD/WE-answers.jsonl python $HERE/ab3.py WE.)
ARM_W=$PWD/W-answers.jsonl ARM_WE=$PWD/WE-answers.jsonl python $HERE/ab3.py W WE
# E3: E's data, a 3-layer draft (the top-k scored again into run-E, named by its fingerprint).
LAYERS=3 TOPK=/work/runs/alpha3/run-E ARM_E3=$PWD/E-answers.jsonl python $HERE/ab3.py E3
