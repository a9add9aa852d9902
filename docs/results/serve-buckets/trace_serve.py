"""Run `distillspec serve` with every engine step logged (JSONL to $STEP_LOG): start, seconds,
batch, arm, tokens, admitting, recorded (plus whatever ``run(extra=...)`` adds per step)."""
import json, os, sys, time
from distillspec.tools import serve_engine

orig = serve_engine.EngineWorker._step


def run(extra=lambda worker: {}):
    """Patch the engine's step to log each one (``extra(worker)``: more fields), then serve."""
    log = open(os.environ["STEP_LOG"], "w", buffering=1)

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
                                  "recorded": rec.get("recorded", False), **extra(self)}) + "\n")

    serve_engine.EngineWorker._step = _step
    from distillspec.tools.cli import main
    sys.exit(main(["serve", *sys.argv[1:]]))


if __name__ == "__main__":
    run()
