"""The `flanjax` command line: parse configuration, then call the library.

    flanjax train --gin_file=configs/runs/quickstart.gin --gin.MODEL_DIR="'runs/x'"
    flanjax eval --gin_file=configs/runs/eval.gin --gin.CHECKPOINT_PATH=runs/x --gin.MIXTURE_OR_TASK_NAME=quickstart_eval
    flanjax bench train --model=bench_27m --batch_size=8 --seq_len=256
    flanjax bench decode --model=bench_27m --batch_size=8 --prompt_len=128 --new_tokens=128
    flanjax world generate --out data/e2wm --homes 100 --seed 0
    flanjax bench plan --batch_size 64 --simulations 2000
    flanjax tasks list --cluster nli --json
    flanjax tasks preview flan_rte -n 2 --mock
    flanjax convert from-hf --in hf/Llama-3.2-1B --out runs/llama1b --add_tokens "<|eot|>"
    flanjax convert to-hf --in runs/my_sft --out hf/my_sft
    flanjax grow --in runs/quickstart --out runs/grown --d_model 256 --num_layers 8 --num_heads 8 --num_kv_heads 8 --d_ff 768
    flanjax chat --run runs/lima --system "Be brief."
    flanjax select --run runs/lima --prompts dev.jsonl --judge judge:runs/judge --min_step 50 --max_step 100
    flanjax compare --a runs/lima --b runs/sft --prompts test.jsonl --judge reward:runs/rm
    flanjax fisher --run runs/quickstart --task quickstart --num_examples 512 --inputs_length 48 --targets_length 16
    flanjax launch tpu --name my-run --zone us-east5-a --project my-proj --accelerator v5p-32 --slices 2 --spot \\
        -- --gin_file=configs/runs/sft.gin --gin.MODEL_DIR="'gs://bucket/run'"

Configuration is gin, t5x style: `--gin_file` (repeatable; files `include` each other) and
`--gin.KEY=VALUE` bindings applied after the files. The parsed config is written to
`<model_dir>/config.gin` at the start and the operative config (what was actually used)
to `<model_dir>/operative_config.gin` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from flanjax import paths
from flanjax.config import ConfigError, check_bindings, gin_binding, parse_gin


class UsageError(Exception):
    """Bad command-line or configuration input: printed without a traceback."""


# --- gin ------------------------------------------------------------------------------------


def _split_gin_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates `--gin.KEY=VALUE` bindings from the other arguments."""
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith("--gin."):
            key, sep, value = arg[len("--gin.") :].partition("=")
            if not sep:
                raise UsageError(f"{arg!r}: write gin bindings as --gin.KEY=VALUE.")
            bindings.append(gin_binding(key, value))
        else:
            rest.append(arg)
    return rest, bindings


# --- commands -------------------------------------------------------------------------------


def _call_configured(args: argparse.Namespace, bindings: list[str], target, before=None):
    """Parses the gin config and calls gin's version of the function `target()` names (it may
    depend on the config)."""
    import gin

    _import_modules(args.module)
    parse_gin(args.gin_file, bindings)
    fn = target()
    check_bindings(f"{fn.__module__}.{fn.__name__}")
    if before is not None:
        before()
    try:
        return gin.get_configurable(fn)()
    except TypeError as e:  # a run file that leaves one of fn's arguments unbound
        if "required keyword-only argument" in str(e):
            where = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
            raise UsageError(f"{e}. Bind it in a gin file or with --gin.{where}.NAME=VALUE.") from None
        raise


TRAINERS = {  # the TRAINER macro of a run file picks one; the loop is the same
    "lm": ("flanjax.train.lm", "train"),
    "reward": ("flanjax.rlhf.reward", "train_reward"),
    "ppo": ("flanjax.rlhf.ppo", "train_ppo"),
    "dpo": ("flanjax.rlhf.dpo", "train_dpo"),
    "grpo": ("flanjax.rlhf.grpo", "train_grpo"),
}


def _trainer():
    import importlib

    import gin

    try:
        name = gin.query_parameter("TRAINER/macro.value")
    except ValueError:
        name = "lm"
    if name not in TRAINERS:
        raise UsageError(f"TRAINER = {name!r} is not one of {', '.join(map(repr, TRAINERS))}.")
    module, fn = TRAINERS[name]
    return getattr(importlib.import_module(module), fn)


def cmd_train(args: argparse.Namespace, bindings: list[str]) -> int:
    import gin

    from flanjax.train import trainer

    def save_config():
        if _model_dir() and not args.dry_run:
            _write(_model_dir(), "config.gin", gin.config_str())

    trainer.DRY_RUN.set(args.dry_run)
    try:
        result = _call_configured(args, bindings, _trainer, before=save_config)
    except trainer.DryRun as e:
        print(gin.operative_config_str())
        print(f"Dry run of: {_message(e)}. The configuration, task, mesh and model resolve and the step compiles; "
              "nothing was trained or written.", file=sys.stderr)  # fmt: skip
        return 0
    if _model_dir():
        import jax

        from flanjax.rundir.metrics import latest_metrics

        _write(_model_dir(), "operative_config.gin", gin.operative_config_str())
        if jax.process_index() == 0:  # the run's result as one JSON line, last
            metrics = latest_metrics(os.path.join(_model_dir(), "metrics.jsonl"))
            print(json.dumps({"run": _model_dir(), "step": result.step, "preempted": result.preempted, "metrics": metrics}))
    return 0 if not result.preempted else 143


def cmd_eval(args: argparse.Namespace, bindings: list[str]) -> int:
    from flanjax.eval import run

    _call_configured(args, bindings, lambda: run.evaluate)
    return 0


def _model_dir() -> str | None:
    """The run directory, by the t5x convention of a MODEL_DIR macro."""
    import gin

    try:
        value = gin.query_parameter("MODEL_DIR/macro.value")
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _write(model_dir: str, name: str, text: str) -> None:
    import jax

    if jax.process_index() == 0:
        paths.makedirs(model_dir)
        with paths.open(os.path.join(model_dir, name), "w") as f:
            f.write(text)


def model_config(name: str, bindings: list[str]):
    """The `MODEL` of configs/models/NAME.gin (or of a gin file path), with overrides."""
    import gin

    from flanjax import cli  # this module by its import name, also under `python -m`

    path = name if name.endswith(".gin") else os.path.join("configs", "models", f"{name}.gin")
    read_model = "from __gin__ import dynamic_registration\nfrom flanjax import cli\ncli.configured_value.value = %MODEL"
    parse_gin([path], [*bindings, read_model])
    check_bindings("flanjax.cli.configured_value")
    return gin.get_configurable(cli.configured_value)()


def configured_value(value):
    """Returns what gin bound to `value`: how the CLI reads a macro's built object."""
    return value


def cmd_bench(args: argparse.Namespace, bindings: list[str]) -> int:
    from flanjax import benchmark

    if args.what == "pipeline":
        import importlib

        importlib.import_module("tasks.flan")
        print(json.dumps(benchmark.bench_pipeline(args.mixture, batch_size=args.batch_size, batches=args.steps, warmup=args.warmup)))
        return 0
    config = model_config(args.model, bindings)
    if args.dtype:
        import dataclasses

        config = dataclasses.replace(config, dtype=args.dtype)
    shape = {"model_name": args.model, "batch_size": args.batch_size}
    if args.what == "train":
        result = benchmark.bench_train(config, **shape, seq_len=args.seq_len, steps=args.steps, warmup=args.warmup)
    elif args.what == "decode":
        result = benchmark.bench_decode(config, **shape, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                        quantize=args.quantize)  # fmt: skip
    elif args.what == "ppo":
        from flanjax.models.lora import LoraConfig

        lora = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank) if args.lora_rank else None
        result = benchmark.bench_ppo(config, **shape, prompt_len=args.prompt_len, new_tokens=args.new_tokens, lora=lora,
                                     value_on_policy_trunk=args.value_on_policy_trunk)  # fmt: skip
    elif args.what == "plan":
        result = benchmark.bench_plan(num_goals=args.batch_size, num_simulations=args.simulations)
    else:
        result = benchmark.bench_rank(config, **shape, prompt_len=args.prompt_len, option_len=args.option_len,
                                      num_options=args.num_options)  # fmt: skip
    print(json.dumps(result))
    return 0


def cmd_convert(args: argparse.Namespace, bindings: list[str]) -> int:
    from flanjax import convert
    from flanjax.sharding import MeshConfig

    mesh = _mesh(args.mesh) if args.mesh else MeshConfig(data=1, fsdp=-1)
    if args.direction == "from-hf":
        config = convert.from_hf(args.source, args.out, dtype=args.dtype, mesh=mesh, add_tokens=tuple(args.add_tokens),
                                 allow_pickle=args.allow_pickle)  # fmt: skip
        print(f"Wrote {args.out}: {config.num_params() / 1e6:.1f}M parameters, vocabulary {config.vocab_size}. "
              f"Train from it with --gin_file={os.path.join(args.out, 'model.gin')} after the run's gin file.")  # fmt: skip
    else:
        convert.to_hf(args.source, args.out, mesh=mesh)
        print(f"Wrote {args.out}: load it with transformers.AutoModelForCausalLM.from_pretrained({args.out!r}).")
    return 0


GROWN_SIZES = ("d_model", "d_ff", "num_heads", "num_kv_heads", "num_layers")


def cmd_grow(args: argparse.Namespace, bindings: list[str]) -> int:
    from flanjax import convert
    from flanjax.sharding import MeshConfig

    sizes = {name: getattr(args, name) for name in GROWN_SIZES if getattr(args, name) is not None}
    if not sizes:
        raise UsageError(f"say the grown model's sizes: at least one of {', '.join('--' + n for n in GROWN_SIZES)}.")
    mesh = _mesh(args.mesh) if args.mesh else MeshConfig(data=1, fsdp=-1)
    convert.grow(args.source, args.out, sizes, depth=args.depth, noise=args.noise, seed=args.seed, mesh=mesh)
    print(f"Train it on with --gin_file={os.path.join(args.out, 'model.gin')} after the run's gin file.")
    return 0


def _process_flags(command: argparse.ArgumentParser) -> None:
    """The flags that make a command one process of a multi-host run (`main` joins it first)."""
    command.add_argument("--coordinator_address", help="host:port of process 0, for multi-process runs")
    command.add_argument("--num_processes", type=int, help="number of processes in a multi-process run")
    command.add_argument("--process_id", type=int, help="this process's index in a multi-process run")
    command.add_argument("--multiprocess", action="store_true", help="join a multi-process run the cluster describes (Cloud TPU, SLURM)")


def _join(args: argparse.Namespace) -> None:
    """Joins the multi-process run the flags describe, before any device is touched."""
    if getattr(args, "coordinator_address", None) or getattr(args, "multiprocess", False):
        from flanjax.sharding import initialize_distributed

        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)


def _mesh(spec: str | None):
    from flanjax.sharding import MeshConfig

    if not spec:
        return MeshConfig()
    try:
        return MeshConfig(**{k: int(v) for k, v in (part.split("=") for part in spec.split(","))})
    except (TypeError, ValueError):
        raise UsageError(f"--mesh {spec!r}: expected sizes like data=2,fsdp=4.") from None


def _sampling(args: argparse.Namespace):
    from flanjax.decode import SamplingConfig

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, num_beams=args.num_beams, quantize=args.quantize)  # fmt: skip


def _import_modules(modules: list[str]) -> None:
    import importlib

    for module in modules:
        importlib.import_module(module)


def cmd_label(args: argparse.Namespace, bindings: list[str]) -> int:
    from collections import Counter

    import jax

    from flanjax.data.pipeline import get_task_or_mixture
    from flanjax.data.preferences import read_comparisons
    from flanjax.rlhf import feedback, sampling
    from flanjax.sharding import Partitioner

    _import_modules(args.module)
    partitioner = Partitioner.from_config(_mesh(args.mesh))
    vocabulary = get_task_or_mixture(args.task).output_features["inputs"].vocabulary
    labelers, judges, human_files = [], [], list(args.compare_human)
    for spec in args.labeler:
        kind, _, value = spec.partition(":")
        if kind == "rubric":
            labelers.append(feedback.RubricLabeler(feedback.load_rubric(value)))
        elif kind == "judge":
            labelers.append(feedback.JudgeLabeler.from_run(value, vocabulary, partitioner))
            judges.append((value, labelers[-1]))
        elif kind == "human":
            labelers.append(feedback.HumanLabels(value))
            human_files.append(value)
        else:
            raise UsageError(f"--labeler {spec!r}: use rubric:MODULE:FUNCTION, judge:RUN_DIR or human:FILE.jsonl.")
    if args.compare_human and not judges:
        raise UsageError("--compare_human compares a model judge with humans: add --labeler judge:RUN_DIR.")
    labeler = labelers[0] if len(labelers) == 1 else feedback.MixedLabeler(labelers)
    comparisons = sampling.label(args.policy, args.task, labeler, args.out, partitioner, split=args.split, num_prompts=args.num_prompts,
                                 num_samples=args.num_samples, sampling=_sampling(args), prompt_len=args.prompt_len, seed=args.seed)  # fmt: skip
    summary = {"out": args.out, "comparisons": len(comparisons), "by_source": dict(Counter(c.source for c in comparisons))}
    if judges:  # the first judge's trustworthiness: position bias, agreement with the human labels
        human = [c for path in dict.fromkeys(human_files) for c in read_comparisons(path)]
        report = feedback.judge_report(judges[0][1], human)
        summary.update(judge=judges[0][0], **report)
        print(feedback.report_table(judges[0][0], report))
    if jax.process_index() == 0:
        with paths.open(os.path.splitext(args.out)[0] + ".summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary))
    return 0


def cmd_sample(args: argparse.Namespace, bindings: list[str]) -> int:
    import jax

    from flanjax.data.pipeline import task_prompts
    from flanjax.rlhf import sampling
    from flanjax.rlhf.reward import load_reward_model
    from flanjax.sharding import Partitioner

    _import_modules(args.module)
    partitioner = Partitioner.from_config(_mesh(args.mesh))
    if args.task:
        prompts, _, vocabulary = task_prompts(args.task, args.split, args.num_prompts)
    else:
        from flanjax.data.vocab import HFVocabulary
        from flanjax.rundir.files import resolve_checkpoint, run_vocabulary

        vocabulary = HFVocabulary(args.tokenizer) if args.tokenizer else run_vocabulary(resolve_checkpoint(args.policy)[0])
        if vocabulary is None:
            raise UsageError(f"{args.policy} recorded no tokenizer (an older run): give --tokenizer DIR, or --task NAME.")
        prompts = args.prompt
    if not prompts:
        raise UsageError("no prompts: give --prompt TEXT (repeatable) or --task NAME.")
    shape = dict(sampling=_sampling(args), prompt_len=args.prompt_len, seed=args.seed)
    if args.rescore == "bidirectional":
        if args.best_of < 2:
            raise UsageError("--rescore bidirectional picks one of several samples: give --best_of N (N >= 2).")
        rows = sampling.best_of_n_bidirectional(args.policy, prompts, vocabulary, partitioner, n=args.best_of,
                                                lam=args.rescore_lambda, **shape)  # fmt: skip
    elif args.best_of > 1:
        if not args.reward:
            raise UsageError("--best_of needs --reward RUN_DIR (the reward model that picks the best sample), "
                             "or --rescore bidirectional (a bidirectionally trained policy scores its own samples both ways).")
        reward = load_reward_model(args.reward, partitioner, vocabulary)
        rows = sampling.best_of_n(args.policy, reward, prompts, vocabulary, partitioner, n=args.best_of, **shape)
    else:
        responses = sampling.sample(args.policy, prompts, vocabulary, partitioner, num_samples=1, **shape)
        rows = [{"prompt": p, "response": r[0]} for p, r in zip(prompts, responses)]
    for row in rows if jax.process_index() == 0 else ():
        print(json.dumps(row))
    return 0


def cmd_chat(args: argparse.Namespace, bindings: list[str]) -> int:
    from flanjax.chat import Policy, chat
    from flanjax.data.vocab import HFVocabulary
    from flanjax.rundir.metrics import console
    from flanjax.sharding import Partitioner

    policy = Policy.load(args.run_dir, Partitioner.from_config(_mesh(args.mesh)), HFVocabulary(args.tokenizer) if args.tokenizer else None)
    interactive = sys.stdin.isatty()
    if policy.format is None:
        console.print("This run was not trained on conversations (no dialogue.json): each message is a prompt of its own.")
    if interactive:
        console.print(f"Chatting with {args.run_dir} (step {policy.step}); /reset starts over, /exit or Ctrl-D ends.")

    def lines():
        while True:
            try:
                yield input("you> ") if interactive else next(sys.stdin)
            except (EOFError, StopIteration):
                return

    say = (lambda reply: console.print(f"[bold]assistant>[/] {reply}")) if interactive else (lambda reply: print(reply, flush=True))
    chat(policy, lines(), say, sampling=_sampling(args), system=args.system, seed=args.seed)
    return 0


def cmd_select(args: argparse.Namespace, bindings: list[str]) -> int:
    from flanjax import selection
    from flanjax.sharding import Partitioner

    _import_modules(args.module)
    result = selection.select(args.run_dir, args.prompts, args.judge, Partitioner.from_config(_mesh(args.mesh)), sampling=_sampling(args),
                              steps=(args.min_step, args.max_step), seed=args.seed)  # fmt: skip
    print(f"{'step':>8}  {'judge score':>12}  {'dev perplexity':>14}")
    for row in result["table"]:
        mark = "  <- selected" if row["step"] == result["selected_step"] else ""
        print(f"{row['step']:>8}  {row['judge_score']:>12.4f}  {row['dev_perplexity']:>14.3f}{mark}")
    print(f"Selected step {result['selected_step']} (recorded in {result['run']}/selected.json: eval, sample, chat and convert read it).")
    print(json.dumps(result))
    return 0


def cmd_compare(args: argparse.Namespace, bindings: list[str]) -> int:
    from flanjax import selection
    from flanjax.sharding import Partitioner

    _import_modules(args.module)
    result = selection.compare(args.a, args.b, args.prompts, args.judge, Partitioner.from_config(_mesh(args.mesh)),
                               sampling=_sampling(args), seed=args.seed)  # fmt: skip
    agreement = "n/a (answers scored alone)" if result["order_agreement"] is None else f"{100 * result['order_agreement']:.1f}%"
    print(f"A = {result['a']}\nB = {result['b']}\non {result['prompts']} prompts, judged by {result['judge']}:")
    print(f"  A wins {result['wins']}, ties {result['ties']}, A loses {result['losses']}; the two orders agree on {agreement}")
    print(json.dumps(result))
    return 0


def cmd_fisher(args: argparse.Namespace, bindings: list[str]) -> int:
    from flanjax.sharding import Partitioner
    from flanjax.train.ewc import compute_fisher

    _import_modules(args.module)
    result = compute_fisher(args.run_dir, args.task, args.num_examples, split=args.split, batch_size=args.batch_size,
                            task_feature_lengths={"inputs": args.inputs_length, "targets": args.targets_length},
                            targets=args.targets, out=args.out, partitioner=Partitioner.from_config(_mesh(args.mesh)))  # fmt: skip
    print(json.dumps(result))
    return 0


def cmd_launch(args: argparse.Namespace, bindings: list[str]) -> int:
    import launch

    # main() took the --gin.KEY=VALUE arguments out as gin bindings: they are `flanjax train`'s, after the `--`.
    gin_args = ["--gin." + binding.replace(" = ", "=", 1) for binding in bindings]
    return launch.main([*args.argv, *(["--"] if gin_args and "--" not in args.argv else []), *gin_args])


def cmd_world(args: argparse.Namespace, bindings: list[str]) -> int:
    from flanjax.worlds import experiences, mcts
    from flanjax.worlds.world import activities

    _import_modules(["flanjax.worlds.activities", *args.module])
    if args.action == "activities":
        for activity in activities(args.world):
            print(f"{activity.name}: " + ", ".join(f"{g[0]}({', '.join(g[1:])})" for g in activity.goals))
        return 0
    config = experiences.ExperienceConfig(
        homes=args.homes, seed=args.seed, world=args.world, stories_per_home=args.stories_per_home,
        test_fraction=args.test_fraction, search=mcts.SearchConfig(num_simulations=args.simulations),
        counting_steps=args.counting_steps, path_sentences=tuple(args.path_sentences),
        batch_size=args.batch_size,
    )  # fmt: skip
    summary = experiences.generate(args.out, config)
    print(f"{summary['solved']} plans of {summary['goals']} goals ({summary['impossible']} impossible in their home, skipped; "
          f"{summary['unsolved']} unsolved), {sum(summary['stories'].values())} stories -> {args.out}")  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k not in ("config", "impossible_by_activity")}))
    return 0


def cmd_tasks(args: argparse.Namespace, bindings: list[str]) -> int:
    import importlib

    for module in args.module:
        importlib.import_module(module)
    if args.action == "list":
        return _list_tasks(args)
    return _preview_task(args)


def _list_tasks(args: argparse.Namespace) -> int:
    import seqio

    from flanjax.data import templated

    listed = [t.describe() for t in templated.templated_tasks(args.cluster)]
    if args.cluster is None:  # plain seqio tasks too, except templated tasks' variants
        variants = {n for t in listed for n in (t["eval_task"], t["fewshot_task"])}
        for name in sorted(set(seqio.TaskRegistry.names()) - variants - {t["name"] for t in listed}):
            task = seqio.TaskRegistry.get(name)
            listed.append({"name": name, "cluster": None, "source": type(task.source).__name__, "templates": None,
                           "turned_around": None, "metrics": [getattr(m, "__name__", "metric") for m in task.metric_fns]})  # fmt: skip
    if args.json:
        print(json.dumps(listed))
        return 0

    def cell(value) -> str:  # "-" where a plain seqio task has no value
        return (",".join(value) if isinstance(value, list) else "" if value is None else str(value)) or "-"

    # A header row, then one row per task: the JSON objects' keys, upper-cased, as columns.
    columns = ("name", "cluster", "templates", "turned_around", "metrics", "source")
    rows = [[c.upper() for c in columns]] + [[cell(t[c]) for c in columns] for t in listed]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
    if args.cluster is None:
        print("\nmixtures: " + ", ".join(sorted(seqio.MixtureRegistry.names())))
    return 0


def _preview_task(args: argparse.Namespace) -> int:
    import contextlib

    from flanjax.data.pipeline import text_examples

    def text(value) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    mock = contextlib.nullcontext()
    if args.mock:
        import zlib

        import tensorflow as tf
        import tensorflow_datasets as tfds
        from tensorflow_datasets.testing import mocking

        num_examples = max(args.n, 10)

        def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
            # TFDS's mock gives every builder and split the same fake examples, so a dataset
            # that reads several builders round-robin (ANLI's three rounds) would show each
            # example once per builder. Seed them by builder and split instead.
            features = builder.info.features
            seed = zlib.crc32(f"{builder.info.full_name} {split}".encode())
            specs = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.tf_dtype), features.get_tensor_info())
            return tf.data.Dataset.from_generator(
                lambda: mocking.RandomFakeGenerator(features, num_examples, seed=seed), output_signature=specs
            )

        mock = tfds.testing.mock_data(num_examples=num_examples, as_dataset_fn=as_dataset)
    with mock:  # a rank-classification task's example is a row per option: take whole examples
        rows = text_examples(args.name, args.split, args.n, whole_examples=True)
    examples = []
    for row in rows:
        if "is_correct" not in row:
            examples.append(row)
        elif row["idx"][1] == 0:  # an example's first option: its inputs, then every option
            examples.append({**row, "options": [(row["targets"], row["is_correct"])]})
        else:
            examples[-1]["options"].append((row["targets"], row["is_correct"]))
    for i, example in enumerate(examples):
        print(f"--- {args.name} [{args.split}] example {i}" + (f", template {example['template']}" if "template" in example else ""))
        print(f"inputs:\n{text(example['inputs'])}")
        if "options" in example:  # scored by rank classification: the likeliest option is the answer
            print("targets (one per option, * = correct):")
            print("\n".join(("* " if correct else "  ") + text(option) for option, correct in example["options"]))
        else:
            print(f"targets:\n{text(example['targets'])}")
    return 0


TASK_MODULES = ("tasks.quickstart", "tasks.flan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flanjax",
        description="Instruction tuning and RLHF of language models in JAX + Flax NNX.",
        epilog="Run `flanjax COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train",
        help="train a model (SFT, reward model, PPO, DPO, GRPO: the run file's TRAINER) from gin configs",
        description="Train a model from gin files; --gin.KEY=VALUE overrides any binding.",
    )
    _process_flags(train)
    train.set_defaults(run=cmd_train)
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a checkpoint on seqio tasks (generation metrics, rank classification)",
        description="Evaluate a checkpoint from gin files (e.g. configs/runs/eval.gin); writes "
        "eval_results.json, eval_results.md and TensorBoard scalars.",
    )
    _process_flags(evaluate)
    evaluate.set_defaults(run=cmd_eval)
    for command in (train, evaluate):
        command.add_argument("--gin_file", action="append", default=[], required=True, help="gin config file (repeatable)")
        command.add_argument("--module", action="append", default=[], help="Python module to import first, e.g. one that registers your tasks (repeatable)")
    train.add_argument("--dry_run", action="store_true", help="parse the config, resolve the task, mesh and model, compile the step (memory report), print the operative config and exit")

    bench = commands.add_parser(
        "bench",
        help="measure throughput; prints one JSON object",
        description="train: training steps (tokens/s, MFU); decode: greedy generation with the KV cache "
        "(new tokens/s); rank: scoring rank-classification options (options/s); pipeline: templating, "
        "tokenizing and packing a FLAN mixture on one core under TFDS mock data (tokens/s); ppo: one PPO "
        "iteration with four models of the size (rollout / scoring / training seconds, rollout vs decode speed); "
        "plan: MCTS planning of a batch of household goals (simulations/s, goals solved).",
    )
    bench.add_argument("what", choices=["train", "decode", "rank", "pipeline", "ppo", "plan"], help="what to measure")
    bench.add_argument("--model", default="bench_27m", help="a model config in configs/models (default bench_27m)")
    bench.add_argument("--batch_size", type=int, default=8, help="rows per step / generate call / scoring call; plan: goals")
    bench.add_argument("--simulations", type=int, default=2000, help="plan: MCTS simulations per goal")
    bench.add_argument("--seq_len", type=int, default=256, help="train: tokens per row")
    bench.add_argument("--steps", type=int, default=10, help="train: timed steps; pipeline: timed batches")
    bench.add_argument("--mixture", default="flan_all_train", help="pipeline: the mixture to read")
    bench.add_argument("--warmup", type=int, default=3, help="train: untimed steps (compilation and warm-up)")
    bench.add_argument("--prompt_len", type=int, default=128, help="decode, rank: prompt tokens")
    bench.add_argument("--new_tokens", type=int, default=128, help="decode: tokens generated per row")
    bench.add_argument("--option_len", type=int, default=8, help="rank: tokens per scored option")
    bench.add_argument("--num_options", type=int, default=4, help="rank: options per prompt")
    bench.add_argument("--lora_rank", type=int, default=0, help="ppo: a LoRA policy of this rank (0: full fine-tuning)")
    bench.add_argument("--value_on_policy_trunk", action="store_true", help="ppo: the value function is a head on the policy")
    bench.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
    bench.add_argument("--quantize", default="none", choices=["none", "int8", "int8_dynamic"], help="decode: int8 weights (and activations)")
    bench.set_defaults(run=cmd_bench)

    convert = commands.add_parser(
        "convert",
        help="Hugging Face checkpoints into flanjax run directories and back",
        description="from-hf: a local Hugging Face model directory (config.json + safetensors, tokenizer) "
        "-> a run directory (Orbax checkpoint, model.json, model.gin, tokenizer/). to-hf: a run directory "
        "or step directory -> a directory transformers.AutoModelForCausalLM.from_pretrained loads "
        "(LoRA adapters merged in).",
    )
    convert.add_argument("direction", choices=["from-hf", "to-hf"])
    convert.add_argument("--in", dest="source", required=True, help="from-hf: HF model directory; to-hf: run or step directory")
    convert.add_argument("--out", required=True, help="from-hf: new run directory; to-hf: output directory")
    convert.add_argument("--dtype", default="float32", help="from-hf: parameter dtype (float32 or bfloat16)")
    convert.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=1,fsdp=8 (default: fsdp over all devices)")
    convert.add_argument("--add_tokens", nargs="*", default=[], help="from-hf: special tokens to add (e.g. an end-of-turn token)")
    convert.add_argument("--allow_pickle", action="store_true", help="from-hf: read pytorch_model.bin (torch.load, weights_only=True)")
    _process_flags(convert)
    convert.set_defaults(run=cmd_convert)

    grow = commands.add_parser(
        "grow",
        help="grow a trained model into a larger one that computes the same function (BatGPT's parameter expansion)",
        description="Widens by duplicating units (outgoing weights divided) and deepens by inserting layers whose "
        "output projections start at zero, so the grown model's logits equal the trained one's; writes a run "
        "directory (step 0, model.json, model.gin, tokenizer/) that `flanjax train` continues. Sizes not given "
        "are kept; widths must be multiples of the trained ones.",
    )
    grow.add_argument("--in", dest="source", required=True, help="run or step directory of the trained model")
    grow.add_argument("--out", required=True, help="new run directory")
    for name in GROWN_SIZES:
        grow.add_argument(f"--{name}", type=int, default=None, help=f"the grown model's {name}")
    grow.add_argument("--depth", default="zero", choices=["zero", "stack"],
                      help="new layers: zero = output projections zeroed (exact); stack = copies of layers (not exact)")  # fmt: skip
    grow.add_argument("--noise", type=float, default=0.0, help="noise on duplicated units, summing to zero over copies (keeps the function)")
    grow.add_argument("--seed", type=int, default=0, help="seed of the noise")
    grow.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=1,fsdp=8 (default: fsdp over all devices)")
    _process_flags(grow)
    grow.set_defaults(run=cmd_grow)

    label = commands.add_parser(
        "label",
        help="sample responses from a policy and rank them (rubric, model judge, human labels) into preference JSONL",
        description="Samples --num_samples responses to each of --num_prompts prompts of --task with the policy "
        "run, ranks them with the labelers (the first that gives a ranking wins, e.g. human:FILE then "
        "rubric:MOD:FN) and writes --out (a preference JSONL file that reward training reads). With a judge:RUN_DIR "
        "labeler it also reports the judge's position bias (how often its verdict flips when the answers swap places) "
        "and its agreement with the human labels (human:FILE labelers and --compare_human files), which it judges "
        "too. A JSON summary is printed last and written beside --out (OUT.summary.json).",
    )
    label.add_argument("--policy", required=True, help="run or step directory of the policy to sample")
    label.add_argument("--task", required=True, help="seqio task or mixture whose inputs are the prompts")
    label.add_argument("--labeler", action="append", required=True, help="rubric:MODULE:FUNCTION, judge:RUN_DIR or human:FILE.jsonl (repeatable)")
    label.add_argument("--out", required=True, help="preference JSONL to write, e.g. prefs/train.jsonl")
    label.add_argument("--split", default="train")
    label.add_argument("--num_prompts", type=int, default=256)
    label.add_argument("--num_samples", type=int, default=4, help="responses per prompt (K)")
    label.add_argument("--compare_human", action="append", default=[], metavar="FILE.jsonl",
                       help="human comparisons to measure the judge's agreement with, without labelling with them (repeatable)")
    _process_flags(label)
    label.set_defaults(run=cmd_label)
    sample = commands.add_parser(
        "sample",
        help="sample responses from a policy; --best_of N keeps the reward model's (or --rescore's) favourite of N",
        description="Prints one JSON object per prompt: the response (and with --best_of, every candidate and its reward or score).",
    )
    sample.add_argument("--policy", required=True, help="run or step directory of the policy")
    sample.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); or --task")
    sample.add_argument("--tokenizer", help="with --prompt: tokenizer directory (default: the one the run recorded)")
    sample.add_argument("--task", help="take prompts (and tokenizer) from this seqio task or mixture")
    sample.add_argument("--split", default="validation")
    sample.add_argument("--num_prompts", type=int, default=8)
    sample.add_argument("--best_of", type=int, default=1, help="sample N, keep the highest reward (needs --reward)")
    sample.add_argument("--reward", help="reward model run directory, for --best_of")
    sample.add_argument("--rescore", choices=["bidirectional"],
                        help="with --best_of N: keep the sample with the highest log p(y|x) + lambda log p(x|y), both from "
                             "the policy (trained with configs/runs/bidirectional.gin) instead of a reward model")
    sample.add_argument("--rescore_lambda", type=float, default=1.0, help="lambda of --rescore (default 1)")
    _process_flags(sample)
    sample.set_defaults(run=cmd_sample)
    for command in (label, sample):
        command.add_argument("--prompt_len", type=int, default=64, help="prompt tokens kept (the last ones)")
        _sampling_arguments(command, max_new_tokens=64, temperature=1.0, top_p=1.0, repetition_penalty=1.0)
        command.add_argument("--module", action="append", default=list(TASK_MODULES), help="task module to import (repeatable)")

    chat = commands.add_parser(
        "chat",
        help="talk to a trained run in the terminal (or through a pipe), multi-turn",
        description="Each line is your next message; the run's reply follows, sampled with LIMA's decoding by default "
        "until its end-of-turn token. /reset starts the conversation over, /exit ends it. From a pipe, each reply is "
        "printed on its own.",
    )
    chat.add_argument("--run", dest="run_dir", required=True, help="run or step directory (a run's selected step, else its latest)")
    chat.add_argument("--system", help="a system prompt that opens the conversation")
    chat.add_argument("--tokenizer", help="tokenizer directory (default: the one the run recorded)")
    select = commands.add_parser(
        "select",
        help="choose a run's checkpoint by a judge of its answers to dev prompts (LIMA), not by perplexity",
        description="Samples every checkpoint (optionally between --min_step and --max_step) on the --prompts JSONL with "
        "LIMA's decoding, scores the answers with --judge, prints a table (judge score, dev perplexity) and records the "
        "best step in RUN/selected.json, which eval, sample, chat and convert then read. Last line: one JSON object.",
    )
    select.add_argument("--run", dest="run_dir", required=True, help="the run directory")
    select.add_argument("--min_step", type=int, help="first candidate step (LIMA: the end of epoch 5)")
    select.add_argument("--max_step", type=int, help="last candidate step (LIMA: the end of epoch 10)")
    compare = commands.add_parser(
        "compare",
        help="wins / ties / losses of run A's answers against run B's, judged in both orders (LIMA's evaluation)",
        description="Both runs answer the --prompts JSONL; --judge decides each pair. A model judge sees each pair in "
        "both orders: a verdict that flips with the order is a tie, and how often the orders agree is reported.",
    )
    compare.add_argument("--a", required=True, help="run A (run or step directory)")
    compare.add_argument("--b", required=True, help="run B")
    for command in (select, compare):
        command.add_argument("--prompts", required=True, help="JSONL of conversations (a final assistant turn is the reference)")
        command.add_argument("--judge", required=True, help="rubric:MODULE:FUNCTION, reward:RUN_DIR or judge:RUN_DIR")
        command.add_argument("--module", action="append", default=[], help="module to import first (repeatable)")
    for command in (chat, select, compare):
        _sampling_arguments(command, max_new_tokens=256, temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    chat.set_defaults(run=cmd_chat)
    _process_flags(select)
    select.set_defaults(run=cmd_select)
    _process_flags(compare)
    compare.set_defaults(run=cmd_compare)

    fisher = commands.add_parser(
        "fisher",
        help="the diagonal Fisher of the kernels LoRA adapts, on a task's examples, for EWC (lm.train.ewc)",
        description="Averages each example's squared gradient (of its mean token loss) wrt the base kernels that LoRA "
        "targets, over the first --num_examples examples of --task, on the run's model (its selected or latest step), and "
        "writes RUN/fisher/ (fisher.safetensors, fisher.json) unless --out says otherwise. Targets: --targets, else the "
        "run's own LoRA targets if it trained adapters, else LoraConfig's defaults. Last line: one JSON object.",
    )
    fisher.add_argument("--run", dest="run_dir", required=True, help="run or step directory of the model (the weights EWC anchors)")
    fisher.add_argument("--task", required=True, help="seqio task (or mixture) of text examples: inputs and targets")
    fisher.add_argument("--num_examples", type=int, required=True, help="examples averaged over (those with target tokens)")
    fisher.add_argument("--split", default="train")
    fisher.add_argument("--batch_size", type=int, default=8, help="examples whose gradients are taken at once (global)")
    fisher.add_argument("--inputs_length", type=int, default=256, help="input tokens kept per example")
    fisher.add_argument("--targets_length", type=int, default=128, help="target tokens kept per example")
    fisher.add_argument("--targets", nargs="+", help="LoRA target regexes, e.g. 'attn/q$' 'attn/v$' (default: see above)")
    fisher.add_argument("--out", help="output directory (default RUN/fisher)")
    fisher.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=2,fsdp=4 (default: data parallel)")
    fisher.add_argument("--module", action="append", default=list(TASK_MODULES), help="task module to import (repeatable)")
    _process_flags(fisher)
    fisher.set_defaults(run=cmd_fisher)

    launch = commands.add_parser(
        "launch",
        help="run `flanjax train` on Cloud TPU (queued resources), GKE (xpk), SLURM or local processes",
        description="flanjax launch BACKEND [OPTIONS] -- TRAIN_ARGS, BACKEND one of tpu, xpk, slurm, local; TRAIN_ARGS are "
        "`flanjax train`'s, as for a local run. `flanjax launch BACKEND --help` lists a backend's options; --dry_run prints "
        "every command it would run and runs none.",
    )
    launch.add_argument("argv", nargs=argparse.REMAINDER, metavar="BACKEND [OPTIONS] -- TRAIN_ARGS", help="handed to the launch package")
    launch.set_defaults(run=cmd_launch)

    world = commands.add_parser("world", help="E2WM's world model: generate experiences (plans, stories), list activities")
    world_actions = world.add_subparsers(dest="action", metavar="ACTION", required=True)
    generate = world_actions.add_parser(
        "generate",
        help="plan every activity possible in N generated homes by MCTS, explore them at random, write JSON lines",
        description="Writes plans.jsonl, counting.jsonl, paths.jsonl, locations.jsonl and summary.json into --out "
        "(tasks/e2wm reads them: --gin.E2WM_DIR). Deterministic for a seed; goals impossible in a home are skipped "
        "and counted. Last line: one JSON object.",
    )
    generate.add_argument("--out", required=True, help="output directory")
    generate.add_argument("--homes", type=int, default=100, help="homes generated (default 100)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--simulations", type=int, default=2000, help="MCTS simulations per goal")
    generate.add_argument("--batch_size", type=int, default=64, help="goals planned at once")
    generate.add_argument("--stories_per_home", type=int, default=4, help="stories of each kind per home")
    generate.add_argument("--test_fraction", type=float, default=0.2, help="share of homes held out for evaluation")
    generate.add_argument("--counting_steps", type=int, default=12, help="moves a counting story narrates")
    generate.add_argument("--path_sentences", type=int, nargs=2, default=[13, 29], metavar=("MIN", "MAX"),
                          help="sentences of a path-tracking story (E2WM: 13 29)")
    listed = world_actions.add_parser("activities", help="list the registered activities and their goals")
    for action in (generate, listed):
        action.add_argument("--world", default="household")
        action.add_argument("--module", action="append", default=[], help="module registering your world or activities (repeatable)")
        action.set_defaults(run=cmd_world)

    tasks = commands.add_parser("tasks", help="list registered tasks and mixtures; preview rendered examples")
    actions = tasks.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list tasks (templated ones with cluster, templates, metrics) and mixtures")
    listing.add_argument("--cluster", help="only this cluster's templated tasks")
    listing.add_argument("--json", action="store_true", help="print a JSON list of task objects")
    preview = actions.add_parser("preview", help="print a task's first examples as rendered text")
    preview.add_argument("name", help="a registered seqio task")
    preview.add_argument("-n", type=int, default=3, help="number of examples (default 3)")
    preview.add_argument("--split", default="train", help="split to read (default train)")
    preview.add_argument("--mock", action="store_true", help="use tensorflow_datasets.testing.mock_data (offline, random text)")
    for action in (listing, preview):
        action.add_argument("--module", action="append", default=list(TASK_MODULES), help="task module to import (repeatable)")
        action.set_defaults(run=cmd_tasks)
    return parser


def _sampling_arguments(command: argparse.ArgumentParser, **defaults) -> None:
    """Decoding options (see `decode.SamplingConfig`), with the command's defaults."""
    command.add_argument("--max_new_tokens", type=int, default=defaults["max_new_tokens"])
    command.add_argument("--temperature", type=float, default=defaults["temperature"], help="0: greedy")
    command.add_argument("--top_p", type=float, default=defaults["top_p"])
    command.add_argument("--repetition_penalty", type=float, default=defaults["repetition_penalty"],
                         help="Hugging Face's: logits of tokens already in the sequence divided by it "
                              "(multiplied if negative); 1: off, LIMA uses 1.2")  # fmt: skip
    command.add_argument("--num_beams", type=int, default=1,
                         help="beam search as Hugging Face's, returning the best of N beams (needs --temperature 0); 1: off")  # fmt: skip
    command.add_argument("--quantize", default="none", choices=["none", "int8", "int8_dynamic"],
                         help="sample with int8 weights (int8), or int8 weights and activations (int8_dynamic)")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--mesh", default=None, help="mesh sizes, e.g. data=2,fsdp=4 (default: data parallel)")


def _message(e: Exception) -> str:
    """An error's message without the line gin appends when it passes through a configurable."""
    return str(e).split("\n  In call to configurable")[0]


def main(argv: list[str] | None = None) -> int:
    from flanjax.quiet import quiet_libraries

    quiet_libraries()  # before TensorFlow loads: drops its and seqio's routine chatter
    argv = sys.argv[1:] if argv is None else argv
    if os.getcwd() not in sys.path:  # task modules in the working directory import, as under `python -m`
        sys.path.insert(0, os.getcwd())
    try:
        rest, bindings = _split_gin_args(argv)
        args = build_parser().parse_args(rest)
        _join(args)
        return args.run(args, bindings)
    except (UsageError, ConfigError) as e:
        print(f"flanjax: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # errors that name the problem and the fix: no traceback needed
        from flanjax.errors import FlanjaxError

        if isinstance(e, FlanjaxError):
            print(f"flanjax: error: {_message(e)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
