#!/bin/bash
# A/B: the mode policy skips the step that catches the draft up (new) vs d7203fa (base, at /tmp/base)
exec "$(dirname "$0")/../serve-ab.sh" /work/runs/catchup
