"""The chat quickstart (`make quickstart-chat`): multi-turn SFT, every reply trained vs the last.

Generated conversations in which each turn builds on the ones before:

    user       Sort these digits: 7 2 9 4
    assistant  2 4 7 9
    user       Now the largest one.
    assistant  9
    user       Add 3 to it.
    assistant  12

Two dialogue tasks read them: `quickstart_chat` trains every assistant reply (LIMA, and what
flanjax does by default), `quickstart_chat_last` only the last one (what a pipeline that keeps
the final reply as its target does). Both start from the quickstart's model, with an
end-of-turn token added (`flanjax convert ... --add_tokens "<|eot|>"`), and train with LIMA's
recipe scaled to a CPU (configs/runs/quickstart_chat.gin).

`python -m tasks.quickstart_chat report` replays held-out conversations turn by turn (the true
earlier turns as history, greedy decoding until the end-of-turn token), prints the exact-match
accuracy of each turn for both models, and, last, one JSON object with them.

Every conversation is assigned to train or held-out by a hash of its content.
"""

from __future__ import annotations

if __name__ == "__main__":  # the report: keep TensorFlow's and Orbax's routine lines off the table
    from flanjax.quiet import quiet_libraries

    quiet_libraries()

import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

import seqio  # noqa: E402

from flanjax.data.dialogue import add_dialogue_task, read_conversations  # noqa: E402
from flanjax.data.vocab import HFVocabulary  # noqa: E402

RUN_DIR = "runs/quickstart_chat"
NUM = {"train": 400, "validation": 100}
SORT = ("Sort these digits: {d}", "Put these digits in increasing order: {d}", "{d}\nSort them from smallest to largest.")
LARGEST = ("Now the largest one.", "Which of them is the largest?", "And the biggest digit?")
ADD = ("Add {k} to it.", "What is that plus {k}?", "Now add {k}.")


def conversation(rng: random.Random) -> list[str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    k = rng.randint(1, 5)
    return [
        rng.choice(SORT).format(d=" ".join(map(str, digits))), " ".join(map(str, sorted(digits))),
        rng.choice(LARGEST), str(max(digits)),
        rng.choice(ADD).format(k=k), str(max(digits) + k),
    ]  # fmt: skip


@functools.cache
def generate(split: str) -> tuple[tuple[str, ...], ...]:
    rng, kept = random.Random(f"quickstart_chat/{split}"), []
    while len(kept) < NUM[split]:
        turns = conversation(rng)
        held_out = hashlib.sha1("\n".join(turns).encode()).digest()[0] % 5 == 0
        if held_out == (split == "validation"):
            kept.append(tuple(turns))
    return tuple(kept)


def data_file(split: str) -> str:
    """The split as LIMA-shaped JSONL, written on first use."""
    path = os.path.join(RUN_DIR, "data", f"{split}.jsonl")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps({"conversations": list(turns)}) + "\n" for turns in generate(split))
        os.replace(path + ".tmp", path)
    return path


VOCABULARY = HFVocabulary(lambda: os.path.join(RUN_DIR, "base", "tokenizer"))  # the quickstart's, with <|eot|>

if "quickstart_chat" not in seqio.TaskRegistry.names():
    files = {split: functools.partial(data_file, split) for split in NUM}
    add_dialogue_task("quickstart_chat", files, VOCABULARY, turns="all")
    add_dialogue_task("quickstart_chat_last", files, VOCABULARY, turns="last")


def per_turn_accuracy(run: str) -> list[float]:
    """Exact match of each assistant turn on the held-out conversations, the true history before it."""
    from flanjax.chat import Policy
    from flanjax.decode import SamplingConfig
    from flanjax.sharding import MeshConfig, Partitioner

    policy = Policy.load(run, Partitioner.from_config(MeshConfig()))
    conversations = read_conversations(data_file("validation"))
    greedy = SamplingConfig(max_new_tokens=16)
    accuracy = []
    for turn in range(1, len(conversations[0]), 2):
        replies = policy.replies([c[:turn] for c in conversations], greedy)
        accuracy.append(100.0 * sum(r.strip() == c[turn].content for r, c in zip(replies, conversations)) / len(conversations))
    return accuracy


def report() -> dict:
    every, last = per_turn_accuracy(os.path.join(RUN_DIR, "every")), per_turn_accuracy(os.path.join(RUN_DIR, "last"))
    names = ("sort the digits", "the largest", "add k to it")
    print(f"\nHeld-out conversations ({NUM['validation']}), exact match per assistant turn, true history before it:")
    print(f"  {'turn':<22}{'every reply trained':>22}{'last reply trained':>22}")
    for i, name in enumerate(names):
        print(f"  {f'{i + 1}: {name}':<22}{every[i]:>22.1f}{last[i]:>22.1f}")
    return {"every_reply": dict(zip(names, every)), "last_reply_only": dict(zip(names, last))}


if __name__ == "__main__" and sys.argv[1:] == ["report"]:
    print(json.dumps(report()))
