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
* Faults cost the round, never a request: a write that fails (a full disk) keeps the files as
  they were (no partial line) and drops that request from the buffer; a round that cannot
  start or finish keeps the served draft; a damaged line left by an earlier run killed
  mid-write is dropped when the file is first touched (the trainer refuses such lines).
  ``tests/test_osd.py`` injects each.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from distillspec.common.io import atomic_write_text, jsonl_lines
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
        self.write_failing = False  # the last append failed (a full disk): said once

    # -- the buffer ------------------------------------------------------------------------------

    def record(self, request, output: list[int]) -> None:
        """Called by the engine thread for every finished request; it never raises for a
        file that cannot be written (the request is answered all the same)."""
        if not output:
            return
        line = json.dumps({"prompt_ids": list(request.prompt_ids),
                           "completion_ids": list(output)}) + "\n"
        with self.lock:
            self.seen += 1
            held = self.seen % HELD_BACK_EVERY == 0
            path = self.heldout if held else self.buffer
            limit = max(16, self.config.buffer_size // HELD_BACK_EVERY) if held else self.config.buffer_size
            try:
                self._append(path, line)
            except OSError as error:
                if not self.write_failing:  # said once, not for every request
                    self._report(f"served requests are not kept while {path} cannot be "
                                 f"written ({error})")
                self.write_failing = True
                return
            if self.write_failing:
                self._report(f"{path} is written again")
                self.write_failing = False
            try:
                self._bound(path, limit)
            except OSError as error:  # tried again after the next request
                self._report(f"cannot trim {path} ({error})")
            self.since_round += 0 if held else 1
            start = self.since_round >= self.config.distill_every and self.process is None
        if start and not self.closed:
            try:
                self._start_round()
            except OSError as error:
                self._report(f"no round started ({error}); trying again after "
                             f"{self.config.distill_every} more prompts")

    def _append(self, path: Path, line: str) -> None:
        """Append one line; a write that fails leaves the file as it was (no partial line)."""
        for each in (self.buffer, self.heldout):  # both, before a round reads either
            if each not in self.line_counts:
                self.line_counts[each] = self._clean(each)
        size = path.stat().st_size if path.exists() else 0
        try:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(line)
        except OSError:
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise
        self.line_counts[path] += 1

    def _clean(self, path: Path) -> int:
        """The lines a file kept from an earlier run; a line that is not a whole record (a run
        killed mid-write) is dropped, so that the trainer, which refuses such lines, can read
        the rest."""
        if not path.exists():
            return 0
        text = path.read_bytes().decode("utf-8", errors="replace")
        lines = jsonl_lines(text)
        kept = [line for line in lines if _is_record(line)]
        if len(kept) < len(lines) or not text.endswith("\n") and text:
            atomic_write_text(path, "".join(line + "\n" for line in kept))
            if len(kept) < len(lines):
                self._report(f"dropped {len(lines) - len(kept)} damaged line(s) of {path}")
        return len(kept)

    def _bound(self, path: Path, limit: int) -> None:
        """Keep the newest ``limit`` lines once there are 25 % more; the file is only read
        then (the line count is kept in memory, from one read of a pre-existing file)."""
        if self.line_counts[path] > limit * 1.25:
            lines = jsonl_lines(path.read_text(encoding="utf-8"))
            atomic_write_text(path, "".join(line + "\n" for line in lines[-limit:]))
            self.line_counts[path] = min(len(lines), limit)

    # -- rounds ------------------------------------------------------------------------------------

    def _start_round(self) -> None:
        heldout = jsonl_lines(self.heldout.read_text(encoding="utf-8")) if self.heldout.is_file() else []
        if len(heldout) < 2:
            return  # nothing to judge a candidate on yet
        with self.lock:
            self.since_round = 0
            number = self.rounds + 1  # counted once its trainer runs
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
            self.rounds = number
        threading.Thread(target=self._finish_round, args=(self.process, out, number),
                         daemon=True).start()

    def _finish_round(self, process: subprocess.Popen, out: Path, number: int) -> None:
        code = process.wait()
        try:
            verdict = self._judge(code, out)
            self._log({"round": number, "folder": str(out), **verdict})
            if verdict.get("swap"):
                self._swap(out / "final", verdict["candidate_alpha"])
        except Exception as error:  # noqa: BLE001 - a round that fails keeps the served draft
            self._report(f"round {number} failed, the served draft stays: "
                         f"{type(error).__name__}: {error}")
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
        evals = [json.loads(line) for line in jsonl_lines((out / "metrics.jsonl").read_text())
                 if '"eval"' in line]
        before = next(e for e in evals if e["eval"] == "start")["alpha_t0"]
        after = next(e for e in reversed(evals) if e["eval"] == "final")["alpha_t0"]
        return {"swap": after > before, "current_alpha": before, "candidate_alpha": after,
                "why": "better on held-back traffic" if after > before else "not better"}

    def _swap(self, folder: Path, alpha: float) -> None:
        from distillspec.decoding.kv_cache import compile_steps, steps_compiled
        from distillspec.models.loading import load_model
        from distillspec.models.quantize import draft_quantization, quantize_draft

        engine = self.server.engine
        draft, _ = load_model(folder, device=engine.decoder.device,
                              dtype=engine.decoder.target.model.dtype)
        current = engine.decoder.draft
        # Stored as the served draft is (--draft-quantize).
        draft = quantize_draft(draft, draft_quantization(current.model if current else None))
        # Same architecture as the draft it replaces: it runs the way --compile chose for that one.
        compile_steps(draft, current is not None and steps_compiled(current.model))
        version = self.version + 1

        def swapped() -> None:  # on the engine thread, once the draft is in (not if it failed)
            with self.lock:
                self.current, self.version = str(folder), version
            self.server.metrics.swaps.inc()
            self.server.metrics.draft_alpha.set(alpha)

        engine.swap_draft(draft, version, on_swapped=swapped)

    def _log(self, record: dict) -> None:
        path = self.folder.child("swaps.jsonl")
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"time": time.time(), **record}) + "\n")
        print(f"distillspec: online distillation: {json.dumps(record)}", file=sys.stderr)

    def _report(self, message: str) -> None:
        print(f"distillspec: online distillation: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.closed = True
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()


def _is_record(line: str) -> bool:
    """A whole buffer line: a JSON object with lists of token ids as ``prompt_ids`` and
    ``completion_ids``."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and all(
        isinstance(record.get(key), list) and all(type(i) is int for i in record[key])
        for key in ("prompt_ids", "completion_ids"))
