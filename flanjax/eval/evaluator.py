"""Evaluation of seqio tasks through `seqio.Evaluator`: generation and rank-classification scoring.

seqio owns the evaluation datasets (built and cached once), decoding predictions to text,
the tasks' post-processing and their metric functions. flanjax supplies the two model
functions seqio asks for, both running sharded on the mesh:

    predict  decode each example's prompt (its inputs) with `flanjax.decode.generate` (or
             sample several continuations and keep the best by BatGPT's bidirectional
             rescoring, `EvalConfig.rescore`, for a bidirectionally trained model)
    score    the log-likelihood of each row's targets with `flanjax.decode.score_rows` (rows
             that share a prompt, the options of one example, compute it once)

A task is evaluated by generation when its metrics take `(targets, predictions)` and by
scoring when they take `(targets, scores)` (rank classification: one row per option, see
`flanjax.data.rank_classification`). The same `Evaluator` runs from `flanjax eval` and as
the training loop's periodic evaluation hook.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
import seqio
from flax import nnx

from flanjax.data.bidirectional import PrefixedFeatureConverter, bidirectional_scores
from flanjax.data.pipeline import decoder_converter, get_task_or_mixture
from flanjax.decode import SamplingConfig, SequenceTooLongError, check_length, decoder_features, generate, score_rows
from flanjax.errors import FlanjaxError
from flanjax.models.transformer import TransformerConfig
from flanjax.sharding import Partitioner


class EvalError(FlanjaxError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Rescore:
    """BatGPT's bidirectional rescoring of generation tasks: `num_candidates` continuations per
    prompt sampled with EvalConfig.sampling (which must sample), each scored
    log p_l2r(y | x) + lam * log p_r2l(x | y) by the same bidirectionally trained model; the
    best is the prediction."""

    num_candidates: int = 4
    lam: float = 1.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    mixture_or_task_name: str | None = None  # None: the training mixture
    split: str = "validation"
    num_examples: int | None = None  # rows per task (a scoring task has a row per option); None: all
    batch_size: int = 32  # rows per model call (global)
    sampling: SamplingConfig | None = None  # None: greedy, up to each task's longest target
    rescore: Rescore | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TaskResult:
    metrics: dict[str, float]
    num_examples: int  # examples evaluated (for scoring tasks: examples, not option rows)


def flat_metrics(results: Mapping[str, TaskResult]) -> dict[str, float]:
    """{"<task>/<metric>": value}: the scalars the training loop logs."""
    return {f"{task}/{name}": value for task, r in results.items() for name, value in r.metrics.items()}


class Evaluator:
    """Evaluates a model state on every task of a mixture that has metrics and the split."""

    def __init__(
        self,
        config: EvalConfig,
        *,
        model: TransformerConfig,
        graphdef: nnx.GraphDef,
        partitioner: Partitioner,
        task_feature_lengths: Mapping[str, int] | None = None,  # None: each task's longest
        default_task: str | None = None,
        stop_tokens: tuple[int, ...] = (),  # besides EOS: a chat model's end-of-turn token
        directions: tuple[int, int] | None = None,  # a bidirectional model's (<l2r>, <r2l>): prompts start with <l2r>
    ):
        name = config.mixture_or_task_name or default_task
        if name is None:
            raise EvalError("nothing to evaluate: set EvalConfig.mixture_or_task_name.")
        if config.batch_size % partitioner.data_parallel_size:
            raise EvalError(
                f"evaluation batch_size={config.batch_size} is not divisible by the "
                f"{partitioner.data_parallel_size} data-parallel shards of the mesh; pick a multiple."
            )
        _check_tasks(name, config.split)
        self.config, self.model, self.graphdef, self.partitioner = config, model, graphdef, partitioner
        self.stop_tokens = stop_tokens
        self.directions = directions
        if config.rescore is not None:
            if directions is None:
                raise EvalError("EvalConfig.rescore asks the model backwards: evaluate a bidirectionally trained run "
                                "(configs/runs/bidirectional.gin), or set rescore=None.")  # fmt: skip
            if config.rescore.num_candidates < 2 or config.sampling is None or config.sampling.temperature <= 0:
                raise EvalError("EvalConfig.rescore chooses among sampled candidates: set num_candidates >= 2 and a "
                                "sampling temperature > 0 (evaluator.EvalConfig.sampling).")  # fmt: skip
        self.seqio_evaluator = seqio.Evaluator(
            name,
            feature_converter=PrefixedFeatureConverter(directions[:1], pack=False) if directions else decoder_converter(pack=False),
            eval_split=config.split,
            sequence_length=dict(task_feature_lengths) if task_feature_lengths else None,
            num_examples=config.num_examples,
            use_memory_cache=True,
            async_compute_metrics=False,
        )
        # Per generation task, found again by its cached dataset (all seqio passes predict_fn):
        # (prompt width, sampling, EOS id), fixed once here rather than at every evaluation.
        self._generation: dict[int, tuple[int, SamplingConfig, int]] = {}
        self.num_examples = {task.name: self._check_task(task) for task in self.seqio_evaluator.eval_tasks}

    def _check_task(self, task: seqio.Task) -> int:
        """Checks the task's lengths against the model's, up front; returns its example count."""
        rows = [ex for _, ex in self.seqio_evaluator.cached_model_datasets[task.name].as_numpy_iterator()]
        if not rows:
            raise EvalError(f"task {task.name!r} has no {self.config.split!r} examples to evaluate.")
        width = rows[0]["decoder_target_tokens"].shape[-1]
        if width > self.model.max_len:
            raise SequenceTooLongError(
                f"task {task.name!r}: evaluation sequences of {width} tokens exceed the model's "
                f"max_len={self.model.max_len}. Lower task_feature_lengths, or raise max_len "
                "(--gin.transformer.TransformerConfig.max_len=N)."
            )
        if any(m.model_output_type == seqio.metrics.ModelOutputType.PREDICTION for m in task.metric_objs):
            # The longest prompt (inputs and the start token) and the longest target.
            prompt_width = max(int(ex["decoder_causal_attention"].sum()) for ex in rows)
            longest_target = max(int(ex["decoder_loss_weights"].sum()) for ex in rows)
            sampling = self.config.sampling or SamplingConfig(max_new_tokens=longest_target)
            sampling = dataclasses.replace(sampling, stop_tokens=(*sampling.stop_tokens, *self.stop_tokens))
            try:
                check_length(self.model, prompt_width, sampling.max_new_tokens)
            except SequenceTooLongError as e:
                raise SequenceTooLongError(f"task {task.name!r}: {e}") from None
            eos_id = task.output_features["targets"].vocabulary.eos_id
            self._generation[id(self.seqio_evaluator.cached_model_datasets[task.name])] = (prompt_width, sampling, eos_id)
        task_rows = list(self.seqio_evaluator.cached_task_datasets[task.name].as_numpy_iterator())
        if "idx" in task_rows[0]:  # rank classification: rows are options, idx[0] the example
            return len({int(ex["idx"][0]) for ex in task_rows})
        return len(task_rows)

    def __call__(self, step: int, model_state: nnx.State) -> dict[str, TaskResult]:
        """Metrics of every task for `model_state` (the model's state, not the optimizer's)."""
        with self.partitioner.activate():
            metrics, _ = self.seqio_evaluator.evaluate(
                compute_metrics=True,
                step=step,
                predict_fn=lambda ds: self._predict(ds, model_state),
                score_fn=lambda ds: self._score(ds, model_state),
            )
        return {
            task: TaskResult({k: float(v) for k, v in values.items()}, self.num_examples[task])
            for task, values in metrics.result().items()
        }

    def _predict(self, ds, model_state: nnx.State) -> list[tuple[int, list[int]]]:
        width, sampling, eos_id = self._generation[id(ds)]
        indices, rows = self._rows(ds)
        lengths = rows["decoder_causal_attention"].sum(axis=1).astype(np.int32)
        prompts = np.where(np.arange(width) < lengths[:, None], rows["decoder_input_tokens"][:, :width], 0)

        def predict(batch, _):
            return generate(self.graphdef, model_state, batch["prompts"], jnp.maximum(batch["lengths"], 1),
                            eos_id=eos_id, config=sampling, seed=self.config.seed).tokens  # fmt: skip

        if self.config.rescore is not None:
            return list(zip(indices, self._rescored(predict, prompts, lengths, sampling, eos_id, model_state)))
        # Whole rows (0 after each stop token): seqio stacks them and cuts at EOS itself.
        tokens = self.partitioner.map_batches(predict, {"prompts": prompts, "lengths": lengths}, self.config.batch_size)
        return [(i, row.tolist()) for i, row in zip(indices, tokens)]

    def _rescored(self, predict, prompts, lengths, sampling: SamplingConfig, eos_id: int, model_state: nnx.State) -> list[list[int]]:
        """Each prompt's best of `num_candidates` samples by log p_l2r(y | x) + lam * log p_r2l(x | y)."""
        n, lam = self.config.rescore.num_candidates, self.config.rescore.lam
        # Prompts are 0, <l2r>, x; the n copies of each sample apart (the sampler's keys differ by row).
        tokens = self.partitioner.map_batches(predict, {"prompts": np.repeat(prompts, n, 0), "lengths": np.repeat(lengths, n)},
                                              self.config.batch_size)  # fmt: skip
        stops = {eos_id, 0, *sampling.stop_tokens}
        candidates = [[int(t) for t in itertools.takewhile(lambda t: t not in stops, row)] for row in tokens]
        xs = [prompts[i // n, 2 : lengths[i // n]] for i in range(len(candidates))]
        scores = bidirectional_scores(self.graphdef, model_state, self.partitioner, xs, candidates, self.directions, eos_id, lam,
                                      self.config.batch_size, self.model.max_len)  # fmt: skip
        best = scores.reshape(-1, n).argmax(1)
        width = tokens.shape[1] + 1  # seqio stacks the predictions: one width, 0 after EOS
        return [[*candidates[i * n + b], eos_id] + [0] * (width - len(candidates[i * n + b]) - 1) for i, b in enumerate(best)]

    def _score(self, ds, model_state: nnx.State) -> list[tuple[int, float]]:
        indices, rows = self._rows(ds)
        scores = score_rows(self.graphdef, model_state, rows, self.partitioner, self.config.batch_size)  # each prompt once
        return [(i, float(s)) for i, s in zip(indices, scores)]

    @staticmethod
    def _rows(ds) -> tuple[list[int], dict[str, np.ndarray]]:
        """The indices and stacked model features (`decode.decoder_features`, plus the prefix
        mask) of seqio's (index, unpacked example) pairs."""
        pairs = list(ds.as_numpy_iterator())
        stack = lambda key: np.stack([ex[key] for _, ex in pairs])  # noqa: E731
        features = decoder_features(stack("decoder_target_tokens"), stack("decoder_loss_weights"))
        prefix = {k: stack(k) for k in ("decoder_causal_attention",) if k in pairs[0][1]}
        return [int(i) for i, _ in pairs], {**features, **prefix}


def _check_tasks(name: str, split: str) -> None:
    """Every task of `name` must have targets; at least one must have metrics and the split."""
    provider = get_task_or_mixture(name)
    tasks = seqio.get_subtasks(provider)
    if not tasks:
        raise EvalError(f"mixture {name!r} has no tasks: add tasks to it, or evaluate a task directly.")
    for task in tasks:
        if "targets" not in task.output_features:
            raise EvalError(
                f"task {task.name!r} has no 'targets' feature to evaluate against; its output_features "
                f"are {sorted(task.output_features)}."
            )
    usable = [t for t in tasks if t.metric_objs and split in t.splits]
    if not usable:
        without = [t.name for t in tasks if not t.metric_objs]
        hint = f" Tasks without metric_fns: {', '.join(without)}." if without else ""
        raise EvalError(
            f"nothing in {name!r} can be evaluated on split {split!r}: a task needs metric_fns and "
            f"that split.{hint} Give the tasks metrics (e.g. flanjax.eval.metrics.accuracy) or choose "
            "another split."
        )
