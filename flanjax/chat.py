"""Talking to a trained run: conversations rendered as the run was trained on them, replies
sampled until its end-of-turn token.

`Policy.load(run)` restores a run's model at its chosen checkpoint (`flanjax select`'s, else
the latest) with its tokenizer and dialogue format (dialogue.json, from its training or an
ancestor's). A run trained on plain prompts (templated tasks) has no format: a conversation's
last user message is its prompt. `flanjax chat`, `sample`, `select` and `compare` sample
through it; `chat` below is the terminal loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from flax import nnx

from flanjax.data.bidirectional import bidirectional_scores, pair_rows, run_direction_ids
from flanjax.data.dialogue import DialogueFormat, Message, eot_id, prompt_ids, read_format, render
from flanjax.decode import SamplingConfig, decoder_prompt, generate_ids, round_up, score_ids
from flanjax.errors import FlanjaxError
from flanjax.rundir.files import check_tokenizer, lineage, resolve_checkpoint, restore, run_vocabulary
from flanjax.sharding import Partitioner

# LIMA's decoding at evaluation: nucleus 0.9, temperature 0.7, repetition penalty 1.2.
LIMA_SAMPLING = SamplingConfig(max_new_tokens=256, temperature=0.7, top_p=0.9, repetition_penalty=1.2)


class PolicyError(FlanjaxError, ValueError):
    pass


@dataclasses.dataclass
class Policy:
    graphdef: nnx.GraphDef
    state: nnx.State
    vocabulary: object  # the run's HFVocabulary
    format: DialogueFormat | None  # None: plain prompts
    partitioner: Partitioner
    max_len: int
    step: int = 0
    directions: tuple[int, int] | None = None  # (<l2r>, <r2l>) ids of a bidirectionally trained run

    @classmethod
    def load(cls, checkpoint_path: str, partitioner: Partitioner, vocabulary=None) -> Policy:
        """A run (its selected or latest step) or a step directory; `vocabulary` overrides the
        tokenizer the run recorded (it must map tokens alike)."""
        run_dir, step = resolve_checkpoint(checkpoint_path)
        vocabulary = vocabulary or run_vocabulary(run_dir)
        if vocabulary is None:
            raise PolicyError(f"{run_dir} recorded no tokenizer (an older run): give its tokenizer directory (--tokenizer DIR).")
        check_tokenizer(run_dir, vocabulary, "the prompts")
        graphdef, state, config = restore(checkpoint_path, partitioner)
        fmt = read_format(lineage(run_dir))
        if fmt is not None:
            eot_id(vocabulary.tokenizer, fmt)  # a run's format names a token of its tokenizer; say so early if not
        directions = run_direction_ids(lineage(run_dir), vocabulary)
        return cls(graphdef, state, vocabulary, fmt, partitioner, config.max_len, step, directions)

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """The ids that ask for the next reply (`decoder_prompt` lays them out as in training)."""
        if self.format is None:
            return list(self.directions[:1] if self.directions else ()) + self.vocabulary.encode(messages[-1].content)
        return prompt_ids(messages, self.vocabulary.tokenizer, self.format)

    def sampling(self, config: SamplingConfig) -> SamplingConfig:
        """`config`, also stopping at the end-of-turn token."""
        if self.format is None:
            return config
        return dataclasses.replace(config, stop_tokens=(*config.stop_tokens, eot_id(self.vocabulary.tokenizer, self.format)))

    def replies(self, conversations: Sequence[Sequence[Message]], config: SamplingConfig, *, prompt_len: int | None = None,
                batch_size: int = 64, seed: int = 0) -> list[str]:  # fmt: skip
        """One sampled reply to each conversation (ending on a user turn). A prompt keeps its last
        `prompt_len` tokens (default: what fits beside the new ones, at most the longest prompt)."""
        if not conversations:
            return []
        prompts = [self.prompt(c) for c in conversations]
        room = self.max_len - config.max_new_tokens
        if room < 2:
            raise PolicyError(f"max_new_tokens={config.max_new_tokens} leaves no room for a prompt in max_len={self.max_len}.")
        width = prompt_len or min(room, round_up(1 + max(map(len, prompts)), 64))  # few widths: few compiles
        shards = self.partitioner.data_parallel_size
        new = generate_ids(self.graphdef, self.state, [decoder_prompt(p, width) for p in prompts],
                           eos_id=self.vocabulary.eos_id, config=self.sampling(config), partitioner=self.partitioner,
                           prompt_len=width, batch_size=round_up(min(batch_size, len(prompts)), shards), seed=seed)  # fmt: skip
        return [self.vocabulary.decode(ids) for ids in new]

    def perplexity(self, conversations: Sequence[Sequence[Message]], references: Sequence[str], batch_size: int = 64) -> float:
        """exp of the mean negative log-likelihood per token of each reference reply (with its
        end-of-turn token) after its conversation; NaN without references."""
        rows = []
        for messages, reference in zip(conversations, references):
            if not reference:
                continue
            if self.format is None:
                prompt, reply = self.prompt(messages), self.vocabulary.encode(reference)  # a bidirectional run's <l2r> first
                ids, weights = [*prompt, *reply], [0] * len(prompt) + [1] * len(reply)
            else:
                ids, weights = render([*messages, Message("assistant", reference)], self.vocabulary.tokenizer, self.format, turns="last")
            rows.append((ids, weights))
        if not rows:
            return float("nan")
        log_likelihood = self._score(rows, batch_size)
        return float(np.exp(-log_likelihood.sum() / sum(sum(w[-self.max_len :]) for _, w in rows)))

    def log_likelihoods(self, prompts: Sequence[str], responses: Sequence[str], direction: str = "l2r", batch_size: int = 64) -> np.ndarray:
        """Per pair, log p(response + EOS | prompt) ("l2r"), or for a bidirectionally trained run
        log p(prompt | response) ("r2l": the model asked backwards, `data.bidirectional`)."""
        if direction not in ("l2r", "r2l"):
            raise PolicyError(f"direction={direction!r}: use 'l2r' or 'r2l'.")
        if self.directions is None and direction == "r2l":
            raise PolicyError("this run was not trained bidirectionally (no directions.json): it cannot be asked backwards.")
        eos, rows = self.vocabulary.eos_id, []
        for prompt, response in zip(prompts, responses, strict=True):
            x, y = self.vocabulary.encode(prompt), self.vocabulary.encode(response)
            if self.directions is None:
                rows.append(([*x, *y, eos], [0] * len(x) + [1] * (len(y) + 1)))
            else:
                rows.append(pair_rows(x, y, self.directions, eos)[direction == "r2l"])
        return self._score(rows, batch_size)

    def rescore(self, prompts: Sequence[str], candidates: Sequence[Sequence[str]], lam: float = 1.0,
                batch_size: int = 64) -> tuple[list[int], np.ndarray]:  # fmt: skip
        """BatGPT's bidirectional rescoring: each candidate response y to prompt x scored
        log p_l2r(y | x) + lam * log p_r2l(x | y) by this one model; (each prompt's best
        candidate, the scores [prompts, candidates])."""
        if self.directions is None:
            raise PolicyError("this run was not trained bidirectionally (no directions.json): it cannot rescore both ways.")
        encode = self.vocabulary.encode
        xs = [encode(x) for x, ys in zip(prompts, candidates, strict=True) for _ in ys]
        flat = [encode(y) for ys in candidates for y in ys]
        scores = bidirectional_scores(self.graphdef, self.state, self.partitioner, xs, flat, self.directions, self.vocabulary.eos_id,
                                      lam, batch_size, self.max_len).reshape(len(prompts), -1)  # fmt: skip
        return [int(i) for i in scores.argmax(1)], scores

    def _score(self, rows: Sequence[tuple[Sequence[int], Sequence[float]]], batch_size: int) -> np.ndarray:
        return score_ids(self.graphdef, self.state, rows, self.partitioner, batch_size, self.max_len)


def chat(policy: Policy, lines: Iterable[str], say: Callable[[str], None], *, sampling: SamplingConfig = LIMA_SAMPLING,
         system: str | None = None, seed: int = 0) -> list[Message]:  # fmt: skip
    """The conversation loop of `flanjax chat`: each line is the user's next message and
    `say(reply)` gets the assistant's. `/reset` starts over (the system prompt stays), `/exit`
    ends. Returns the conversation."""
    start = [Message("system", system)] if system else []
    history = list(start)
    for turn, line in enumerate(lines):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = list(start)
            say("(conversation reset)")
            continue
        history.append(Message("user", text))
        reply = policy.replies([history], sampling, seed=seed + turn)[0]
        history.append(Message("assistant", reply))
        say(reply)
    return history
