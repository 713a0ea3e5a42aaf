"""The FLAN collection under TFDS mock data: 62 datasets, their templates, splits, mixtures."""

from __future__ import annotations

import seqio
import pytest
import tensorflow_datasets as tfds

import tasks.flan  # noqa: F401  (registers the collection)
from flanjax.data import templated
from flanjax.data.fewshot import FewShotConfig
from flanjax.data.pipeline import text_examples
from flanjax.data.templated import FLAN_CLUSTERS, MAX_EXAMPLES_PER_TASK
from flanjax.data.vocab import DEFAULT_VOCABULARY as VOCABULARY
from tasks.flan.mixtures import ALSO_HELD_OUT

# The paper's datasets per cluster (ANLI's rounds, ARC's sets and SQuAD's versions count once).
DATASETS_PER_CLUSTER = {
    "nli": 7, "commonsense": 4, "sentiment": 4, "paraphrase": 4, "closed_book_qa": 3, "struct_to_text": 4,
    "translation": 8, "reading_comprehension": 5, "reading_comprehension_commonsense": 2, "coreference": 3,
    "misc": 7, "summarization": 11,
}  # fmt: skip
FLAN = [t for c in FLAN_CLUSTERS for t in templated.templated_tasks(c)]
OPTIONS_HEADER = "\n\nOPTIONS:\n- "


@pytest.fixture(autouse=True, scope="module")
def mock_tfds():
    with tfds.testing.mock_data(num_examples=30):  # some filters drop most random examples
        yield


def test_62_datasets_in_12_clusters():
    assert {c: len(templated.templated_tasks(c)) for c in FLAN_CLUSTERS} == DATASETS_PER_CLUSTER
    assert len(FLAN) == 62 and all(t.name.startswith("flan_") for t in FLAN)
    for task in FLAN:
        assert len(task.templates) == 10, task.name
        assert sum(t.turned_around for t in task.templates) <= 3, task.name
        assert len({(t.inputs, t.targets) for t in task.templates}) == 10, f"{task.name}: repeated templates"
        assert task.source.startswith("tfds:"), task.name
        assert task.eval_task and task.metrics, f"{task.name} has no evaluation"


def _fields(example) -> dict[str, str]:
    return {k: v.decode() for k, v in example.items() if isinstance(v, bytes)}


@pytest.mark.parametrize("task", FLAN, ids=lambda t: t.name)
def test_every_template_renders_on_every_split(task):
    """Every template of every dataset, on mock examples of each split: no missing field, no
    empty input or target, and the options block exactly where the task classifies."""
    for split in ("train", "validation", "test"):
        raw = seqio.get_mixture_or_task(task.name)
        assert split in raw.splits
        ds = raw.source.get_dataset(split, shuffle=False)
        for step in raw.preprocessors[:-3]:  # up to the fields: templates, tokenize and EOS follow
            ds = step(ds)
        examples = list(ds.take(8).as_numpy_iterator())
        assert examples, f"{task.name}: no mock example survives preprocessing in {split}"
        for example in examples:
            fields = _fields(example)
            for i, template in enumerate(task.templates):
                inputs, targets = template.render(fields)  # KeyError = a missing field
                assert inputs.strip() and targets.strip(), (task.name, i, inputs, targets)
                if task.classification and not template.turned_around:
                    options = [o.decode() for o in example["options"]]
                    assert inputs.endswith(OPTIONS_HEADER + "\n- ".join(options)), (task.name, i)
                    assert inputs.count("OPTIONS:") == 1 and targets in options, (task.name, i, targets, options)
                else:
                    assert "OPTIONS:" not in inputs, (task.name, i)


@pytest.mark.parametrize("task", FLAN, ids=lambda t: t.name)
def test_training_and_evaluation_tasks_tokenize(task):
    lengths = {"inputs": 256, "targets": 64}
    for name, split in ((task.name, "train"), (task.eval_task, "test"), (task.fewshot_task, "test")):
        examples = list(seqio.get_mixture_or_task(name).get_dataset(lengths, split=split, shuffle=False).take(2).as_numpy_iterator())
        assert examples and all(len(e["inputs"]) and len(e["targets"]) for e in examples), (name, split)
    shot = text_examples(task.fewshot_task, "test", 1)[0]["inputs"].decode()
    query = text_examples(task.eval_task, "test", 1)[0]["inputs"].decode()
    assert shot.endswith(query)
    # Exemplars come first, unless the (random, mock) prompt leaves no room for one.
    prompt_tokens = len(VOCABULARY.encode(query))
    assert len(shot) > len(query) or prompt_tokens > FewShotConfig().max_input_tokens // 4, (prompt_tokens, query[:80])
    assert len(VOCABULARY.encode(shot)) <= max(FewShotConfig().max_input_tokens + 8, prompt_tokens)


def test_leave_one_cluster_out_mixtures_hold_exactly_the_right_tasks():
    cluster_of = {t.name: t.cluster for t in FLAN}
    for held_out in FLAN_CLUSTERS:
        excluded = {held_out, *ALSO_HELD_OUT.get(held_out, ())}
        train = {t.name for t in seqio.get_mixture_or_task(f"flan_heldout_{held_out}_train").tasks}
        assert train == {name for name, cluster in cluster_of.items() if cluster not in excluded}, held_out
        evaluation = {t.name for t in seqio.get_mixture_or_task(f"flan_heldout_{held_out}_eval").tasks}
        assert evaluation == {t.eval_task for t in FLAN if t.cluster == held_out}
    # FLAN's pairs, spelled out.
    nli_train = {t.name for t in seqio.get_mixture_or_task("flan_heldout_nli_train").tasks}
    assert "flan_qqp" not in nli_train and "flan_rte" not in nli_train and "flan_imdb" in nli_train
    rc_train = {t.name for t in seqio.get_mixture_or_task("flan_heldout_reading_comprehension_train").tasks}
    assert "flan_cosmos_qa" not in rc_train and "flan_squad" not in rc_train and "flan_copa" in rc_train
    assert len(seqio.get_mixture_or_task("flan_all_train").tasks) == 62


def test_mixing_rates_are_examples_proportional_capped_at_3000():
    mixture = seqio.get_mixture_or_task("flan_all_train")
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    for task in mixture.tasks:
        size = task.num_input_examples("train")
        assert size and rates[task.name] == min(size, MAX_EXAMPLES_PER_TASK), task.name
    assert rates["flan_cb"] == 200 and rates["flan_copa"] < 3000 and rates["flan_mnli"] == 3000


_AUXILIARIES = {"is", "are", "was", "were", "do", "does", "did", "would", "will", "can", "could", "should", "has", "have"}


def _yes_no_questions(text: str) -> list[str]:
    """The questions of a template (fields left out) that a yes or a no answers: ones opening
    a clause with an auxiliary verb, or asking "whether"/"if", without an "or" alternative."""
    import re

    sentences = re.split(r"(?<=[.?!:])\s+|\n+", re.sub(r"\{\w+\}", "...", text))
    found = []
    for sentence in sentences:
        clauses = [re.findall(r"[a-z']+", c.lower()) for c in sentence.split(",")]
        asks = (sentence.endswith("?") and any(c and c[0] in _AUXILIARIES for c in clauses)) or any(
            w in ("whether", "if") for c in clauses for w in c
        )
        if asks and "or" not in {w for c in clauses for w in c}:
            found.append(sentence.strip())
    return found


def test_sentiment_questions_fit_their_options():
    """A yes/no question needs yes/no options; the sentiment tasks answer negative/positive."""
    assert _yes_no_questions("{text}\n\nWould you say the writer recommends this movie?")
    assert _yes_no_questions("Read this review and tell me if it is favourable.\n\n{text}")
    assert not _yes_no_questions("{text}\n\nIs this movie review positive or negative?")
    assert not _yes_no_questions("Tweet: {text}\n\nWhat is the mood of this tweet?")
    for task in templated.templated_tasks("sentiment"):
        yes_no = {o.lower() for o in task.options} == {"yes", "no"}
        for template in task.forward_templates:
            questions = _yes_no_questions(template.inputs)
            assert yes_no or not questions, f"{task.name}: {questions} answered by {task.options}"
