"""`flanjax launch BACKEND [OPTIONS] -- TRAIN_ARGS`: one `flanjax train` run on many hosts, through
the engines users already run; the train arguments are those of a local run.

    flanjax launch tpu --name my-run --zone us-east5-a --project my-proj --accelerator v5p-32 --slices 2 --spot \\
        -- --gin_file=configs/runs/sft.gin --gin.MODEL_DIR="'gs://bucket/run'"
    flanjax launch xpk --cluster my-gke --workload my-run --zone us-east5-a --project my-proj --accelerator v5p-32 -- ...
    flanjax launch slurm --nodes 4 --gpus_per_node 8 --partition a100 -- --gin_file=... --gin.MODEL_DIR=/shared/runs/x
    flanjax launch local --processes 2 -- --gin_file=configs/runs/quickstart.gin --gin.MODEL_DIR=runs/mp

Backends: `tpu` (Cloud TPU queued resources, gcloud), `xpk` (GKE), `slurm` (sbatch), `local`
(processes on this machine). Each checks its input before creating anything and takes
`--dry_run`, which prints every command it would run and runs none. Modules: one per backend,
`checks` (input checks), `source` (the commit shipped), `runner` (running or printing commands).
"""

from __future__ import annotations

import argparse

from launch import local, slurm, tpu, xpk
from launch.runner import LaunchError, Runner

BACKENDS = {
    "tpu": (tpu, "Cloud TPU VMs through queued resources (gcloud): create, wait, ship, install, run, delete"),
    "xpk": (xpk, "TPU slices of a GKE cluster through xpk (`xpk workload create`)"),
    "slurm": (slurm, "a SLURM GPU cluster: write an sbatch script that sruns one process per GPU (or host), submit it"),
    "local": (local, "several processes on this machine, each with its own CPU devices"),
}

TRAIN_ARGS = """After the options: -- and `flanjax train`'s arguments, as for a local run (the launcher
adds how the processes join), e.g. -- --gin_file=configs/runs/sft.gin --gin.MODEL_DIR="'gs://bucket/run'"."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flanjax launch", description=__doc__.split("\n\n")[0], epilog=TRAIN_ARGS)
    backends = parser.add_subparsers(dest="backend", metavar="BACKEND", required=True)
    for name, (module, summary) in BACKENDS.items():
        command = backends.add_parser(name, help=summary, description=module.__doc__, epilog=TRAIN_ARGS,
                                      usage=f"flanjax launch {name} [OPTIONS] -- TRAIN_ARGS",
                                      formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        module.add_arguments(command)
        command.add_argument("--dry_run", action="store_true", help="print every command it would run, and run none")
        command.set_defaults(launch=module.launch)
    return parser


def main(argv: list[str]) -> int:
    """Runs `flanjax launch` on `argv` (BACKEND, its options, `--`, the train arguments)."""
    own, sep, train_args = _split(argv)
    parser = build_parser()
    if not sep:
        parser.parse_known_args(own)  # --help and argparse's own complaints first
        raise LaunchError("put `--` between the launcher's options and `flanjax train`'s arguments. " + " ".join(TRAIN_ARGS.split()))
    args = parser.parse_args(own)
    return args.launch(args, train_args, Runner(dry_run=args.dry_run))


def _split(argv: list[str]) -> tuple[list[str], bool, list[str]]:
    if "--" not in argv:
        return list(argv), False, []
    i = argv.index("--")
    return argv[:i], True, argv[i + 1 :]
