"""Run `distillspec serve` with every engine step logged (JSONL to $STEP_LOG): start, seconds,
batch, arm, tokens, admitting, recorded, the target's and draft's write pointers, the longest
row, whether bucket 16 has settled on plain and bucket 16's rates per arm."""
import json, os, sys, time
from distillspec.tools import serve_engine
from distillspec.decoding.mode_policy import PLAIN
from distillspec.decoding import packed_linear

log = open(os.environ["STEP_LOG"], "w", buffering=1)
orig = serve_engine.EngineWorker._step

def _step(self):
    d = self.decoder
    batch, admitting = len(d.rows) + len(d.queue), bool(d.queue)
    rec = {}
    orig_record = self.policy.record if self.policy is not None else None
    def record(b, arm, tokens, seconds):
        rec["recorded"] = True
        return orig_record(b, arm, tokens, seconds)
    if self.policy is not None:
        self.policy.record = record
    posted = []
    orig_post = self._post
    self._post = lambda u: (posted.append(len(u.new_tokens)), orig_post(u))
    t = time.perf_counter()
    try:
        orig(self)
    finally:
        s = time.perf_counter() - t
        self._post = orig_post
        if self.policy is not None:
            self.policy.record = orig_record
        log.write(json.dumps({"t": t, "s": s, "batch": batch, "arm": d.lookahead_limit,
                              "tokens": sum(posted), "admitting": admitting,
                              "recorded": rec.get("recorded", False),
                              "ptr": d.target.length, "cap": d.target.cache.slot_capacity,
                              "longest": max(d.target.positions, default=0),
                              "dptr": d.draft.length if d.draft is not None else None,
                              "settled": self.policy.settled(16) if self.policy else None,
                              "rates": {f"{k[0]}:{k[1]}": round(v, 2) for k, v in self.policy.estimates().items() if k[0] == 16} if self.policy else None}) + "\n")

serve_engine.EngineWorker._step = _step
from distillspec.tools.cli import main
sys.exit(main(["serve", *sys.argv[1:]]))
