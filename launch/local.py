"""`flanjax launch local`: several `flanjax train` processes on this machine, as a multi-host
job would run them (each owns --devices_per_process CPU devices and reads its own data shard),
joined through a coordinator at 127.0.0.1:--port. For testing multi-process runs without a
cluster; `launch/local_processes.sh` is the same launcher as a script.
"""

from __future__ import annotations

import argparse
import os
import sys

from launch.checks import check_mesh, check_train_args
from launch.runner import LaunchError, Runner


def flanjax_command() -> list[str]:
    """The `flanjax` the processes run: $FLANJAX if set (a path), else this Python's."""
    return [os.environ["FLANJAX"]] if os.environ.get("FLANJAX") else [sys.executable, "-m", "flanjax.cli"]


def process_commands(processes: int, port: int, train_args: list[str]) -> list[list[str]]:
    return [[*flanjax_command(), "train", f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
             f"--process_id={i}", *train_args] for i in range(processes)]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=int, default=2, help="number of processes (default 2)")
    parser.add_argument("--devices_per_process", type=int, default=4, help="CPU devices each process owns (default 4)")
    parser.add_argument("--port", type=int, default=12355, help="the coordinator's port on 127.0.0.1 (default 12355)")
    parser.add_argument("--mesh", help="check that this mesh fits the devices and train with it, e.g. data=2,fsdp=4")


def launch(args: argparse.Namespace, train_args: list[str], runner: Runner) -> int:
    if args.processes < 1 or args.devices_per_process < 1:
        raise LaunchError("--processes and --devices_per_process must be at least 1.")
    check_train_args(train_args)
    if args.mesh:
        where = f"{args.processes} processes x {args.devices_per_process} CPU devices"
        train_args = [*train_args, *check_mesh(args.mesh, args.processes * args.devices_per_process, where, processes=args.processes)]
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process}"}
    started = [p for argv in process_commands(args.processes, args.port, train_args) for p in runner.start(argv, env)]
    return runner.wait_all(started)
