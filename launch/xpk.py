"""`flanjax launch xpk`: a run on a GKE cluster's TPU slices through xpk (`xpk workload create`).

xpk builds the workload's image and submits it as a JobSet; GKE schedules it, restarts it after
a pre-emption (--max_restarts, JobSet's restarts) and gives a multislice job the MEGASCALE_*
settings that JAX reads. Two ways to get flanjax into the image:
  default          xpk adds the HEAD commit (`git archive`, unpacked) to --base_docker_image, and
                   each worker runs `pip install -e .[tpu]` before `flanjax train`
  --docker_image   an image with flanjax installed already (faster starts): used as it is
"""

from __future__ import annotations

import argparse
import os
import shlex
import tempfile

from launch.checks import check_tpu_job
from launch.runner import LaunchError, Runner, require_tool, say, shell_line
from launch.source import Checkout

# xpk's own default base image is python:3.10, older than flanjax supports (3.11 and up).
BASE_IMAGE = "python:3.11"


def workload_command(cluster: str, workload: str, tpu_type: str, slices: int, zone: str, project: str, command: str,
                     image: list[str], max_restarts: int, env: dict[str, str]) -> list[str]:  # fmt: skip
    """`xpk workload create`; `image` is --docker-image=... or --base-docker-image=... --script-dir=..."""
    return ["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={workload}", f"--tpu-type={tpu_type}",
            f"--num-slices={slices}", f"--zone={zone}", f"--project={project}", *image, f"--max-restarts={max_restarts}",
            *(f"--env={key}={value}" for key, value in env.items()), f"--command={command}"]  # fmt: skip


def worker_command(train_args: list[str], install: bool) -> str:
    """The shell command each worker's container runs (in the image's working directory)."""
    train = shlex.join(["python3", "-m", "flanjax.cli", "train", "--multiprocess", *train_args])
    return f'python3 -m pip install --quiet -e ".[tpu]" && {train}' if install else train


def export_commands(checkout: Checkout, directory: str) -> list[list[str]]:
    """The HEAD commit, unpacked into `directory` (xpk's --script-dir, copied into the image)."""
    tarball = checkout.tarball()
    unpack = [["rm", "-rf", directory], ["mkdir", "-p", directory], ["tar", "-xzf", tarball, "-C", directory]]
    return [checkout.archive_command(tarball), *unpack]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cluster", required=True, help="the GKE cluster (one xpk created, with TPU node pools)")
    parser.add_argument("--workload", required=True, help="name of the workload (lowercase, at most 40 characters)")
    parser.add_argument("--accelerator", required=True, help="TPU type of each slice, e.g. v5p-32, v5litepod-16, v6e-8")
    parser.add_argument("--slices", type=int, default=1, help="number of slices (xpk --num-slices); default 1")
    parser.add_argument("--zone", help="the cluster's zone (or set CLOUDSDK_COMPUTE_ZONE); gcloud's configured default is not used")
    parser.add_argument("--project", help="Google Cloud project (or set CLOUDSDK_CORE_PROJECT); gcloud's configured default is not used")
    image = parser.add_mutually_exclusive_group()
    image.add_argument("--docker_image", help="a registry image with flanjax installed, run as it is (no code shipped, no install)")
    image.add_argument("--base_docker_image", default=BASE_IMAGE, help=f"image xpk adds the HEAD commit to (default {BASE_IMAGE})")
    parser.add_argument("--max_restarts", type=int, default=3, help="JobSet restarts after a failure or pre-emption (default 3)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the run (repeatable)")
    parser.add_argument("--mesh", help="check that this mesh fits the chips and train with it, e.g. data=1,fsdp=-1,dcn_data=2")
    parser.add_argument("--allow_dirty", action="store_true", help="ship HEAD although the checkout has uncommitted changes")


def launch(args: argparse.Namespace, train_args: list[str], runner: Runner) -> int:
    accelerator, zone, project, train_args, env = check_tpu_job(args, train_args, args.workload, "--workload")
    require_tool("xpk", runner.dry_run)
    if args.docker_image:
        image, install = [f"--docker-image={args.docker_image}"], False
    else:
        checkout = Checkout.find()
        checkout.require_clean(args.allow_dirty)
        directory = os.path.join(tempfile.gettempdir(), f"flanjax-{checkout.commit[:12]}")
        for argv in export_commands(checkout, directory):
            if runner.run(argv):
                raise LaunchError(f"could not unpack {checkout.commit[:12]} into {directory} (see the message above).")
        image, install = [f"--base-docker-image={args.base_docker_image}", f"--script-dir={directory}"], True
    command = workload_command(args.cluster, args.workload, accelerator.type, args.slices, zone, project,
                               worker_command(train_args, install), image, args.max_restarts, env)  # fmt: skip
    status = runner.run(command)
    if status:
        say(f"xpk could not create the workload (exit status {status}; see its message above).")
        return status
    follow = ["xpk", "workload", "list", f"--cluster={args.cluster}", f"--zone={zone}", f"--project={project}",
              f"--wait-for-job-completion={args.workload}"]  # fmt: skip
    if not runner.dry_run:
        say(f"submitted workload {args.workload} to {args.cluster}; wait for it with: {shell_line(follow)}")
    return 0
