"""Evaluation results on disk: `eval_results.json` and `eval_results.md` in the run directory (local or remote)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax

from flanjax import paths
from flanjax.eval.evaluator import TaskResult


def markdown_table(results: Mapping[str, TaskResult], step: int) -> str:
    lines = [f"| task | metric | step {step} | examples |", "|---|---|---:|---:|"]
    for task, result in sorted(results.items()):
        for metric, value in sorted(result.metrics.items()):
            lines.append(f"| {task} | {metric} | {value:.2f} | {result.num_examples} |")
    return "\n".join(lines) + "\n"


def write_results(results: Mapping[str, TaskResult], output_dir: str, step: int, checkpoint: str = "") -> str:
    """Writes both files (process 0 only); returns the JSON path.

    eval_results.json: {"step", "checkpoint", "tasks": {task: {"metrics": {name: value}, "num_examples"}}}
    """
    path = os.path.join(output_dir, "eval_results.json")
    if jax.process_index() != 0:
        return path
    paths.makedirs(output_dir)
    document = {
        "step": step,
        "checkpoint": checkpoint,
        "tasks": {task: {"metrics": r.metrics, "num_examples": r.num_examples} for task, r in sorted(results.items())},
    }
    for name, text in (("eval_results.json", json.dumps(document, indent=2) + "\n"), ("eval_results.md", markdown_table(results, step))):
        paths.write_atomic(os.path.join(output_dir, name), text)  # readers never see half a file
    return path
