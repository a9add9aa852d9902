"""serve-buckets' trace_serve.py, each step also logging the target's and draft's write
pointers, the longest row, whether bucket 16 has settled on plain and bucket 16's rates per arm
(JSONL to $STEP_LOG)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "serve-buckets"))
from trace_serve import run  # noqa: E402


def settling(worker):
    d, policy = worker.decoder, worker.policy
    return {"ptr": d.target.length, "cap": d.target.cache.slot_capacity,
            "longest": max(d.target.positions, default=0),
            "dptr": d.draft.length if d.draft is not None else None,
            "settled": policy.settled(16) if policy else None,
            "rates": {f"{size}:{arm}": round(rate, 2)
                      for (size, arm), rate in policy.estimates().items() if size == 16}
                     if policy else None}


if __name__ == "__main__":
    run(settling)
