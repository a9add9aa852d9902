#!/bin/bash
# issue 20's whole grid: 5 objectives x 4 data sources x 2 seeds, both decodings, one command
cd /work/main
exec .venv/bin/distillspec study \
  --tasks "chat=self:512@builtin:chat:heldout@builtin:chat:train" \
  --divergences fkl,rkl,jsd:0.5,tvd,lk \
  --data-sources teacher-greedy,teacher-t1,onpolicy,mixed:0.5 \
  --seeds 0,1 --minutes 2 --report-prompts 16 --out /work/runs/study-grid
