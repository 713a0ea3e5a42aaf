"""The world-model quickstart (`make quickstart-e2wm`): the quickstart's model fine-tuned on
experiences from the household world three ways (LoRA, LoRA + EWC, full fine-tuning).

`python -m tasks.e2wm.quickstart report` evaluates the quickstart's model (base) and the three
runs on the world's evaluation tasks (held-out homes) and on the quickstart's own held-out tasks
(what the model knew before), prints one table and, last, one JSON object:

    {"base": {"world": mean, "retained": mean, "tasks": {task: value}}, "lora": ..., "lora_ewc": ..., "full": ...}

Each task's value is its headline metric: ROUGE-Lsum for plan generation, the object-path score
for path tracking, accuracy for multiple choice, exact match (accuracy) for the quickstart's.
Generation tasks are cut to their first 60 examples (beam search is the slow part); multiple
choice is scored on every held-out question (a forward pass a row).
"""

from __future__ import annotations

if __name__ == "__main__":  # the report: keep TensorFlow's and Orbax's routine lines off the table
    from flanjax.quiet import quiet_libraries

    quiet_libraries()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

RUN_DIR = "runs/quickstart_e2wm"
RUNS = {"base": "runs/quickstart", "lora": f"{RUN_DIR}/lora", "lora_ewc": f"{RUN_DIR}/lora_ewc", "full": f"{RUN_DIR}/full"}
GENERATED, CHOSEN = "quickstart_e2wm_generation", "quickstart_e2wm_choice"
GENERATED_EXAMPLES = 60
HEADLINE = ("rougeLsum", "object_path", "accuracy", "exact_match")


def headline(metrics: dict[str, float]) -> float:
    return next(metrics[k] for k in HEADLINE if k in metrics)


def evaluate(run: str, mixture: str, name: str) -> dict[str, float]:
    from flanjax.decode import SamplingConfig
    from flanjax.eval.evaluator import EvalConfig
    from flanjax.eval.run import evaluate as evaluate_run

    generated = mixture == GENERATED  # E2WM decodes with 4 beams
    config = EvalConfig(num_examples=GENERATED_EXAMPLES if generated else None, batch_size=60,
                        sampling=SamplingConfig(max_new_tokens=48, num_beams=4) if generated else None)  # fmt: skip
    results = evaluate_run(checkpoint_path=run, mixture_or_task_name=mixture, evaluation=config,
                           output_dir=os.path.join(RUN_DIR, "eval", name, mixture))  # fmt: skip
    return {task: headline(r.metrics) for task, r in results.items()}


def report() -> dict:
    import gin
    import seqio

    import tasks.e2wm.experiences  # noqa: F401
    import tasks.quickstart  # noqa: F401

    # As configs/runs/quickstart_e2wm.gin trains: the quickstart's tokenizer, no demonstrations.
    os.environ["E2WM_DIR"] = os.path.join(RUN_DIR, "world")
    os.environ["FLANJAX_TOKENIZER"] = os.path.join(RUNS["base"], "tokenizer")
    gin.bind_parameter("tasks.e2wm.experiences.formats.demonstrations", 0)
    gin.bind_parameter("tasks.e2wm.experiences.formats.counting_demonstrations", 0)
    if GENERATED not in seqio.MixtureRegistry.names():
        from tasks.e2wm.experiences import CHOICE, GENERATION, eval_task_name

        for mixture, tasks in ((GENERATED, GENERATION), (CHOSEN, CHOICE)):
            seqio.MixtureRegistry.add(mixture, [eval_task_name(t) for t in tasks], default_rate=1.0)
    table = {}
    for name, run in RUNS.items():
        world = {**evaluate(run, GENERATED, name), **evaluate(run, CHOSEN, name)}
        retained = evaluate(run, "quickstart_eval", name)
        table[name] = {"world": float(np.mean(list(world.values()))), "retained": float(np.mean(list(retained.values()))),
                       "tasks": {**world, **retained}}  # fmt: skip
    print(f"\n{'task':<42}" + "".join(f"{name:>10}" for name in RUNS))
    for task in table["base"]["tasks"]:
        print(f"{task:<42}" + "".join(f"{table[name]['tasks'][task]:>10.1f}" for name in RUNS))
    for key in ("world", "retained"):
        print(f"{'mean: ' + key:<42}" + "".join(f"{table[name][key]:>10.1f}" for name in RUNS))
    return table


if __name__ == "__main__" and sys.argv[1:] == ["report"]:
    print(json.dumps(report()))
