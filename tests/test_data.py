"""Tests of the data pipeline: flanjax.data (vocabulary, templates, seqio batches) and the
quickstart tasks.

Expected values come from outside the code under test: the Python tokenizer, `str.format`,
seqio's own feature converters and the worked example in seqio's PrefixLM docstring, or
plain-Python reconstructions of the packed rows. Every task a test registers gets a unique
name and is removed from the seqio registry afterwards.
"""

from __future__ import annotations

import collections
import functools
import itertools
import random
import uuid

import numpy as np
import pytest
import seqio
import tensorflow as tf

from flanjax.data.pipeline import SeqioBatches, TaskNotFoundError, get_task_or_mixture
from flanjax.data.templates import (
    Template,
    TemplateError,
    check_templates,
    render_tf,
    templates_preprocessor,
)
from flanjax.data.vocab import HFVocabulary, TokenizerNotFoundError

EOS = 1
TOKEN_VOCAB = seqio.PassThroughVocabulary(size=64, eos_id=EOS)

# --- helpers ---------------------------------------------------------------------------------


def _unique_name(prefix: str) -> str:
    return f"test_data_{prefix}_{uuid.uuid4().hex[:8]}"


def _token_dataset_fn(examples, split, shuffle_files, seed=None):
    """Pre-tokenized {"inputs", "targets"} int32 examples, as a tf.data source."""
    del split, shuffle_files, seed

    def padded(key):
        width = max(len(e[key]) for e in examples)
        return np.array([e[key] + [0] * (width - len(e[key])) for e in examples], np.int32)

    ds = tf.data.Dataset.from_tensor_slices(
        {
            "inputs": padded("inputs"),
            "targets": padded("targets"),
            "n_inputs": np.array([len(e["inputs"]) for e in examples], np.int32),
            "n_targets": np.array([len(e["targets"]) for e in examples], np.int32),
        }
    )
    return ds.map(lambda x: {"inputs": x["inputs"][: x["n_inputs"]], "targets": x["targets"][: x["n_targets"]]})


def _token_example(i: int, rng: random.Random) -> dict[str, list[int]]:
    """Example i: its first input token (20 + i) identifies it; both parts end with EOS."""
    inputs = [20 + i] + [rng.randint(2, 19) for _ in range(rng.randint(0, 4))] + [EOS]
    targets = [rng.randint(2, 19) for _ in range(rng.randint(0, 3))] + [EOS]
    return {"inputs": inputs, "targets": targets}


TOKEN_EXAMPLES = [_token_example(i, random.Random(i)) for i in range(40)]
TOKEN_LENGTHS = {"inputs": 6, "targets": 4}  # every example fits; packed rows are 10 long

# The two examples of seqio's PrefixLMFeatureConverter docstring (Example 1).
DOC_EXAMPLES = [
    {"inputs": [7, 8, 5, 1], "targets": [3, 9, 1]},
    {"inputs": [8, 4, 9, 3, 1], "targets": [4, 1]},
]
DOC_LENGTHS = {"inputs": 7, "targets": 8}


@pytest.fixture
def register_task():
    """Registers seqio tasks under unique names; removes them after the test."""
    names = []

    def register(prefix: str, dataset_fn, output_features, preprocessors=()) -> str:
        name = _unique_name(prefix)
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(dataset_fn, splits=("train",)),
            preprocessors=list(preprocessors),
            output_features=output_features,
        )
        names.append(name)
        return name

    yield register
    for name in names:
        seqio.TaskRegistry.remove(name)
    assert not set(names) & set(seqio.TaskRegistry.names())


def _token_features():
    return {
        "inputs": seqio.Feature(TOKEN_VOCAB, add_eos=False),
        "targets": seqio.Feature(TOKEN_VOCAB, add_eos=False),
    }


@pytest.fixture
def token_task(register_task) -> str:
    return register_task("tokens", functools.partial(_token_dataset_fn, TOKEN_EXAMPLES), _token_features())


@pytest.fixture
def doc_task(register_task) -> str:
    return register_task("doc", functools.partial(_token_dataset_fn, DOC_EXAMPLES), _token_features())


@pytest.fixture
def batches():
    """Makes SeqioBatches and closes them after the test (their iterators hold tf.data threads)."""
    made = []

    def make(*args, **kwargs) -> SeqioBatches:
        kwargs.setdefault("shard_index", 0)
        kwargs.setdefault("num_shards", 1)
        b = SeqioBatches(*args, **kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(it, n))


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _example_ids(rows: list[dict]) -> list[int]:
    """The example ids (first input token - 20) of unpacked rows."""
    return [int(t) - 20 for batch in rows for t in batch["decoder_target_tokens"][:, 0]]


# --- vocabulary ------------------------------------------------------------------------------

CORPUS = [
    "The cat sat on the mat.",
    "A dog ate 12 apples, then 3 more!",
    "Über naïve café — {braces} and (parens)?",
    "reverse these words: sun moon star",
] * 5


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def vocab(tiny_tokenizer_dir) -> HFVocabulary:
    return HFVocabulary(tiny_tokenizer_dir)


TEXTS = ["The cat sat on the mat.", "Über café {x}", "", "dog 12"]


def test_vocab_special_ids_and_size(vocab, tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert vocab.eos_id == 1 == reference.convert_tokens_to_ids("</s>")
    assert vocab.unk_id == 2
    assert vocab.pad_id == 0 == reference.convert_tokens_to_ids("<pad>")
    assert vocab.vocab_size == len(reference.get_vocab()) == 300


def test_vocab_encode_decode_round_trip(vocab):
    for text in TEXTS:
        ids = vocab.encode(text)
        assert all(isinstance(i, int) and i > 2 for i in ids)  # never pad, eos or unk
        assert vocab.decode(ids) == text
    # seqio's contract: decoding stops at the first EOS.
    ids = vocab.encode("cat")
    assert vocab.decode(ids + [vocab.eos_id] + vocab.encode("dog")) == "cat"


def test_vocab_encode_tf_matches_encode(vocab):
    for text in TEXTS:
        np.testing.assert_array_equal(vocab.encode_tf(tf.constant(text)).numpy(), vocab.encode(text))

    def padded(texts):
        rows = [vocab.encode(t) for t in texts]
        width = max(map(len, rows))
        return np.array([r + [0] * (width - len(r)) for r in rows], np.int32)

    batch = vocab.encode_tf(tf.constant(TEXTS)).numpy()
    np.testing.assert_array_equal(batch, padded(TEXTS))
    # A 2-D batch keeps its shape: [2, 2, longest].
    grid = vocab.encode_tf(tf.constant([TEXTS[:2], TEXTS[2:]])).numpy()
    np.testing.assert_array_equal(grid, padded(TEXTS).reshape(2, 2, -1))


def test_vocab_encode_tf_inside_dataset_map(vocab):
    ds = tf.data.Dataset.from_tensor_slices(TEXTS).map(vocab.encode_tf)
    assert ds.element_spec.shape.as_list() == [None]
    for text, ids in zip(TEXTS, ds.as_numpy_iterator()):
        assert ids.tolist() == vocab.encode(text)


def test_vocab_decode_tf_matches_decode(vocab):
    for text in TEXTS:
        ids = vocab.encode(text) + [vocab.eos_id]
        assert vocab.decode_tf(tf.constant(ids, tf.int32)).numpy().decode() == vocab.decode(ids) == text
    rows = [vocab.encode(t) + [vocab.eos_id] for t in TEXTS]
    width = max(map(len, rows)) + 2
    batch = tf.constant([r + [0] * (width - len(r)) for r in rows], tf.int32)
    assert [s.decode() for s in vocab.decode_tf(batch).numpy()] == [vocab.decode(r) for r in rows]


def test_vocab_missing_directory(tmp_path):
    missing = str(tmp_path / "no_such_tokenizer")
    vocab = HFVocabulary(missing)  # loads lazily
    with pytest.raises(TokenizerNotFoundError, match="no_such_tokenizer") as e:
        vocab.encode("hello")
    assert missing in str(e.value)
    assert isinstance(e.value, FileNotFoundError)


# --- templates -------------------------------------------------------------------------------


def test_check_templates_names_task_template_and_field():
    good = Template("What is {a} plus {b}?", "{answer}")
    check_templates("add", [good], ["a", "b", "answer"])  # no error
    with pytest.raises(TemplateError) as e:
        check_templates("my_add_task", [good, Template("{a} + {c} =", "{answer}")], ["a", "b", "answer"])
    message = str(e.value)
    assert "my_add_task" in message and "template 1" in message and "{c}" in message
    assert "template 0" not in message
    # A missing field in the targets is caught too.
    with pytest.raises(TemplateError, match=r"template 0: field \{missing\}"):
        check_templates("t", [Template("{a}", "{missing}")], ["a"])
    with pytest.raises(TemplateError, match="no templates"):
        check_templates("t", [], ["a"])
    with pytest.raises(TemplateError, match="not a plain field name"):
        check_templates("t", [Template("{a[0]}", "{a}")], ["a"])
    with pytest.raises(TemplateError, match="malformed"):
        check_templates("t", [Template("{a", "{a}")], ["a"])


@pytest.mark.parametrize(
    "pattern",
    [
        "What is {a} plus {b}?",
        "{a}{b}",
        "literal {{braces}} around {a} and }}{{ {b}",
        "{{{a}}}",
        "no fields at all",
        "",
        "naïve {a} — café\n{b}",
    ],
)
def test_render_tf_matches_str_format(pattern):
    fields = {"a": "x{y}", "b": "Ünïcode 12"}
    expected = Template(pattern, pattern).render(fields)[0]
    assert expected == pattern.format(**fields)
    got = render_tf(pattern, {k: tf.constant(v) for k, v in fields.items()})
    assert got.numpy().decode() == expected


TEMPLATES = (
    Template("What is {a} plus {b}?", " {answer}"),
    Template("Add {a} and {b}.", "{answer}"),
    Template("{{sum}} {a} + {b} =", " {answer}"),
    Template("{b} and {a}", "= {answer}"),
)
FIELD_EXAMPLES = [{"a": str(i), "b": str(3 * i % 17), "answer": str(i + 3 * i % 17)} for i in range(200)]


def _fields_dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices({k: [e[k] for e in FIELD_EXAMPLES] for k in FIELD_EXAMPLES[0]})


@pytest.fixture
def templated_task(register_task):
    def register(template_seed: int = 0) -> str:
        text = seqio.PassThroughVocabulary(size=0)
        features = {
            "inputs": seqio.Feature(text, dtype=tf.string, rank=0, add_eos=False),
            "targets": seqio.Feature(text, dtype=tf.string, rank=0, add_eos=False),
        }
        preprocessor = templates_preprocessor(TEMPLATES, seed=template_seed)
        return register_task(f"templated_{template_seed}", _fields_dataset_fn, features, [preprocessor])

    return register


def _rendered(task_name: str, seed: int, shuffle: bool = False) -> list[tuple[int, str, str]]:
    ds = seqio.get_mixture_or_task(task_name).get_dataset(
        sequence_length=None, split="train", shuffle=shuffle, seed=seed
    )
    return [(int(x["template"]), x["inputs"].decode(), x["targets"].decode()) for x in ds.as_numpy_iterator()]


def test_templates_preprocessor_reproducible_choice(templated_task):
    task = templated_task()
    first = _rendered(task, seed=5)
    assert first == _rendered(task, seed=5)
    assert len(first) == len(FIELD_EXAMPLES)
    # Each example is its template rendered by str.format on its own fields.
    for (choice, inputs, targets), fields in zip(first, FIELD_EXAMPLES):
        assert (inputs, targets) == TEMPLATES[choice].render(fields)
    # The draw covers every template, roughly uniformly (expected 50 each of 200).
    counts = collections.Counter(choice for choice, _, _ in first)
    assert sorted(counts) == list(range(len(TEMPLATES)))
    assert min(counts.values()) >= 25
    # The choice belongs to the example, not to its place in the stream: shuffling (or
    # sharding over hosts) renders every example the same way.
    assert sorted(_rendered(task, seed=6, shuffle=True)) == sorted(first)
    # Another template seed draws other templates.
    other = [choice for choice, _, _ in _rendered(templated_task(template_seed=1), seed=5)]
    assert other != [choice for choice, _, _ in first]


# --- packing and loss weights ----------------------------------------------------------------


def test_packed_batches_equal_seqio_decoder_converter(token_task, batches):
    for shuffle in (False, True):
        ours = list(
            batches(token_task, TOKEN_LENGTHS, batch_size=2, shuffle=shuffle, seed=3, pack=True, num_epochs=1)
        )
        reference = seqio.get_dataset(
            token_task,
            task_feature_lengths=TOKEN_LENGTHS,
            feature_converter=seqio.DecoderFeatureConverter(pack=True),
            dataset_split="train",
            shuffle=shuffle,
            num_epochs=1,
            seed=3,
        ).batch(2, drop_remainder=True)
        reference = list(reference.as_numpy_iterator())
        assert len(ours) >= 5
        assert set(ours[0]) == {
            "decoder_target_tokens",
            "decoder_input_tokens",
            "decoder_loss_weights",
            "decoder_segment_ids",
            "decoder_positions",
            "decoder_causal_attention",
        }
        _assert_batches_equal(ours, reference)
        assert ours[0]["decoder_target_tokens"].shape == (2, sum(TOKEN_LENGTHS.values()))


def test_packed_rows_reconstruct_every_example(token_task, batches):
    """Each packed segment is one example's inputs + targets, with loss on the targets only."""
    rows = list(batches(token_task, TOKEN_LENGTHS, batch_size=1, shuffle=False, pack=True, num_epochs=1))
    seen = []
    for batch in rows:
        row = {k: v[0] for k, v in batch.items()}
        seg = row["decoder_segment_ids"]
        pad = seg == 0
        for key in ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights", "decoder_positions"):
            assert not row[key][pad].any(), key
        segments = [s for s, _ in itertools.groupby(seg) if s]
        assert segments == list(range(1, len(segments) + 1))  # contiguous, numbered from 1
        for s in segments:
            at = seg == s
            tokens = row["decoder_target_tokens"][at].tolist()
            example = TOKEN_EXAMPLES[tokens[0] - 20]
            seen.append(tokens[0] - 20)
            n_in, n_tgt = len(example["inputs"]), len(example["targets"])
            assert tokens == example["inputs"] + example["targets"]
            assert row["decoder_input_tokens"][at].tolist() == [0] + tokens[:-1]
            assert row["decoder_loss_weights"][at].tolist() == [0] * n_in + [1] * n_tgt
            assert row["decoder_positions"][at].tolist() == list(range(n_in + n_tgt))
            assert row["decoder_causal_attention"][at].tolist() == [1] * (n_in + 1) + [0] * (n_tgt - 1)
    assert sorted(seen) == list(range(len(TOKEN_EXAMPLES)))
    assert len(rows) < len(TOKEN_EXAMPLES)  # packing did put several examples in a row


def test_packed_seqio_docstring_example(doc_task, batches):
    rows = list(batches(doc_task, DOC_LENGTHS, batch_size=1, shuffle=False, pack=True, num_epochs=1))
    assert len(rows) == 1
    row = {k: v[0].tolist() for k, v in rows[0].items()}
    assert row == {
        "decoder_target_tokens": [7, 8, 5, 1, 3, 9, 1, 8, 4, 9, 3, 1, 4, 1, 0],
        "decoder_input_tokens": [0, 7, 8, 5, 1, 3, 9, 0, 8, 4, 9, 3, 1, 4, 0],
        "decoder_loss_weights": [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0],
        "decoder_positions": [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0],
        "decoder_segment_ids": [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0],
        "decoder_causal_attention": [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
    }


def test_unpacked_rows_have_segment_ids_and_positions(doc_task, batches):
    rows = list(batches(doc_task, DOC_LENGTHS, batch_size=2, shuffle=False, pack=False, num_epochs=1))
    assert len(rows) == 1
    batch = rows[0]
    length = sum(DOC_LENGTHS.values())
    for i, ex in enumerate(DOC_EXAMPLES):
        n_in, n_tgt = len(ex["inputs"]), len(ex["targets"])
        n_pad = length - n_in - n_tgt
        tokens = ex["inputs"] + ex["targets"]
        assert batch["decoder_target_tokens"][i].tolist() == tokens + [0] * n_pad
        assert batch["decoder_input_tokens"][i].tolist() == [0] + tokens + [0] * (n_pad - 1)
        assert batch["decoder_loss_weights"][i].tolist() == [0] * n_in + [1] * n_tgt + [0] * n_pad
        assert batch["decoder_segment_ids"][i].tolist() == [1] * (n_in + n_tgt) + [0] * n_pad
        assert batch["decoder_positions"][i].tolist() == list(range(length))
    for key, value in batch.items():
        assert value.dtype == np.int32 and value.shape == (2, length), key


# --- determinism, resume, shards -------------------------------------------------------------


def test_same_seed_same_batches_other_seed_differs(token_task, batches):
    a = _take(batches(token_task, TOKEN_LENGTHS, batch_size=2, seed=1), 3)
    b = _take(batches(token_task, TOKEN_LENGTHS, batch_size=2, seed=1), 3)
    c = _take(batches(token_task, TOKEN_LENGTHS, batch_size=2, seed=2), 3)
    _assert_batches_equal(a, b)
    assert any(
        not np.array_equal(x["decoder_target_tokens"], y["decoder_target_tokens"]) for x, y in zip(a, c)
    )


def test_resume_from_state_continues_the_stream(token_task, batches):
    k = 15  # past the end of the first epoch (about 13 batches): the reshuffled epoch resumes too
    make = functools.partial(batches, token_task, TOKEN_LENGTHS, batch_size=2, seed=7, pack=True)
    uninterrupted = _take(make(), k + 2)

    interrupted = make()
    _take(interrupted, k)
    state = interrupted.get_state()
    assert state["position"] == k
    interrupted.close()

    resumed = make()
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 2), uninterrupted[k:])
    assert resumed.position == k + 2


def test_process_shards_are_disjoint_and_complete(token_task, batches):
    def ids(index, num):
        return _example_ids(
            batches(
                token_task, TOKEN_LENGTHS, batch_size=1, shuffle=False, pack=False, num_epochs=1,
                shard_index=index, num_shards=num,
            )
        )

    shard0, shard1, everything = ids(0, 2), ids(1, 2), ids(0, 1)
    assert shard0 and shard1
    assert not set(shard0) & set(shard1)
    assert len(shard0) + len(shard1) == len(everything)
    assert set(shard0) | set(shard1) == set(everything) == set(range(len(TOKEN_EXAMPLES)))


# --- registry and quickstart -----------------------------------------------------------------


@pytest.fixture(scope="module")
def quickstart():
    import tasks.quickstart

    return tasks.quickstart


def test_unknown_name_suggests_close_match(quickstart, batches):
    assert isinstance(get_task_or_mixture("quickstart_max"), seqio.Task)
    assert isinstance(get_task_or_mixture("quickstart"), seqio.Mixture)
    with pytest.raises(TaskNotFoundError) as e:
        get_task_or_mixture("quickstart_maxx")
    assert "quickstart_max" in str(e.value)
    assert isinstance(e.value, KeyError)
    with pytest.raises(TaskNotFoundError, match="quickstart_sort"):
        batches("quickstart_sortt", {"inputs": 8, "targets": 8}, batch_size=1)


QUICKSTART_TASKS = ["quickstart_max", "quickstart_sort", "quickstart_add", "quickstart_count", "quickstart_lookup", "quickstart_larger"]


@pytest.mark.parametrize("name", QUICKSTART_TASKS)
def test_quickstart_task(quickstart, name):
    assert set(quickstart.TASKS) == set(QUICKSTART_TASKS)
    make, templates = quickstart.TASKS[name]
    train = quickstart.generate(name, "train")
    validation = quickstart.generate(name, "validation")
    assert len(train) == quickstart.NUM_EXAMPLES["train"]
    assert len(validation) == quickstart.NUM_EXAMPLES["validation"]
    seen = {repr(sorted(p.items())) for p in train}
    assert not any(repr(sorted(p.items())) in seen for p in validation)

    task = get_task_or_mixture(name)
    vocab = quickstart.VOCABULARY
    ds = task.get_dataset(
        sequence_length={"inputs": 256, "targets": 64}, split="validation", shuffle=False, seed=0
    ).take(16)
    for problem, ex in zip(validation, ds.as_numpy_iterator()):
        inputs, targets = ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()
        assert inputs.strip() and targets.strip()
        assert (inputs, targets) == templates[int(ex["template"])].render(problem)
        assert len(ex["inputs"]) > 0 and ex["inputs"].tolist() == vocab.encode(inputs)
        assert ex["targets"].tolist() == vocab.encode(targets) + [vocab.eos_id]
        assert targets.strip() == problem["answer"]


def test_quickstart_mixture_batches(quickstart, batches):
    lengths = {"inputs": 64, "targets": 16}
    first = _take(batches("quickstart", lengths, batch_size=2, split="validation", seed=0), 2)
    again = _take(batches("quickstart", lengths, batch_size=2, split="validation", seed=0), 2)
    _assert_batches_equal(first, again)
    tokens = first[0]["decoder_target_tokens"]
    assert tokens.shape == (2, 80)
    assert first[0]["decoder_loss_weights"].sum() > 0
    text = quickstart.VOCABULARY.decode(tokens[0][first[0]["decoder_segment_ids"][0] == 1].tolist())
    assert text.strip()
