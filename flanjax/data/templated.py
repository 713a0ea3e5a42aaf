"""Templated instruction tasks, FLAN's way, and mixtures over them.

A templated task is a seqio data source, a mapping from its raw examples to flat text
fields, and natural-language templates over those fields:

    add_task(
        "my_sentiment",
        source=seqio.TfdsDataSource("imdb_reviews/plain_text:1.0.0"),
        fields={"review": "text", "answer": label(["negative", "positive"])},
        templates=[
            Template("{review}\\n\\nIs this review positive or negative?", "{answer}"),
            Template("Write a {answer} movie review.", "{review}", turned_around=True),
        ],
        options=["negative", "positive"],
        cluster="sentiment",
    )

registers, with seqio:

    my_sentiment        training: every template; each example gets one, chosen by a seeded
                        hash of its content (reproducible, independent of order and sharding)
    my_sentiment_eval   evaluation with the forward (not turned-around) templates: a
                        classification task is scored by rank classification over its options;
                        a generation task runs its metric functions on generated text
    my_sentiment_fewshot  the same, with exemplars from the train split before each prompt

Classification tasks (`options` given) get FLAN's options block after each forward
template's input: a blank line, `OPTIONS:`, and one `- option` line per option. Options are
fixed (a list) or per example (a function of the raw example, e.g. a question's choices).

Every field is stripped of surrounding whitespace, and examples with an empty field are
dropped, so no rendered input or target is empty. `label(names)` makes a field of an integer
class label; `labelled` drops examples whose label is hidden (-1). A task belongs to one cluster (FLAN's 12,
or one declared with `add_cluster`); `add_mixture` combines tasks and whole clusters with
examples-proportional rates capped at 3,000 examples, as FLAN does.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Callable, Mapping, Sequence

import seqio
import tensorflow as tf

from flanjax.data import fewshot
from flanjax.data.templates import Template, TemplateError, check_templates, templates_preprocessor
from flanjax.data.vocab import DEFAULT_VOCABULARY
from flanjax.errors import FlanjaxError
from flanjax.data.rank_classification import rank_classification, rank_classification_metric, rank_classification_targets

FLAN_CLUSTERS = (
    "nli",
    "commonsense",
    "sentiment",
    "paraphrase",
    "closed_book_qa",
    "struct_to_text",
    "translation",
    "reading_comprehension",
    "reading_comprehension_commonsense",
    "coreference",
    "misc",
    "summarization",
)
CLUSTERS = list(FLAN_CLUSTERS)  # and the user's, from add_cluster
VARIANTS = ("train", "eval", "fewshot")
MAX_EXAMPLES_PER_TASK = 3000  # FLAN's cap on a task's mixing rate
OPTIONS = "options"  # the per-example option list, kept for rank classification
REFERENCES = "references"  # every acceptable answer, kept for generation metrics
_OPTIONS_BLOCK = "options_block"  # rendered options, appended to forward templates

Field = str | Callable[[Mapping[str, tf.Tensor]], tf.Tensor]


class TaskDefinitionError(FlanjaxError, ValueError):
    """A templated task or mixture that cannot be registered as written."""


@dataclasses.dataclass(frozen=True)
class TemplatedTask:
    """A registered templated task: what `flanjax tasks list` shows and mixtures select by."""

    name: str
    cluster: str
    source: str
    templates: tuple[Template, ...]
    options: tuple[str, ...] | None  # fixed options; () when they vary per example; None: generation
    metrics: tuple[str, ...]
    eval_task: str | None
    fewshot_task: str | None

    @property
    def classification(self) -> bool:
        return self.options is not None

    @property
    def forward_templates(self) -> tuple[Template, ...]:
        return tuple(t for t in self.templates if not t.turned_around)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "cluster": self.cluster,
            "source": self.source,
            "templates": len(self.templates),
            "turned_around": sum(t.turned_around for t in self.templates),
            "classification": self.classification,
            "options": list(self.options) if self.options else None,
            "metrics": list(self.metrics),
            "eval_task": self.eval_task,
            "fewshot_task": self.fewshot_task,
        }


_TASKS: dict[str, TemplatedTask] = {}


def add_cluster(name: str) -> None:
    """Declares a cluster of the user's own, beside FLAN's twelve."""
    if name not in CLUSTERS:
        CLUSTERS.append(name)


def get_task(name: str) -> TemplatedTask:
    if name not in _TASKS:
        close = difflib.get_close_matches(name, list(_TASKS), n=5, cutoff=0.6)
        raise TaskDefinitionError(
            f"no templated task named {name!r}." + (f" Did you mean: {', '.join(close)}?" if close else "")
            + " Templated tasks register when their module is imported (e.g. `import tasks.flan`)."
        )  # fmt: skip
    return _TASKS[name]


def templated_tasks(cluster: str | None = None) -> list[TemplatedTask]:
    """Registered templated tasks in registration order, optionally of one cluster."""
    if cluster is not None:
        _check_cluster(cluster)
    return [t for t in _TASKS.values() if cluster is None or t.cluster == cluster]


def _check_cluster(cluster: str) -> None:
    if cluster not in CLUSTERS:
        close = difflib.get_close_matches(cluster, CLUSTERS, n=3, cutoff=0.5)
        raise TaskDefinitionError(
            f"unknown cluster {cluster!r}." + (f" Did you mean: {', '.join(close)}?" if close else "")
            + f" Known clusters: {', '.join(CLUSTERS)}; declare a new one with "
            "`flanjax.data.templated.add_cluster(name)`."
        )  # fmt: skip


def _check_name_free(name: str) -> None:
    if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
        raise TaskDefinitionError(
            f"a seqio task or mixture named {name!r} is already registered; give the new one "
            "another name (or register it once: guard the module's registration code)."
        )


def add_task(
    name: str,
    *,
    source: seqio.DataSource,
    fields: Mapping[str, Field],
    templates: Sequence[Template],
    cluster: str,
    options: Sequence[str] | Callable[[Mapping[str, tf.Tensor]], tf.Tensor] | None = None,
    references: Callable[[Mapping[str, tf.Tensor]], tf.Tensor] | None = None,
    metrics: Sequence[Callable] = (),
    preprocessors: Sequence[Callable] = (),
    vocabulary: seqio.Vocabulary = DEFAULT_VOCABULARY,
    seed: int = 0,
    fewshot_config: fewshot.FewShotConfig = fewshot.FewShotConfig(),
) -> TemplatedTask:
    """Registers a templated task and its evaluation variants (see the module docstring).

    fields: text field name -> the raw example's feature of that name, or a function of the
        raw example returning a scalar (strings are used as they are; numbers are formatted).
    templates: `Template(inputs, targets, turned_around=...)` over the field names.
    options: the answer options of a classification task: fixed, or a function of the raw
        example returning a 1-D string tensor. Forward templates' targets must then be a
        single field whose value is one of the options.
    references: for generation tasks with several acceptable answers, a function of the raw
        example returning all of them (1-D strings; empty ones are dropped); the metrics
        compare against all.
    metrics: generation metric functions `(targets, predictions) -> {name: value}`.
        Classification tasks are measured by rank classification (accuracy; F1 too with
        fixed options).
    preprocessors: seqio preprocessors run on the raw examples first (filters, clean-ups).
    seed: keys the hash that picks each example's template.
    fewshot_config: exemplars per prompt and the input budget of the `_fewshot` variant.
    """
    _check_name_free(name)
    _check_cluster(cluster)
    templates = tuple(templates)
    fixed = tuple(options) if options is not None and not callable(options) else None
    if fixed is not None and not fixed:
        raise TaskDefinitionError(f"task {name!r}: the option list is empty; a classification task needs its options.")
    check_templates(name, templates, fields)
    if options is not None:
        templates = _with_options(name, templates)

    to_fields = _fields_preprocessor(name, fields, options, references)
    tokenize = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
    output_features = {
        "inputs": seqio.Feature(vocabulary, add_eos=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }
    common = dict(source=source, output_features=output_features)
    seqio.TaskRegistry.add(
        name, **common, preprocessors=[*preprocessors, to_fields, templates_preprocessor(templates, seed), *tokenize]
    )
    forward = tuple(t for t in templates if not t.turned_around)
    eval_task = fewshot_task = None
    metric_names: tuple[str, ...] = ()
    if forward and (options is not None or metrics):
        eval_task, fewshot_task = f"{name}_eval", f"{name}_fewshot"
        _check_name_free(eval_task)
        _check_name_free(fewshot_task)
        passthrough, tail, metric_fns, postprocess, metric_names = _evaluation(options, fixed, references, metrics, tokenize)
        head = [*preprocessors, to_fields]
        render = templates_preprocessor(forward, seed, passthrough=passthrough)
        shots = fewshot.exemplars_preprocessor(forward, source, head, vocabulary, fewshot_config)
        for task_name, steps in ((eval_task, [render]), (fewshot_task, [render, shots])):
            seqio.TaskRegistry.add(
                task_name, **common, preprocessors=[*head, *steps, *tail],
                postprocess_fn=postprocess, metric_fns=metric_fns,
            )  # fmt: skip
    task = TemplatedTask(
        name=name, cluster=cluster, templates=templates, metrics=metric_names, eval_task=eval_task, fewshot_task=fewshot_task,
        source=str(source) if type(source).__str__ is not object.__str__ else type(source).__name__,
        options=fixed if fixed is not None else (() if options is not None else None),
    )
    _TASKS[name] = task
    return task


def _with_options(name: str, templates: tuple[Template, ...]) -> tuple[Template, ...]:
    """A classification task's templates: the forward ones list the options after the prompt."""
    _check_classification_templates(name, templates)
    return tuple(t if t.turned_around else dataclasses.replace(t, inputs=t.inputs + "{" + _OPTIONS_BLOCK + "}") for t in templates)


def _evaluation(options, fixed, references, metrics, tokenize):
    """How the evaluation variants render and score: (fields kept, steps after rendering, metric
    functions, postprocessor, metric names). Rank classification over the options for a
    classification task; the metrics on generated text otherwise."""
    if options is not None:
        metric_fns = [functools.partial(rank_classification_metric, num_classes=len(fixed) if fixed else None)]
        names = ("accuracy", "f1") if fixed else ("accuracy",)
        return (OPTIONS,), [rank_classification, *tokenize], metric_fns, rank_classification_targets, names
    names = tuple(getattr(m, "__name__", type(m).__name__) for m in metrics)
    passthrough = (REFERENCES,) if references is not None else ()
    return passthrough, tokenize, list(metrics), _postprocess_generation, names


def label(names: Sequence[str], key: str = "label") -> Callable[[Mapping[str, tf.Tensor]], tf.Tensor]:
    """A field: the name of an example's integer class label, e.g. `label(["no", "yes"])`."""
    return lambda example: tf.gather(list(names), tf.cast(example[key], tf.int32))


def labelled(ds: tf.data.Dataset, key: str = "label") -> tf.data.Dataset:
    """A preprocessor: drops examples whose label is hidden (TFDS stores hidden labels as -1)."""
    return ds.filter(lambda example: example[key] >= 0)


def _check_classification_templates(name: str, templates: Sequence[Template]) -> None:
    for i, t in enumerate(templates):
        if not t.turned_around and not re.fullmatch(r"\{\w+\}", t.targets):
            raise TemplateError(
                f"task {name!r}, template {i}: a classification template's target must be the "
                f"answer field alone (e.g. '{{answer}}'), so rank classification can compare it "
                f"with the options; got {t.targets!r}. Mark templates that ask something else "
                "`turned_around=True`."
            )


def _as_text(value: tf.Tensor) -> tf.Tensor:
    return value if value.dtype == tf.string else tf.strings.as_string(value)


def _fields_preprocessor(name: str, fields: Mapping[str, Field], options, references):
    """Raw examples -> stripped text fields (+ options, non-empty references); drops examples
    with an empty field."""

    def to_fields(example):
        out = {k: tf.strings.strip(_as_text(example[v] if isinstance(v, str) else v(example))) for k, v in fields.items()}
        if options is not None:
            opts = tf.constant(list(options)) if not callable(options) else tf.strings.strip(_as_text(options(example)))
            check = tf.debugging.assert_positive(
                tf.size(opts), message=f"task {name!r}: an example has an empty option list; "
                "drop such examples with a preprocessor (filter) or fix the options function."
            )  # fmt: skip
            with tf.control_dependencies([check]):
                out[OPTIONS] = tf.identity(opts)
            out[_OPTIONS_BLOCK] = tf.strings.join(["\n\nOPTIONS:\n- ", tf.strings.reduce_join(opts, separator="\n- ")])
        if references is not None:
            refs = tf.strings.strip(_as_text(references(example)))
            out[REFERENCES] = tf.boolean_mask(refs, tf.strings.length(refs) > 0)
        return out

    def non_empty(example):
        text = [example[k] for k in fields]
        return tf.reduce_all(tf.stack([tf.strings.length(t) > 0 for t in text]))

    def apply(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(to_fields, num_parallel_calls=tf.data.AUTOTUNE).filter(non_empty)

    return apply


def _postprocess_generation(output, example=None, is_target: bool = False):
    """Generated text and targets stripped; targets become all references when the task has them."""
    if is_target and example is not None and REFERENCES in example:
        return [r.decode("utf-8") if isinstance(r, bytes) else str(r) for r in example[REFERENCES]]
    return output.strip() if isinstance(output, str) else output


capped_rate = functools.partial(seqio.mixing_rate_num_examples, maximum=MAX_EXAMPLES_PER_TASK)


def mixture_members(tasks: Sequence[str] = (), clusters: Sequence[str] = (), variant: str = "train") -> list[str]:
    """seqio task names of the named templated tasks and clusters, in registration order:
    the training tasks, or their `eval` or `fewshot` variants (tasks without one are left out)."""
    if variant not in VARIANTS:
        raise TaskDefinitionError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    for cluster in clusters:
        _check_cluster(cluster)
        if not templated_tasks(cluster):
            raise TaskDefinitionError(f"cluster {cluster!r} has no registered tasks; import the module that registers them.")
    chosen = {get_task(t).name for t in tasks} | {t.name for c in clusters for t in templated_tasks(c)}
    attribute = {"train": "name", "eval": "eval_task", "fewshot": "fewshot_task"}[variant]
    return [getattr(t, attribute) for t in _TASKS.values() if t.name in chosen and getattr(t, attribute)]


def add_mixture(
    name: str,
    *,
    tasks: Sequence[str] = (),
    clusters: Sequence[str] = (),
    variant: str = "train",
    rate: Callable | float | None = None,
) -> seqio.Mixture:
    """Registers a seqio mixture of templated tasks and whole clusters.

    Training mixtures (the default variant) sample tasks in proportion to their number of
    training examples, capped at 3,000 (`capped_rate`); evaluation mixtures (variant "eval"
    or "fewshot") hold the members' evaluation tasks, each evaluated in full.
    """
    _check_name_free(name)
    members = mixture_members(tasks, clusters, variant)
    if not members:
        raise TaskDefinitionError(f"mixture {name!r} would be empty: name at least one task or cluster with tasks in it.")
    default = capped_rate if variant == "train" else 1.0
    return seqio.MixtureRegistry.add(name, members, default_rate=rate if rate is not None else default)
