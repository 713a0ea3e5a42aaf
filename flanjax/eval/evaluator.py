"""Generation evaluation through `seqio.Evaluator`: decode, post-process, task metrics.

seqio owns the eval datasets (cached once), decoding of predictions to text, the tasks'
post-processing and metric functions; flanjax supplies the predict function (KV-cache
decoding on the mesh).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import numpy as np
import seqio
from flax import nnx

from flanjax.data.pipeline import decoder_converter, get_task_or_mixture
from flanjax.decode import greedy_generate


@dataclasses.dataclass(frozen=True)
class GenerationEvalConfig:
    mixture_or_task_name: str | None = None  # None: the training mixture
    split: str = "validation"
    num_examples: int | None = None  # per task; None: the whole split
    batch_size: int = 32
    max_new_tokens: int | None = None  # None: the targets' feature length


class GenerationEvaluator:
    def __init__(
        self,
        config: GenerationEvalConfig,
        default_task: str,
        task_feature_lengths: Mapping[str, int],
        graphdef: nnx.GraphDef,
    ):
        name = config.mixture_or_task_name or default_task
        get_task_or_mixture(name)
        self.config = config
        self.graphdef = graphdef
        self.max_new_tokens = config.max_new_tokens or task_feature_lengths["targets"]
        self.seqio_evaluator = seqio.Evaluator(
            name,
            feature_converter=decoder_converter(pack=False),
            eval_split=config.split,
            sequence_length=dict(task_feature_lengths),
            num_examples=config.num_examples,
            use_memory_cache=True,
        )
        if not self.seqio_evaluator.eval_tasks:
            raise ValueError(
                f"{name!r} has no tasks with metric functions and a {config.split!r} split to "
                "evaluate; give its tasks `metric_fns` or choose another split."
            )
        self.eos_id = next(iter(self.seqio_evaluator.eval_tasks)).output_features["targets"].vocabulary.eos_id

    def __call__(self, step: int, model_state: nnx.State) -> dict[str, float]:
        """{"<task>/<metric>": value} for every evaluated task."""

        def predict(ds) -> list[tuple[int, list[int]]]:
            return self._predict(ds, model_state)

        metrics, _ = self.seqio_evaluator.evaluate(compute_metrics=True, step=step, predict_fn=predict)
        metrics = metrics.result() if hasattr(metrics, "result") else metrics
        return {f"{task}/{name}": float(v) for task, ms in metrics.items() for name, v in ms.items()}

    def _predict(self, ds, model_state: nnx.State) -> list[tuple[int, list[int]]]:
        out: list[tuple[int, list[int]]] = []
        for indices, prompts, lengths in self._batches(ds):
            tokens = np.asarray(
                jax.device_get(
                    greedy_generate(
                        self.graphdef,
                        model_state,
                        prompts,
                        lengths,
                        max_new_tokens=self.max_new_tokens,
                        eos_id=self.eos_id,
                    )
                )
            )
            out.extend((int(i), row.tolist()) for i, row in zip(indices, tokens) if i >= 0)
        return out

    def _batches(self, ds):
        """(indices, prompts, prompt lengths), padded to full batches (index -1 for padding)."""
        size = self.config.batch_size
        rows = list(ds.as_numpy_iterator())
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            indices = np.full(size, -1)
            # The prompt is the prefix the converter marks as bidirectional: 0 then the inputs.
            width = rows[0][1]["decoder_input_tokens"].shape[-1]
            prompts = np.zeros((size, width), np.int32)
            lengths = np.ones(size, np.int32)
            for j, (i, ex) in enumerate(chunk):
                n = int(ex["decoder_causal_attention"].sum())
                indices[j], lengths[j] = i, n
                prompts[j, :n] = ex["decoder_input_tokens"][:n]
            yield indices, prompts, lengths
