"""A seqio `Vocabulary` backed by a Hugging Face tokenizer in a directory (local, or remote such
as gs://: Hugging Face reads only local files, so a remote one is read from a copy in the cache).

seqio reserves id 0 for padding (its feature converters pad and mask with 0), so the
tokenizer's id 0 must never be produced for real text: true of tokenizers whose id 0 is a
pad or unknown token (T5, LLaMA, the tokenizers flanjax trains).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf
import transformers

from flanjax import paths
from flanjax.errors import FlanjaxError


class TokenizerNotFoundError(FlanjaxError, FileNotFoundError):
    pass


class HFVocabulary(seqio.Vocabulary):
    """Wraps `transformers.AutoTokenizer.from_pretrained(path)`, loaded on first use.

    `path` is a directory holding tokenizer files, or a zero-argument callable returning one
    (for tokenizers built on demand, such as the quickstart's).
    """

    def __init__(self, path: str | os.PathLike | Callable[[], str], extra_ids: int = 0):
        self._path = path
        super().__init__(extra_ids=extra_ids)

    @functools.cached_property
    def path(self) -> str:
        # Resolved once: seqio hashes and compares vocabularies, and a callable may build files.
        return str(self._path() if callable(self._path) else self._path)

    @functools.cached_property
    def tokenizer(self) -> transformers.PreTrainedTokenizerBase:
        path = self.path
        if not paths.isdir(path):
            raise TokenizerNotFoundError(
                f"tokenizer directory {path!r} does not exist. Point the vocabulary at a local (or gs://) "
                "directory containing tokenizer.json / tokenizer_config.json (for a Hub model, "
                "download it first with `hf download MODEL --local-dir DIR`)."
            )
        tok = transformers.AutoTokenizer.from_pretrained(paths.local_copy(path))
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer in {path!r} defines no EOS token; seqio needs one.")
        return tok

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def unk_id(self) -> int | None:
        return self.tokenizer.unk_token_id

    @property
    def _base_vocab_size(self) -> int:
        return len(self.tokenizer)

    def _encode(self, s: str) -> Sequence[int]:
        return self.tokenizer.encode(s, add_special_tokens=False)

    def _decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        def encode(x: np.ndarray) -> np.ndarray:
            flat = [t.decode("utf-8") for t in np.ravel(x)]
            ids = self.tokenizer(flat, add_special_tokens=False)["input_ids"]
            if np.ndim(x) == 0:
                return np.asarray(ids[0], np.int32)
            padded = tf.ragged.constant(ids, dtype=tf.int32).to_tensor().numpy()
            return padded.reshape(np.shape(x) + padded.shape[-1:])  # [..., longest]

        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        ids.set_shape(s.shape.concatenate([None]))
        return ids

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        def decode(x: np.ndarray) -> np.ndarray:
            if x.ndim == 1:
                return np.asarray(self._decode(x).encode("utf-8"), dtype=object)
            return np.asarray([self._decode(r).encode("utf-8") for r in x], dtype=object)

        out = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        out.set_shape(ids.shape[:-1])
        return out

    def fingerprint(self) -> str:
        """Identifies the token <-> id mapping (not the path): a model and the data it reads,
        and models that exchange token ids (policy, reference, reward model), must share it."""
        return self._fingerprint

    @functools.cached_property
    def _fingerprint(self) -> str:
        vocab = sorted(self.tokenizer.get_vocab().items())
        return hashlib.sha1(json.dumps(vocab).encode()).hexdigest()[:16]

    def __eq__(self, other) -> bool:
        return isinstance(other, HFVocabulary) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)


def train_tokenizer(corpus: Iterable[str], vocab_size: int, individual_digits: bool = False,
                    special_tokens: Sequence[str] = ()) -> transformers.PreTrainedTokenizerFast:  # fmt: skip
    """A byte-level BPE tokenizer trained on `corpus` (any text encodes; ids 0, 1, 2 are
    <pad>, </s>, <unk>: seqio pads with 0; `special_tokens` follow). For tests, benchmarks
    and the quickstarts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    splitters = [pre_tokenizers.Digits(individual_digits=True)] if individual_digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splitters, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "</s>", "<unk>", *special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                                additional_special_tokens=list(special_tokens))  # fmt: skip


def cached_tokenizer(name: str, corpus: Sequence[str], vocab_size: int, **kwargs) -> str:
    """Directory of a `train_tokenizer(corpus, vocab_size, **kwargs)`, trained on first use
    under $FLANJAX_CACHE (default ~/.cache/flanjax), atomically and process-safely. Keyed by
    the corpus: editing a task's text retrains the tokenizer instead of reusing a stale one."""
    cache = paths.cache_dir()
    key = hashlib.sha1((chr(0).join(corpus) + repr((vocab_size, sorted(kwargs.items())))).encode()).hexdigest()[:12]
    path = os.path.join(cache, f"{name}_{key}")
    if os.path.isdir(path):
        return path
    fast = train_tokenizer(corpus, vocab_size, **kwargs)
    os.makedirs(cache, exist_ok=True)
    staging = tempfile.mkdtemp(dir=cache, prefix=".tokenizer-")
    fast.save_pretrained(staging)
    try:
        os.rename(staging, path)
    except OSError:  # another process got there first; theirs is identical
        pass
    return path


@gin.configurable
def default_tokenizer(path: str | None = None) -> str:
    """Directory of the tokenizer that tasks registered without a vocabulary of their own
    (FLAN's) use: gin's `vocab.default_tokenizer.path` (the `TOKENIZER` macro of
    configs/tokenizer.gin, which every run file includes), else
    $FLANJAX_TOKENIZER."""
    path = path or os.environ.get("FLANJAX_TOKENIZER")
    if not path:
        raise TokenizerNotFoundError(
            "no tokenizer set for the templated tasks (FLAN and your own): pass "
            "--gin.TOKENIZER=DIR (any run file), or set FLANJAX_TOKENIZER=DIR, where DIR "
            "holds the model's Hugging Face tokenizer files (`hf download MODEL --local-dir DIR`)."
        )
    return path


DEFAULT_VOCABULARY = HFVocabulary(default_tokenizer)
