#!/bin/bash
# A/B: kernel choices warmed at server start and capped (new) vs HEAD bf44fbd (base, at /tmp/base)
exec "$(dirname "$0")/../serve-ab.sh" /work/runs/warm
