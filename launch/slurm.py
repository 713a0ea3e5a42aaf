"""`flanjax launch slurm`: a run on a SLURM GPU cluster, as an sbatch script.

The script asks for --nodes nodes with --gpus_per_node GPUs each and `srun`s one
`flanjax train --multiprocess` per task; `jax.distributed.initialize()` reads SLURM's variables
(SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID) to join them.
JAX gives the task with local id i a node's GPU i, so by default there is one task per GPU;
with `--process_per host` one task drives all of its node's GPUs (JAX_LOCAL_DEVICE_IDS lists them).

The job runs the checkout in place (`#SBATCH --chdir`, on the shared filesystem), as it is
when the job starts. sbatch queues it; the launcher prints the job id and returns.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from launch.checks import check_mesh, check_shared_run_dir, check_train_args, parse_env
from launch.runner import LaunchError, Runner, require_tool, say


def sbatch_script(train_args: list[str], *, nodes: int, gpus_per_node: int, process_per: str, job_name: str, chdir: str,
                  python: str, output: str, env: dict[str, str], setup: list[str], sbatch_options: list[str]) -> str:  # fmt: skip
    tasks_per_node = gpus_per_node if process_per == "gpu" else 1
    options = [f"--job-name={job_name}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
               f"--gpus-per-node={gpus_per_node}", f"--output={output}", f"--chdir={chdir}", *sbatch_options]  # fmt: skip
    exports = {"PYTHONUNBUFFERED": "1", **env}
    if process_per == "host":  # JAX would give the one task per node only GPU 0 (its SLURM_LOCALID)
        exports["JAX_LOCAL_DEVICE_IDS"] = ",".join(map(str, range(gpus_per_node)))
    train = shlex.join([python, "-m", "flanjax.cli", "train", "--multiprocess", *train_args])
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {option}" for option in options),
        "# Written by `flanjax launch slurm`: one `flanjax train --multiprocess` per task; jax.distributed reads",
        "# SLURM's variables to join them.",
        "set -euo pipefail",
        *setup,
        *(f"export {key}={shlex.quote(value)}" for key, value in exports.items()),
        f"srun --kill-on-bad-exit=1 {train}",
        "",
    ])  # fmt: skip


def job_id(sbatch_output: str) -> str:
    """`sbatch --parsable` prints JOBID or JOBID;CLUSTER."""
    return sbatch_output.strip().split(";")[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--process_per", choices=["gpu", "host"], default="gpu",
                        help="one process per GPU (default; --ntasks-per-node = GPUs) or one per node driving all its GPUs")  # fmt: skip
    parser.add_argument("--job_name", default="flanjax", help="SLURM job name (default flanjax)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account to charge")
    parser.add_argument("--time", help="time limit, e.g. 1-00:00:00")
    parser.add_argument("--sbatch_option", action="append", default=[], metavar="OPTION",
                        help="another #SBATCH line, e.g. --sbatch_option=--exclusive (repeatable)")  # fmt: skip
    parser.add_argument("--setup", action="append", default=[], metavar="LINE",
                        help="a shell line the job runs before srun, e.g. 'module load cuda/12.4' (repeatable)")  # fmt: skip
    parser.add_argument("--python", default=sys.executable,
                        help=f"Python with flanjax installed, as the nodes see it (default: this one, {sys.executable})")  # fmt: skip
    parser.add_argument("--chdir", default=os.getcwd(), help="the job's working directory (default: this one)")
    parser.add_argument("--output", help="the job's log (default: CHDIR/JOB_NAME-%%j.out; %%j is the job id)")
    parser.add_argument("--script", help="where to write the sbatch script (default: CHDIR/JOB_NAME.sbatch)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the run (repeatable)")
    parser.add_argument("--mesh", help="check that this mesh fits the GPUs and train with it, e.g. data=2,fsdp=8")


def launch(args: argparse.Namespace, train_args: list[str], runner: Runner) -> int:
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise LaunchError("--nodes and --gpus_per_node must be at least 1.")
    check_train_args(train_args)
    check_shared_run_dir(train_args, args.nodes)
    devices = args.nodes * args.gpus_per_node
    processes = args.nodes * (args.gpus_per_node if args.process_per == "gpu" else 1)
    if args.mesh:
        where = f"{args.nodes} nodes x {args.gpus_per_node} GPUs"
        train_args = [*train_args, *check_mesh(args.mesh, devices, where, processes=processes)]
    env = parse_env(args.env)
    require_tool("sbatch", runner.dry_run)
    chosen = (("partition", args.partition), ("account", args.account), ("time", args.time))
    options = [f"--{name}={value}" for name, value in chosen if value]
    script = sbatch_script(train_args, nodes=args.nodes, gpus_per_node=args.gpus_per_node, process_per=args.process_per,
                           job_name=args.job_name, chdir=args.chdir, python=args.python,
                           output=args.output or os.path.join(args.chdir, f"{args.job_name}-%j.out"), env=env, setup=args.setup,
                           sbatch_options=[*options, *args.sbatch_option])  # fmt: skip
    path = args.script or os.path.join(args.chdir, f"{args.job_name}.sbatch")
    runner.write(path, script)
    done = runner.capture(["sbatch", "--parsable", path], dry_output="JOBID\n")
    if done.returncode:
        raise LaunchError(f"sbatch refused {path}: {done.stderr.strip()}")
    job = job_id(done.stdout)
    if not runner.dry_run:
        say(f"submitted job {job} ({processes} processes on {args.nodes} nodes); follow it with: squeue -j {job}")
        print(job)
    return 0
