"""LIMA's training set (Zhou et al. 2023) as a dialogue task: `lima`.

GAIR/lima on the Hugging Face Hub holds `train.jsonl` (1,030 conversations: 1,000
single-turn, 30 multi-turn, each a list of alternating user and assistant strings) and
`test.jsonl` (300 prompts). Download it once, then point gin at it:

    hf download GAIR/lima --repo-type dataset --local-dir data/lima
    flanjax train --gin_file=configs/runs/lima.gin --gin_file=runs/llama7b/model.gin \\
      --gin.LIMA_DIR=data/lima --gin.MODEL_DIR=runs/lima_7b

The conversations are rendered in flanjax's dialogue format with the model's tokenizer (the
TOKENIZER a converted model's model.gin sets), every reply trained.
"""

from __future__ import annotations

import os

import gin
import seqio

from flanjax.data.dialogue import add_dialogue_task
from flanjax.data.vocab import HFVocabulary, default_tokenizer


@gin.configurable
def lima_dir(path: str | None = None) -> str:
    """gin's LIMA_DIR (configs/runs/lima.gin; `--gin.LIMA_DIR=DIR`), else $LIMA_DIR: where
    GAIR/lima was downloaded."""
    path = path or os.environ.get("LIMA_DIR")
    if not path:
        raise FileNotFoundError("no LIMA directory: download GAIR/lima (see tasks/lima.py) and pass --gin.LIMA_DIR=DIR.")
    return path


# The run's TOKENIZER (a converted model's model.gin sets it), read when the task is first used.
VOCABULARY = HFVocabulary(default_tokenizer)

if "lima" not in seqio.TaskRegistry.names():
    add_dialogue_task("lima", {"train": lambda: os.path.join(lima_dir(), "train.jsonl")}, VOCABULARY)
