"""Checks of a launch's input, made before anything is created: accelerator type, mesh, names,
zone and project, the run directory, environment and the `flanjax train` arguments. Each failure is a `LaunchError` that
names the problem and the fix."""

from __future__ import annotations

import dataclasses
import os
import re

from launch.runner import LaunchError, say

# TPU families by accelerator-type prefix: the N of "v5p-N" counts TensorCores on v4 and v5p
# (two per chip, one JAX device per chip) and chips on v5e and v6e (one TensorCore each).
TENSORCORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5litepod": 1, "v5e": 1, "v6e": 1}
ALIASES = {"v5e": "v5litepod"}  # gcloud and xpk name v5e slices v5litepod-N


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One slice's accelerator type, as gcloud and xpk spell it, and its chips (JAX devices)."""

    family: str
    type: str
    chips: int


def parse_accelerator(text: str) -> Accelerator:
    known = ", ".join(f"{family}-N" for family in TENSORCORES_PER_CHIP)
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not match or match.group(1) not in TENSORCORES_PER_CHIP:
        raise LaunchError(f"--accelerator {text!r}: unknown accelerator type. Known families: {known} "
                          "(e.g. v5p-32, v5litepod-16, v6e-8).")  # fmt: skip
    family, n = ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
    per_chip = TENSORCORES_PER_CHIP[family]
    if n == 0 or n % per_chip:
        raise LaunchError(f"--accelerator {text!r}: {family}-N counts TensorCores, {per_chip} per chip, so N must be a "
                          f"positive multiple of {per_chip} (e.g. {family}-8).")  # fmt: skip
    return Accelerator(family, f"{family}-{n}", n // per_chip)


MESH_AXES = ("data", "fsdp", "tensor", "dcn_data", "dcn_fsdp")


def parse_mesh(spec: str) -> dict[str, int]:
    """`data=2,fsdp=4` -> {"data": 2, "fsdp": 4}, the syntax of the other commands' --mesh."""
    try:
        sizes = {key.strip(): int(value) for key, value in (part.split("=") for part in spec.split(","))}
    except ValueError:
        raise LaunchError(f"--mesh {spec!r}: expected sizes like data=2,fsdp=4 (axes: {', '.join(MESH_AXES)}).") from None
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise LaunchError(f"--mesh {spec!r}: unknown axis {unknown[0]!r}; the axes are {', '.join(MESH_AXES)}.")
    return sizes


def check_mesh(spec: str, devices: int, where: str, slices: int | None = None, processes: int | None = None) -> list[str]:
    """Checks that the mesh `spec` fits `devices` devices (`where` describes them) and returns the
    `--gin.sharding.MeshConfig.*` arguments that make the run use it. On TPU, dcn_data x dcn_fsdp
    must be the number of slices; on GPUs and CPUs each process counts as a slice
    (`flanjax.sharding.device_grid`), so DCN sizes other than 1 must match the processes."""
    from flanjax.sharding import MeshConfig, MeshError  # jax: imported only when a mesh is checked

    sizes = parse_mesh(spec)
    config = MeshConfig(**sizes)
    if slices is not None and config.num_slices != slices:
        raise LaunchError(f"--mesh {spec!r} spans dcn_data x dcn_fsdp = {config.num_slices} slices but the job runs on "
                          f"{slices}: set dcn_data={slices} (data parallel across slices), e.g. --mesh "
                          f"{_with(sizes, dcn_data=slices)}.")  # fmt: skip
    if processes is not None and config.num_slices not in (1, processes):
        raise LaunchError(f"--mesh {spec!r}: on GPUs and CPUs each process counts as a slice, and the job runs {processes} "
                          f"processes: set dcn_data x dcn_fsdp to {processes}, or leave the DCN sizes out.")  # fmt: skip
    try:
        config.resolve(devices)
    except MeshError as e:
        raise LaunchError(f"--mesh {spec!r} on {where}: {e}") from None
    return [f"--gin.sharding.MeshConfig.{axis}={size}" for axis, size in sizes.items()]


def _with(sizes: dict[str, int], **changes: int) -> str:
    return ",".join(f"{k}={v}" for k, v in {**sizes, **changes}.items())


NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def check_name(name: str, flag: str) -> None:
    """Cloud resource and xpk workload names: lowercase letters, digits, hyphens; 40 at most."""
    if not NAME.fullmatch(name) or len(name) > 40:
        raise LaunchError(f"{flag} {name!r}: use lowercase letters, digits and hyphens, starting with a letter and not ending "
                          "with a hyphen, 40 characters at most (e.g. sft-llama-1b).")  # fmt: skip


# `flanjax train` options the launchers set themselves: how the processes find each other.
PROCESS_OPTIONS = ("--multiprocess", "--coordinator_address", "--num_processes", "--process_id")


def check_train_args(train_args: list[str]) -> None:
    if not train_args:
        raise LaunchError("nothing to train: give `flanjax train`'s arguments after `--`, as for a local run, e.g. "
                          "-- --gin_file=configs/runs/sft.gin --gin.MODEL_DIR=\"'gs://BUCKET/RUN'\".")  # fmt: skip
    for arg in train_args:
        if arg.split("=", 1)[0] in PROCESS_OPTIONS:
            raise LaunchError(f"{arg}: the launcher sets how the processes join the run ({', '.join(PROCESS_OPTIONS)}); leave it out.")


def model_dir(train_args: list[str]) -> str | None:
    """The run directory the train arguments bind (`--gin.MODEL_DIR=...`, the last one wins),
    without the gin string quotes."""
    values = [arg.split("=", 1)[1] for arg in train_args if arg.startswith("--gin.MODEL_DIR=")]
    if not values:
        return None
    value = values[-1].strip()
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" else value


def require_gcs_run_dir(train_args: list[str], where: str) -> str:
    """Cloud runs write to Cloud Storage: every host must see the same checkpoints, and they must
    outlive the workers (deleted at the end, or by a pre-emption) for a restart to resume."""
    path = model_dir(train_args)
    if path is None or not path.startswith("gs://"):
        found = "no --gin.MODEL_DIR" if path is None else f"--gin.MODEL_DIR {path!r} is not on Cloud Storage"
        raise LaunchError(f"{found}: the run on {where} needs a run directory every host shares and that outlives the workers. "
                          "Add --gin.MODEL_DIR=\"'gs://BUCKET/RUN'\" after `--`.")  # fmt: skip
    return path


def check_shared_run_dir(train_args: list[str], nodes: int) -> str:
    """SLURM runs write to a filesystem their nodes share (or Cloud Storage): an absolute path is
    taken as shared, with a warning when several nodes write to it; a relative one is refused."""
    path = model_dir(train_args)
    if path is None:
        raise LaunchError("no --gin.MODEL_DIR: give the run directory after `--`, on a filesystem every node shares, e.g. "
                          "--gin.MODEL_DIR=/shared/runs/sft (a re-submitted job resumes from its checkpoints).")  # fmt: skip
    if path.startswith("gs://"):
        return path
    if not path.startswith("/"):
        raise LaunchError(f"--gin.MODEL_DIR {path!r} is relative: each node would resolve it on its own. Give an absolute "
                          "path on the filesystem the nodes share (or gs://BUCKET/RUN).")  # fmt: skip
    if nodes > 1:
        say(f"{path} must be on a filesystem all {nodes} nodes share (not node-local disk such as /tmp): every host writes there.")
    return path


def parse_env(assignments: list[str]) -> dict[str, str]:
    """`--env KEY=VALUE` options (repeatable) -> {KEY: VALUE}."""
    env = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise LaunchError(f"--env {assignment!r}: write KEY=VALUE, e.g. --env XLA_FLAGS=--xla_dump_to=/tmp/hlo.")
        env[key] = value
    return env


def cloud_location(zone: str | None, project: str | None) -> tuple[str, str]:
    """--zone and --project, or gcloud's own environment variables. gcloud's configured defaults are
    deliberately not read: a stale default would create expensive TPUs in the wrong project."""
    zone = zone or os.environ.get("CLOUDSDK_COMPUTE_ZONE")
    project = project or os.environ.get("CLOUDSDK_CORE_PROJECT")
    for flag, value, variable, example, key in (("--zone", zone, "CLOUDSDK_COMPUTE_ZONE", "us-east5-a", "compute/zone"),
                                                ("--project", project, "CLOUDSDK_CORE_PROJECT", "my-project", "project")):  # fmt: skip
        if not value:
            raise LaunchError(f"no {flag}: say where the run goes, e.g. {flag} {example} (or set {variable}). gcloud's configured "
                              f"default is not used, so a stale one cannot send the job elsewhere; `{flag} $(gcloud config get-value "
                              f"{key})` takes it on purpose.")  # fmt: skip
    return zone, project


def check_tpu_job(args, train_args: list[str], name: str, flag: str) -> tuple[Accelerator, str, str, list[str], dict[str, str]]:
    """What a TPU job (queued resources or xpk) checks before anything is created; returns the
    accelerator, zone, project, the train arguments (with the checked mesh) and the environment."""
    check_name(name, flag)
    accelerator = parse_accelerator(args.accelerator)
    if args.slices < 1 or args.max_restarts < 0:
        raise LaunchError("--slices must be at least 1 and --max_restarts at least 0.")
    zone, project = cloud_location(args.zone, args.project)
    check_train_args(train_args)
    where = f"{args.slices} x {accelerator.type} ({accelerator.chips * args.slices} chips)"
    require_gcs_run_dir(train_args, where)
    if args.mesh:
        train_args = [*train_args, *check_mesh(args.mesh, accelerator.chips * args.slices, where, slices=args.slices)]
    return accelerator, zone, project, train_args, parse_env(args.env)
