"""Online speculative decoding (OSD, Liu et al. 2024): the server distils its draft on its traffic.

* Every finished request (prompt ids and the target's output, which SD emitted losslessly)
  goes to a bounded on-disk buffer ``DIR/buffer.jsonl`` (datagen format, oldest dropped past
  ``--buffer-size``); every tenth goes to ``DIR/heldout.jsonl`` instead, the held-back slice
  candidates are judged on. Nothing is written when online distillation is off.
* After ``--distill-every`` new prompts a round starts: a separate process runs the ordinary
  ``distillspec distill`` (the current draft as draft_init, the buffer as fixed data, the
  held-back slice as eval data, ``--distill-minutes``), into ``DIR/rounds/round-N``. Its
  evaluator measures the current draft at the start and the candidate at the end.
* When the process exits cleanly and the candidate's ``final/`` is complete (manifest
  verified), the candidate replaces the draft only if its held-back greedy alpha beats the
  current draft's; it is loaded off the engine thread and swapped between steps, so in-flight
  requests keep going. A killed or failed trainer changes nothing. Swaps are logged to
  ``DIR/swaps.jsonl`` and exported as metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from distillspec.common.io import atomic_write_text
from distillspec.common.rundir import claim

HELD_BACK_EVERY = 10


class OnlineDistiller:
    def __init__(self, config, draft_spec: str, tokenizer, server):
        self.config, self.server, self.tokenizer = config, server, tokenizer
        self.folder = claim(config.online_distill, "online-distill")
        self.folder.track("buffer.jsonl", "heldout.jsonl", "rounds", "swaps.jsonl", "recipes")
        self.buffer = self.folder.child("buffer.jsonl")
        self.heldout = self.folder.child("heldout.jsonl")
        self.current = draft_spec
        self.version = 0  # swaps so far: the served draft's version
        self.rounds = 0  # rounds started (a rejected candidate still counts)
        self.seen = self.since_round = 0
        self.lock = threading.Lock()
        self.line_counts: dict[Path, int] = {}  # lines in the buffer / held-back files
        self.process: subprocess.Popen | None = None
        self.closed = False

    # -- the buffer ------------------------------------------------------------------------------

    def record(self, request, output: list[int]) -> None:
        """Called by the engine thread for every finished request."""
        if not output:
            return
        line = json.dumps({"prompt_ids": list(request.prompt_ids),
                           "completion_ids": list(output)}) + "\n"
        with self.lock:
            self.seen += 1
            held = self.seen % HELD_BACK_EVERY == 0
            path = self.heldout if held else self.buffer
            limit = max(16, self.config.buffer_size // HELD_BACK_EVERY) if held else self.config.buffer_size
            with path.open("a", encoding="utf-8") as handle:
                handle.write(line)
            self._bound(path, limit)
            self.since_round += 0 if held else 1
            start = self.since_round >= self.config.distill_every and self.process is None
        if start and not self.closed:
            self._start_round()

    def _bound(self, path: Path, limit: int) -> None:
        """Keep the newest ``limit`` lines once there are 25 % more; the file is only read
        then (the line count is kept in memory, from one read of a pre-existing file)."""
        if path not in self.line_counts:
            self.line_counts[path] = len(path.read_text(encoding="utf-8").splitlines())
        else:
            self.line_counts[path] += 1
        if self.line_counts[path] > limit * 1.25:
            lines = path.read_text(encoding="utf-8").splitlines()
            atomic_write_text(path, "".join(line + "\n" for line in lines[-limit:]))
            self.line_counts[path] = min(len(lines), limit)

    # -- rounds ------------------------------------------------------------------------------------

    def _start_round(self) -> None:
        heldout = self.heldout.read_text().splitlines() if self.heldout.is_file() else []
        if len(heldout) < 2:
            return  # nothing to judge a candidate on yet
        with self.lock:
            self.since_round = 0
            self.rounds += 1
            number = self.rounds
            out = self.folder.child("rounds") / f"round-{number:04d}-{int(time.time())}"
            recipe = {
                "target": self.config.target, "draft_init": self.current,
                "data": str(self.buffer), "eval_data": str(self.heldout), "policy": "fixed",
                "divergence": "fkl", "max_minutes": self.config.distill_minutes,
                "max_steps": 1_000_000, "batch_size": 8, "lr": 1e-3, "warmup_steps": 5,
                "eval_every": 0, "save_every": 0, "eval_prompts": min(len(heldout), 64),
                "eval_tau_prompts": 0, "max_completion_tokens": 512, "max_prompt_tokens": 512,
                "output_dir": str(out), "seed": number,
                "runtime": {"device": self.config.runtime.device,
                            "threads": self.config.distill_threads},
            }
            recipes = self.folder.child("recipes")
            recipes.mkdir(exist_ok=True)
            path = recipes / f"{out.name}.yaml"
            atomic_write_text(path, yaml.safe_dump(recipe))
            self.process = subprocess.Popen(
                [sys.executable, "-m", "distillspec", "distill", "--config", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        threading.Thread(target=self._finish_round, args=(self.process, out, number),
                         daemon=True).start()

    def _finish_round(self, process: subprocess.Popen, out: Path, number: int) -> None:
        code = process.wait()
        try:
            verdict = self._judge(code, out)
            self._log({"round": number, "folder": str(out), **verdict})
            if verdict.get("swap"):
                self._swap(out / "final", verdict["candidate_alpha"])
        finally:
            with self.lock:
                self.process = None

    def _judge(self, code: int, out: Path) -> dict:
        from distillspec.training.checkpoint import verify_folder

        if code != 0:
            return {"swap": False, "why": f"trainer exited with {code}"}
        problem = verify_folder(out / "final")
        if problem is not None:
            return {"swap": False, "why": f"incomplete candidate: {problem}"}
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in line]
        before = next(e for e in evals if e["eval"] == "start")["alpha_t0"]
        after = next(e for e in reversed(evals) if e["eval"] == "final")["alpha_t0"]
        return {"swap": after > before, "current_alpha": before, "candidate_alpha": after,
                "why": "better on held-back traffic" if after > before else "not better"}

    def _swap(self, folder: Path, alpha: float) -> None:
        from distillspec.decoding.kv_cache import compile_steps, steps_compiled
        from distillspec.models.loading import load_model

        engine = self.server.engine
        draft, _ = load_model(folder, device=engine.decoder.device,
                              dtype=engine.decoder.target.model.dtype)
        current = engine.decoder.draft
        # Same architecture as the draft it replaces: it runs the way --compile chose for that one.
        compile_steps(draft, current is not None and steps_compiled(current.model))
        version = self.version + 1
        engine.swap_draft(draft, version)
        with self.lock:
            self.current, self.version = str(folder), version
        self.server.metrics.swaps.inc()
        self.server.metrics.draft_alpha.set(alpha)

    def _log(self, record: dict) -> None:
        path = self.folder.child("swaps.jsonl")
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": time.time(), **record}) + "\n")
        print(f"distillspec: online distillation: {json.dumps(record)}", file=sys.stderr)

    def close(self) -> None:
        self.closed = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
