"""`flanjax launch tpu`: a run on Cloud TPU VMs through queued resources (gcloud).

The steps, each one gcloud command (`--dry_run` prints them all):
  create   queued-resources create NAME: the slice, or --slices S slices (--node-count S --node-prefix NAME)
  wait     queued-resources describe NAME --format=value(state.state), every --poll_seconds, until ACTIVE
  ship     `git archive` of HEAD, then queued-resources scp to every worker of every slice
  install  queued-resources ssh --node=all --worker=all: unpack, `pip install -e .[tpu]` (all workers at once)
  run      the same ssh: `flanjax train --multiprocess ARGS` on every worker; each keeps its output in
           ~/flanjax-train.log and worker 0 of slice 0 also streams it here
  delete   queued-resources delete NAME --force, unless --keep
A step that fails while describe says the slices are gone (SUSPENDING, SUSPENDED, FAILED, or no
resource at all) was a pre-emption: the resource is deleted and re-created and the same command
runs again, and flanjax resumes from the run directory's last checkpoint; --max_restarts times.

`--multiprocess` lets JAX find the other workers from the TPU VM metadata. With several slices,
the queued resource's runtime provides the MEGASCALE_* settings that join them (JAX reads them
from the `tpu-env` metadata), so the launcher sets none of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import time

from launch.checks import Accelerator, check_tpu_job
from launch.runner import LaunchError, Runner, require_tool, say, shell_line
from launch.source import Checkout

# The runtime (TPU VM image) that Cloud TPU's documentation gives for JAX on each family.
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
ACTIVE = "ACTIVE"
GONE = "NOT_FOUND"  # describe found no resource: deleted under us, or never created
LOST = ("SUSPENDING", "SUSPENDED", "FAILED", "DELETING", GONE)  # the slices are gone: re-create them
# On each worker, relative to its home directory.
REMOTE_TARBALL, REMOTE_DIR = "flanjax.tar.gz", "flanjax"
REMOTE_LOG, REMOTE_STATUS = "flanjax-train.log", "flanjax-train.status"


@dataclasses.dataclass(frozen=True)
class QueuedResource:
    name: str
    zone: str
    project: str
    accelerator: Accelerator
    slices: int = 1
    runtime_version: str | None = None  # None: the family's default
    capacity: str = "on-demand"  # or "spot", "reserved"

    def gcloud(self, verb: str, *args: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", verb, *args, f"--zone={self.zone}", f"--project={self.project}"]


def create_command(qr: QueuedResource) -> list[str]:
    nodes = [f"--node-id={qr.name}"] if qr.slices == 1 else [f"--node-count={qr.slices}", f"--node-prefix={qr.name}"]
    capacity = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[qr.capacity]
    runtime = qr.runtime_version or RUNTIME_VERSIONS[qr.accelerator.family]
    return qr.gcloud("create", qr.name, f"--accelerator-type={qr.accelerator.type}", f"--runtime-version={runtime}", *nodes, *capacity)


def describe_command(qr: QueuedResource) -> list[str]:
    return qr.gcloud("describe", qr.name, "--format=value(state.state)")


def delete_command(qr: QueuedResource) -> list[str]:
    return qr.gcloud("delete", qr.name, "--force", "--quiet")


def scp_command(qr: QueuedResource, tarball: str) -> list[str]:
    return qr.gcloud("scp", tarball, f"{qr.name}:{REMOTE_TARBALL}", "--node=all", "--worker=all")


def ssh_command(qr: QueuedResource, script: str) -> list[str]:
    # --batch-size=all: every worker at once (by default 64 at a time, which would leave a bigger
    # job's first workers waiting for the rest forever). The scripts are POSIX sh: any login shell runs them.
    return [*qr.gcloud("ssh", qr.name, "--node=all", "--worker=all", "--batch-size=all"), f"--command={script}"]


def install_script(python: str) -> str:
    return "\n".join([
        "set -e",
        f"rm -rf ~/{REMOTE_DIR} && mkdir -p ~/{REMOTE_DIR}",
        f"tar -xzf ~/{REMOTE_TARBALL} -C ~/{REMOTE_DIR}",
        f"cd ~/{REMOTE_DIR}",
        f'{shlex.quote(python)} -m pip install --quiet -e ".[tpu]"',
    ])  # fmt: skip


def train_command(python: str, train_args: list[str]) -> list[str]:
    return [python, "-m", "flanjax.cli", "train", "--multiprocess", *train_args]


def run_script(python: str, train_args: list[str], env: dict[str, str]) -> str:
    """What every worker runs: `flanjax train --multiprocess ARGS` with `env`, its output kept in
    ~/flanjax-train.log and its exit status returned. Worker 0 of slice 0 (by the metadata JAX
    reads too: agent-worker-number, and MEGASCALE_SLICE_ID in tpu-env) also prints the output,
    so the launcher streams one worker's."""
    return "\n".join([
        'meta() { curl -sf -H Metadata-Flavor:Google "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"; }',
        "worker=$(meta agent-worker-number)",
        "slice=$(meta tpu-env | sed -nE 's/^MEGASCALE_SLICE_ID:[^0-9]*([0-9]+).*/\\1/p')",
        'show() { if [ "${worker:-0}" = 0 ] && [ "${slice:-0}" = 0 ]; then cat; else cat > /dev/null; fi; }',
        *(f"export {key}={shlex.quote(value)}" for key, value in env.items()),
        f"cd ~/{REMOTE_DIR}",
        f"{{ {shlex.join(train_command(python, train_args))} 2>&1; echo $? > ~/{REMOTE_STATUS}; }} | tee ~/{REMOTE_LOG} | show",
        f'exit "$(cat ~/{REMOTE_STATUS})"',
    ])  # fmt: skip


def describe(qr: QueuedResource, runner: Runner, echo: bool = True) -> str:
    """The resource's state; GONE when there is none."""
    done = runner.capture(describe_command(qr), dry_output=f"{ACTIVE}\n", echo=echo)
    if done.returncode:
        if "NOT_FOUND" in done.stderr or "not found" in done.stderr.lower():
            return GONE
        raise LaunchError(f"gcloud could not describe the queued resource {qr.name}: {done.stderr.strip()}")
    return done.stdout.strip() or "UNKNOWN"


def wait_until_settled(qr: QueuedResource, runner: Runner, poll_seconds: float, timeout: float) -> str:
    """Polls describe until the resource is ACTIVE or lost; says each new state (and, while one
    lasts, every five minutes) with the time waited so far."""
    start = said = time.monotonic()
    last = None
    while True:
        state = describe(qr, runner, echo=last is None)
        now = time.monotonic()
        if state != last or now - said >= 300:
            say(f"[{_clock(now - start)}] {qr.name}: {state}")
            last, said = state, now
        if state == ACTIVE or state in LOST:
            return state
        if timeout and now - start > timeout:
            raise LaunchError(f"{qr.name} is still {state} after {_clock(now - start)} (--wait_timeout {timeout:g}): capacity "
                              "is short. Try another zone, --spot, a reservation (--reserved), or a longer --wait_timeout "
                              "(0: no limit).")  # fmt: skip
        runner.sleep(poll_seconds)


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a queued-resource run goes: the resource, the code and what the workers run."""

    qr: QueuedResource
    checkout: Checkout
    install: str
    run: str
    keep: bool = False
    max_restarts: int = 3
    poll_seconds: float = 30.0
    wait_timeout: float = 0.0  # 0: wait for capacity as long as it takes


def execute(plan: Plan, runner: Runner) -> int:
    """create -> wait -> ship -> install -> run [-> pre-empted: delete, create, wait, ... again] -> delete."""
    qr, tarball = plan.qr, plan.checkout.tarball()
    if runner.run(plan.checkout.archive_command(tarball)):
        raise LaunchError(f"`git archive` could not pack {plan.checkout.commit[:12]} into {tarball} (see git's message above).")
    created, restarts = False, 0
    try:
        while True:
            if runner.run(create_command(qr)):
                raise LaunchError(f"gcloud could not create the queued resource {qr.name} (see its message above): check the "
                                  "quota for the accelerator in the zone, and that no resource of that name exists.")  # fmt: skip
            created = True
            state = wait_until_settled(qr, runner, plan.poll_seconds, plan.wait_timeout)
            if state == ACTIVE:
                failed = _steps(plan, tarball, runner)
                if failed is None:
                    if not runner.dry_run:
                        say(f"the run finished on {qr.name}.")
                    return 0
                step, status = failed
                state = describe(qr, runner)
                if state == ACTIVE:  # the slices are there: the run itself failed, and would fail again
                    say(f"{step} failed on the workers (exit status {status}) while {qr.name} is ACTIVE: not a pre-emption, so no "
                        f"restart. Each worker's log is ~/{REMOTE_LOG} (kept with --keep).")  # fmt: skip
                    return status or 1
            created = state != GONE
            if restarts == plan.max_restarts:
                times = f"{restarts + 1} time{'s' if restarts else ''}"
                raise LaunchError(f"{qr.name} was lost {times} (last state {state}: pre-empted or failed); gave up after "
                                  f"--max_restarts={plan.max_restarts} re-creations. The checkpoints in the run directory are "
                                  "kept: run the same command again to resume from them.")  # fmt: skip
            restarts += 1
            say(f"{qr.name} is {state}: pre-empted. Deleting and re-creating it, restart {restarts} of {plan.max_restarts}; "
                "the run resumes from its last checkpoint.")  # fmt: skip
            if created:
                runner.run(delete_command(qr))
            created = False
    finally:
        if created and plan.keep:
            say(f"kept {qr.name} (--keep); delete it with: {shell_line(delete_command(qr))}")
        elif created and runner.run(delete_command(qr)):
            say(f"could not delete {qr.name}: check with `{shell_line(describe_command(qr))}` and delete it by hand.")


def _steps(plan: Plan, tarball: str, runner: Runner) -> tuple[str, int] | None:
    """Ships, installs and runs on every worker; the first step that fails, and its exit status."""
    steps = [
        ("shipping the code", f"shipping {plan.checkout.commit[:12]} to every worker", scp_command(plan.qr, tarball)),
        ("installing", "installing flanjax on every worker", ssh_command(plan.qr, plan.install)),
        ("the run", f"running flanjax train on every worker (worker 0's output follows; each keeps ~/{REMOTE_LOG})",
         ssh_command(plan.qr, plan.run)),
    ]  # fmt: skip
    for step, doing, argv in steps:
        say(doing)
        status = runner.run(argv)
        if status:
            return step, status
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="name of the queued resource (and its node, or node prefix with --slices)")
    parser.add_argument("--accelerator", required=True, help="accelerator type of each slice, e.g. v5p-32, v5litepod-16, v6e-8")
    parser.add_argument("--slices", type=int, default=1, help="number of slices (multislice: --node-count); default 1")
    parser.add_argument("--zone", help="zone, e.g. us-east5-a (or set CLOUDSDK_COMPUTE_ZONE); gcloud's configured default is not used")
    parser.add_argument("--project", help="Google Cloud project (or set CLOUDSDK_CORE_PROJECT); gcloud's configured default is not used")
    defaults = ", ".join(f"{family}: {runtime}" for family, runtime in RUNTIME_VERSIONS.items())
    parser.add_argument("--runtime_version", help=f"TPU VM runtime; default by family: {defaults}")
    capacity = parser.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_const", dest="capacity", const="spot", help="Spot capacity (pre-emptible)")
    capacity.add_argument("--reserved", action="store_const", dest="capacity", const="reserved", help="the project's reserved capacity")
    parser.set_defaults(capacity="on-demand")
    parser.add_argument("--keep", action="store_true", help="keep the queued resource at the end (default: delete it)")
    parser.add_argument("--max_restarts", type=int, default=3, help="re-create a pre-empted resource at most this often (default 3)")
    parser.add_argument("--poll_seconds", type=float, default=30.0, help="seconds between state checks while waiting (default 30)")
    parser.add_argument("--wait_timeout", type=float, default=0.0, help="stop waiting for ACTIVE after this many seconds (0: never)")
    parser.add_argument("--python", default="python3", help="Python on the workers that installs and runs flanjax (default python3)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the run (repeatable)")
    parser.add_argument("--mesh", help="check that this mesh fits the chips and train with it, e.g. data=1,fsdp=-1,dcn_data=2")
    parser.add_argument("--allow_dirty", action="store_true", help="ship HEAD although the checkout has uncommitted changes")


def launch(args: argparse.Namespace, train_args: list[str], runner: Runner) -> int:
    accelerator, zone, project, train_args, env = check_tpu_job(args, train_args, args.name, "--name")
    env = {"PYTHONUNBUFFERED": "1", **env}
    require_tool("gcloud", runner.dry_run)
    checkout = Checkout.find()
    checkout.require_clean(args.allow_dirty)
    qr = QueuedResource(args.name, zone, project, accelerator, args.slices, args.runtime_version, args.capacity)
    plan = Plan(qr, checkout, install_script(args.python), run_script(args.python, train_args, env), keep=args.keep,
                max_restarts=args.max_restarts, poll_seconds=args.poll_seconds, wait_timeout=args.wait_timeout)  # fmt: skip
    return execute(plan, runner)

