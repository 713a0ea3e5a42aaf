"""The `flanjax` command line: parse configuration, then call the library.

    flanjax train --gin_file=configs/runs/quickstart.gin --gin.MODEL_DIR="'runs/x'"
    flanjax bench train --model=bench_27m --batch_size=8 --seq_len=256
    flanjax tasks list

Configuration is gin, t5x style: `--gin_file` (repeatable; files `include` each other) and
`--gin.KEY=VALUE` bindings applied after the files. The parsed config is written to
`<model_dir>/config.gin` at the start and the operative config (what was actually used)
to `<model_dir>/operative_config.gin` at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UsageError(Exception):
    """Bad command-line or configuration input: printed without a traceback."""


# --- gin ------------------------------------------------------------------------------------

_LITERAL = re.compile(r"""^(['"@%\[({]|-?\d|True$|False$|None$)""")


def gin_binding(key: str, value: str) -> str:
    """`--gin.KEY=VALUE` -> a gin binding; a bare path or word becomes a string."""
    return f"{key} = {value if _LITERAL.match(value) else repr(value)}"


def parse_gin(files: list[str], bindings: list[str]) -> None:
    import gin

    gin.add_config_file_search_path(os.getcwd())
    gin.add_config_file_search_path(REPO_ROOT)
    missing = [f for f in files if not os.path.exists(f) and not os.path.exists(os.path.join(REPO_ROOT, f))]
    if missing:
        raise UsageError(f"gin file {missing[0]!r} not found (looked in {os.getcwd()} and {REPO_ROOT}).")
    resolved = [f if os.path.exists(f) else os.path.join(REPO_ROOT, f) for f in files]
    try:
        gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=True)
    except (ValueError, KeyError, TypeError, SyntaxError, ImportError) as e:
        raise UsageError(f"gin configuration error: {e}") from None


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


def cmd_train(args: argparse.Namespace, bindings: list[str]) -> int:
    if args.coordinator_address or args.multiprocess:
        from flanjax.sharding import initialize_distributed

        initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    import gin

    from flanjax.train import run

    parse_gin(args.gin_file, bindings)
    train = gin.get_configurable(run.train)
    model_dir = _model_dir()
    if model_dir:
        _write(model_dir, "config.gin", gin.config_str())
    try:
        result = train()
    except TypeError as e:  # a run file that leaves one of train()'s arguments unbound
        if "required keyword-only argument" in str(e):
            raise UsageError(f"{e}. Bind it in a gin file or with --gin.run.train.NAME=VALUE.") from None
        raise
    if model_dir:
        _write(model_dir, "operative_config.gin", gin.operative_config_str())
    return 0 if not result.preempted else 143


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
        os.makedirs(model_dir, exist_ok=True)
        with open(os.path.join(model_dir, name), "w") as f:
            f.write(text)


def model_config(name: str, bindings: list[str]):
    """The `MODEL` of configs/models/NAME.gin (or of a gin file path), with overrides."""
    import gin

    from flanjax import cli  # this module by its import name, also under `python -m`

    path = name if name.endswith(".gin") else os.path.join("configs", "models", f"{name}.gin")
    read_model = "from __gin__ import dynamic_registration\nfrom flanjax import cli\ncli.configured_value.value = %MODEL"
    parse_gin([path], [*bindings, read_model])
    return gin.get_configurable(cli.configured_value)()


def configured_value(value):
    """Returns what gin bound to `value`: how the CLI reads a macro's built object."""
    return value


def cmd_bench(args: argparse.Namespace, bindings: list[str]) -> int:
    from flanjax import benchmark

    config = model_config(args.model, bindings)
    if args.dtype:
        import dataclasses

        config = dataclasses.replace(config, dtype=args.dtype)
    result = benchmark.bench_train(
        config,
        model_name=args.model,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        steps=args.steps,
        warmup=args.warmup,
    )
    print(json.dumps(result))
    return 0


def cmd_tasks(args: argparse.Namespace, bindings: list[str]) -> int:
    import importlib

    import seqio

    for module in args.module:
        importlib.import_module(module)
    names = sorted(seqio.TaskRegistry.names())
    mixtures = sorted(seqio.MixtureRegistry.names())
    if args.json:
        print(json.dumps({"tasks": names, "mixtures": mixtures}))
    else:
        print("tasks:\n  " + "\n  ".join(names))
        print("mixtures:\n  " + "\n  ".join(mixtures))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flanjax",
        description="Instruction tuning and RLHF of language models in JAX + Flax NNX.",
        epilog="Run `flanjax COMMAND --help` for a command's options.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train",
        help="train a model (instruction tuning / SFT) from gin configs",
        description="Train a model from gin files; --gin.KEY=VALUE overrides any binding.",
    )
    train.add_argument("--gin_file", action="append", default=[], required=True, help="gin config file (repeatable)")
    train.add_argument("--coordinator_address", help="host:port of process 0, for multi-process runs")
    train.add_argument("--num_processes", type=int, help="number of processes in a multi-process run")
    train.add_argument("--process_id", type=int, help="this process's index in a multi-process run")
    train.add_argument("--multiprocess", action="store_true", help="join a multi-process run the cluster describes (Cloud TPU, SLURM)")
    train.set_defaults(run=cmd_train)

    bench = commands.add_parser("bench", help="measure training throughput; prints one JSON object")
    bench.add_argument("what", choices=["train"], help="what to measure")
    bench.add_argument("--model", default="bench_27m", help="a model config in configs/models (default bench_27m)")
    bench.add_argument("--batch_size", type=int, default=8)
    bench.add_argument("--seq_len", type=int, default=256)
    bench.add_argument("--steps", type=int, default=10, help="timed steps")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation and warm-up)")
    bench.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
    bench.set_defaults(run=cmd_bench)

    tasks = commands.add_parser("tasks", help="list registered seqio tasks and mixtures")
    tasks.add_argument("action", choices=["list"])
    tasks.add_argument("--module", action="append", default=["tasks.quickstart"], help="task module to import (repeatable)")
    tasks.add_argument("--json", action="store_true", help="print JSON")
    tasks.set_defaults(run=cmd_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = sys.argv[1:] if argv is None else argv
    try:
        rest, bindings = _split_gin_args(argv)
        args = build_parser().parse_args(rest)
        return args.run(args, bindings)
    except UsageError as e:
        print(f"flanjax: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # errors that name the problem and the fix: no traceback needed
        from flanjax.errors import FlanjaxError

        if isinstance(e, FlanjaxError):
            print(f"flanjax: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
