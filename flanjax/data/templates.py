"""Natural-language instruction templates, rendered inside the seqio (tf.data) pipeline.

A template is a pair of format strings over an example's flat text fields, e.g.
`Template("What is {a} plus {b}?", "{answer}")`. Fields are written `{name}`; literal
braces are doubled (`{{`, `}}`), as in `str.format`. Each example gets one template chosen
by a keyed hash of its own fields: the choice is reproducible and does not depend on the
example's position in the stream, so any sharding over hosts or shuffling of the data
renders every example the same way.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from flanjax.errors import FlanjaxError


class TemplateError(FlanjaxError, ValueError):
    """A template that cannot be rendered from the task's fields."""


@dataclasses.dataclass(frozen=True)
class Template:
    inputs: str
    targets: str
    # A "turned around" template asks the inverse question (FLAN): e.g. write the premise
    # for a given label instead of predicting the label.
    turned_around: bool = False

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(_fields(self.inputs) | _fields(self.targets))

    def render(self, fields: Mapping[str, str]) -> tuple[str, str]:
        return self.inputs.format_map(fields), self.targets.format_map(fields)


def _parse(pattern: str) -> list[tuple[str, str | None]]:
    try:
        return [(lit, name) for lit, name, _, _ in string.Formatter().parse(pattern)]
    except ValueError as e:
        raise TemplateError(f"malformed template {pattern!r}: {e}") from None


def _fields(pattern: str) -> set[str]:
    return {name for _, name in _parse(pattern) if name is not None}


def check_templates(task_name: str, templates: Sequence[Template], fields: Sequence[str]) -> None:
    """Raises TemplateError naming the task, template index and field that does not exist."""
    if not templates:
        raise TemplateError(f"task {task_name!r} has no templates.")
    available = set(fields)
    for i, t in enumerate(templates):
        for name in sorted(t.fields):
            if not name.isidentifier():
                raise TemplateError(
                    f"task {task_name!r}, template {i}: field {{{name}}} is not a plain field name "
                    "(no indexing, attributes or format specs)."
                )
            if name not in available:
                raise TemplateError(
                    f"task {task_name!r}, template {i}: field {{{name}}} is not produced by the "
                    f"task's preprocessing (available: {sorted(available)})."
                )


def render_tf(pattern: str, features: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """Renders a format string with scalar tf.string features, inside a tf.data map."""
    parts: list[tf.Tensor | str] = []
    for literal, name in _parse(pattern):
        if literal:
            parts.append(literal)
        if name is not None:
            parts.append(features[name])
    return tf.strings.join(parts) if parts else tf.constant("")


def templates_preprocessor(templates: Sequence[Template], seed: int = 0, passthrough: Sequence[str] = ()):
    """A seqio preprocessor: flat text fields -> {"inputs", "targets", "template"} and the
    `passthrough` fields unchanged (e.g. "options", for rank classification).

    `seed` keys the hash that picks each example's template.
    """
    templates = tuple(templates)

    @seqio.map_over_dataset
    def apply(example):
        text = [example[k] for k in sorted(example) if example[k].dtype == tf.string and example[k].shape.rank == 0]
        content = tf.strings.reduce_join(tf.stack(text), separator="\x1f")
        choice = tf.cast(
            tf.strings.to_hash_bucket_strong(content, len(templates), key=[seed, 0x7E3]), tf.int32
        )
        branches = [
            (lambda t=t: tf.stack([render_tf(t.inputs, example), render_tf(t.targets, example)]))
            for t in templates
        ]
        rendered = tf.switch_case(choice, branches)
        return {"inputs": rendered[0], "targets": rendered[1], "template": choice, **{k: example[k] for k in passthrough}}

    return apply
