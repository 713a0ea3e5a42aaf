"""`flanjax launch`: the launchers' command sequences against fake gcloud / xpk / sbatch
executables (first on PATH) that log their argv and play back scripted resource states, the
scripts the workers run (executed here with a fake curl and python3), dry runs and bad input."""

import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile

import pytest

import launch
from flanjax.errors import FlanjaxError
from launch import slurm, tpu
from launch.checks import parse_accelerator
from launch.runner import LaunchError

# Each call: one JSON line [tool, *argv] in calls.jsonl. Answers come from script.json, one list
# per key ("describe": states, "run": exit statuses of the train ssh, "xpk"...); the last repeats.
FAKE_TOOL = r"""#!{python}
import json, os, sys

here = os.environ["FAKE_CLOUD"]
tool, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.path.join(here, "calls.jsonl"), "a") as f:
    f.write(json.dumps([tool, *args]) + "\n")
with open(os.path.join(here, "script.json")) as f:
    script = json.load(f)


def answer(key, default):
    counter = os.path.join(here, key + ".count")
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    with open(counter, "w") as f:
        f.write(str(n + 1))
    answers = script.get(key) or [default]
    return answers[min(n, len(answers) - 1)]


if tool == "gcloud" and args[3] == "describe":
    state = answer("describe", "ACTIVE")
    if state == "NOT_FOUND":
        sys.exit(print("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource not found", file=sys.stderr) or 1)
    print(state)
elif tool == "gcloud" and args[3] == "ssh" and any("flanjax.cli train" in a for a in args):
    print("step 1 loss 2.5")
    sys.exit(answer("run", 0))
elif tool == "sbatch":
    print("4242;cluster")
else:
    sys.exit(answer(tool, 0))
"""

TRAIN = ["--gin_file=configs/runs/sft.gin", "--gin.MODEL_DIR='gs://bucket/run'"]
# Arguments a careless quoting would break: spaces, quotes, $ and ; must reach flanjax as typed.
AWKWARD = ["--gin_file=configs/runs/sft.gin", "--gin.MODEL_DIR='gs://bucket/my run'", '--gin.NAME="a \'b\' $HOME; echo x"',
           "--module=my.tasks"]  # fmt: skip
TPU = ["tpu", "--name=my-run", "--zone=us-east5-a", "--project=my-proj", "--accelerator=v5p-32", "--poll_seconds=0"]


class FakeCloud:
    def __init__(self, root):
        self.root = root

    def script(self, **answers):
        with open(os.path.join(self.root, "script.json"), "w") as f:
            json.dump(answers, f)

    def calls(self):
        path = os.path.join(self.root, "calls.jsonl")
        return [json.loads(line) for line in open(path)] if os.path.exists(path) else []

    def verbs(self):
        """gcloud queued-resources verbs in order ("ssh" split by what it runs)."""
        verbs = []
        for call in self.calls():
            verb = call[4] if call[0] == "gcloud" else call[0]
            if verb == "ssh":
                verb = "run" if any("flanjax.cli train" in a for a in call) else "install"
            verbs.append(verb)
        return verbs


@pytest.fixture
def cloud(tmp_path, monkeypatch):
    """Fake gcloud, xpk and sbatch first on PATH, a git checkout as the working directory, and
    temporary files (the shipped tarball) under tmp_path."""
    bin_dir, state = tmp_path / "bin", tmp_path / "cloud"
    bin_dir.mkdir()
    state.mkdir()
    for tool in ("gcloud", "xpk", "sbatch"):
        path = bin_dir / tool
        path.write_text(FAKE_TOOL.replace("{python}", sys.executable))
        path.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_CLOUD", str(state))
    for variable in ("CLOUDSDK_COMPUTE_ZONE", "CLOUDSDK_CORE_PROJECT", "FLANJAX"):
        monkeypatch.delenv(variable, raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pyproject.toml").write_text("[project]\nname = 'flanjax'\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "first"]):
        subprocess.run([*git, *args], check=True)
    monkeypatch.chdir(repo)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    fake = FakeCloud(str(state))
    fake.script()
    return fake


def flag(call, name):
    """The value of `--name=value` in a logged call."""
    values = [a.split("=", 1)[1] for a in call if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, call)
    return values[0]


# --- tpu: the sequence --------------------------------------------------------------------------


def test_tpu_creates_waits_ships_installs_runs_and_reruns_after_preemption(cloud, capfd):
    cloud.script(describe=["PROVISIONING", "ACTIVE", "SUSPENDED", "ACTIVE"], run=[1, 0])
    assert launch.main([*TPU, "--slices=2", "--spot", "--", *TRAIN]) == 0
    one_try = ["create", "describe", "describe", "scp", "install", "run"]
    assert cloud.verbs() == [*one_try, "describe", "delete", "create", "describe", "scp", "install", "run", "delete"]
    calls = cloud.calls()
    create = calls[0]
    assert create[1:6] == ["compute", "tpus", "queued-resources", "create", "my-run"]
    assert flag(create, "accelerator-type") == "v5p-32" and flag(create, "runtime-version") == "v2-alpha-tpuv5"
    assert flag(create, "node-count") == "2" and flag(create, "node-prefix") == "my-run" and "--spot" in create
    assert flag(create, "zone") == "us-east5-a" and flag(create, "project") == "my-proj"
    assert flag(calls[1], "format") == "value(state.state)"
    scp = calls[3]
    tarball = scp[5]
    assert scp[6] == "my-run:flanjax.tar.gz" and flag(scp, "node") == "all" and flag(scp, "worker") == "all"
    with tarfile.open(tarball) as shipped:  # the commit, packed by git archive
        assert shipped.getnames() == ["pyproject.toml"]
    for call in (calls[4], calls[5]):
        assert (flag(call, "node"), flag(call, "worker"), flag(call, "batch-size")) == ("all", "all", "all")
    err = capfd.readouterr().err
    assert "PROVISIONING" in err and "SUSPENDED: pre-empted" in err and "restart 1 of 3" in err


def test_tpu_single_slice_on_demand_and_keep(cloud, capfd):
    assert launch.main([*TPU, "--accelerator=v6e-8", "--keep", "--", *TRAIN]) == 0
    assert cloud.verbs() == ["create", "describe", "scp", "install", "run"]  # no delete
    create = cloud.calls()[0]
    assert flag(create, "node-id") == "my-run" and flag(create, "runtime-version") == "v2-alpha-tpuv6e"
    assert not any(a in create for a in ("--spot", "--reserved")) and not any(a.startswith("--node-count") for a in create)
    assert "kept my-run (--keep)" in capfd.readouterr().err


def test_tpu_gives_up_after_max_restarts(cloud):
    cloud.script(describe=["FAILED"])  # never becomes ACTIVE: every try is lost
    with pytest.raises(LaunchError, match=r"lost 3 times \(last state FAILED.*gave up after --max_restarts=2") as raised:
        launch.main([*TPU, "--max_restarts=2", "--", *TRAIN])
    assert isinstance(raised.value, FlanjaxError)
    assert cloud.verbs() == ["create", "describe", "delete"] * 3  # the last delete: the clean-up


def test_tpu_vanished_resource_is_not_deleted(cloud):
    cloud.script(describe=["ACTIVE", "NOT_FOUND"], run=[1])
    with pytest.raises(LaunchError, match="last state NOT_FOUND"):
        launch.main([*TPU, "--max_restarts=0", "--", *TRAIN])
    assert cloud.verbs() == ["create", "describe", "scp", "install", "run", "describe"]


def test_tpu_failed_run_on_active_slices_is_not_restarted(cloud, capfd):
    cloud.script(run=[3])
    assert launch.main([*TPU, "--", *TRAIN]) == 3
    assert cloud.verbs() == ["create", "describe", "scp", "install", "run", "describe", "delete"]
    assert "not a pre-emption" in capfd.readouterr().err


def test_tpu_dry_run_prints_every_command_and_calls_nothing(cloud, capfd, tmp_path):
    assert launch.main([*TPU, "--slices=2", "--reserved", "--dry_run", "--", *AWKWARD]) == 0
    out = capfd.readouterr().out
    assert cloud.calls() == [] and os.listdir(tempfile.gettempdir()) == []  # no tarball either
    lines = [line for line in out.splitlines() if line.startswith(("git ", "gcloud "))]
    assert [line.split()[0] if line.startswith("git") else line.split()[4] for line in lines] == [
        "git", "create", "describe", "scp", "ssh", "ssh", "delete"]  # fmt: skip
    assert "--reserved" in lines[1] and "--node-count=2" in lines[1]
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0  # the output is a bash script
    script = tmp_path / "dry.sh"  # its ssh --command arguments are the scripts the workers would run
    script.write_text("gcloud() { printf '%s\\n' \"${@: -1}\"; }\n" + out.replace("git ", ": git ", 1))
    printed = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout
    assert tpu.run_script("python3", AWKWARD, {"PYTHONUNBUFFERED": "1"}) in printed


# --- tpu: what the workers run ------------------------------------------------------------------


def fake_worker(tmp_path, name, worker=0, tpu_env="", python_status=0):
    """PATH with a fake curl (the TPU metadata) and python3 (prints its argv as JSON), and HOME."""
    bin_dir, home = tmp_path / f"{name}-bin", tmp_path / f"{name}-home"
    bin_dir.mkdir()
    (home / "flanjax").mkdir(parents=True)
    metadata = f'case "$*" in *agent-worker-number*) echo {worker};; *tpu-env*) printf "%s\\n" "{tpu_env}";; esac'
    (bin_dir / "curl").write_text(f"#!/bin/sh\n{metadata}\n")
    (bin_dir / "python3").write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\nsys.exit({python_status})\n")
    for tool in ("curl", "python3"):
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(home)}, home


def test_worker_script_runs_train_with_the_arguments_exactly_and_logs(tmp_path):
    script = tpu.run_script("python3", AWKWARD, {"PYTHONUNBUFFERED": "1", "WANDB_MODE": "off line"})
    env, home = fake_worker(tmp_path, "first", worker=0, tpu_env="MEGASCALE_SLICE_ID: '0'", python_status=7)
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 7  # the train process's exit status, through the pipe
    assert json.loads(done.stdout) == ["-m", "flanjax.cli", "train", "--multiprocess", *AWKWARD]
    assert (home / "flanjax-train.log").read_text() == done.stdout
    assert "export WANDB_MODE='off line'" in script
    # Another slice's worker 0, and slice 0's worker 1, keep their logs and print nothing: one worker streams.
    for name, worker, tpu_env in (("slice1", 0, "MEGASCALE_SLICE_ID: '1'"), ("worker1", 1, "")):
        env, home = fake_worker(tmp_path, name, worker=worker, tpu_env=tpu_env)
        quiet = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
        assert (quiet.returncode, quiet.stdout) == (0, "") and "flanjax.cli" in (home / "flanjax-train.log").read_text()


def test_install_script_unpacks_the_commit_and_installs_with_tpu_extras(tmp_path, cloud):
    env, home = fake_worker(tmp_path, "installing")
    subprocess.run(["git", "archive", "--format=tar.gz", f"--output={home / 'flanjax.tar.gz'}", "HEAD"], check=True)
    done = subprocess.run(["sh", "-c", tpu.install_script("python3")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["-m", "pip", "install", "--quiet", "-e", ".[tpu]"]
    assert os.listdir(home / "flanjax") == ["pyproject.toml"]


# --- xpk ----------------------------------------------------------------------------------------


def test_xpk_creates_a_multislice_workload_from_the_commit(cloud, capfd):
    args = ["xpk", "--cluster=my-gke", "--workload=sft-1", "--zone=us-east5-a", "--project=my-proj", "--accelerator=v5e-16",
            "--slices=4", "--env=WANDB_MODE=offline"]  # fmt: skip
    assert launch.main([*args, "--", *AWKWARD]) == 0
    (call,) = cloud.calls()
    assert call[:3] == ["xpk", "workload", "create"]
    assert flag(call, "num-slices") == "4" and flag(call, "tpu-type") == "v5litepod-16"  # v5e's name in xpk
    assert (flag(call, "cluster"), flag(call, "workload"), flag(call, "env")) == ("my-gke", "sft-1", "WANDB_MODE=offline")
    assert flag(call, "base-docker-image") == "python:3.11"
    assert os.listdir(flag(call, "script-dir")) == ["pyproject.toml"]  # the commit, unpacked for the image
    install, train = flag(call, "command").split(" && ")
    assert shlex.split(install) == ["python3", "-m", "pip", "install", "--quiet", "-e", ".[tpu]"]
    assert shlex.split(train) == ["python3", "-m", "flanjax.cli", "train", "--multiprocess", *AWKWARD]
    assert "--wait-for-job-completion=sft-1" in capfd.readouterr().err


def test_xpk_with_a_ready_image_ships_nothing(cloud):
    args = ["xpk", "--cluster=c", "--workload=w", "--zone=z", "--project=p", "--accelerator=v5p-8", "--docker_image=gcr.io/p/flanjax:1"]
    assert launch.main([*args, "--", *TRAIN]) == 0
    (call,) = cloud.calls()
    assert flag(call, "docker-image") == "gcr.io/p/flanjax:1" and not any(a.startswith("--script-dir") for a in call)
    assert shlex.split(flag(call, "command")) == ["python3", "-m", "flanjax.cli", "train", "--multiprocess", *TRAIN]
    assert os.listdir(tempfile.gettempdir()) == []


def test_xpk_dry_run_calls_nothing(cloud, capfd):
    args = ["xpk", "--cluster=c", "--workload=w", "--zone=z", "--project=p", "--accelerator=v6e-16", "--slices=2", "--dry_run"]
    assert launch.main([*args, "--", *TRAIN]) == 0
    out = capfd.readouterr().out
    assert cloud.calls() == [] and os.listdir(tempfile.gettempdir()) == []
    assert "git -C" in out and "xpk workload create" in out and "--num-slices=2" in out


# --- slurm --------------------------------------------------------------------------------------


def test_slurm_writes_the_sbatch_script_and_submits_it(cloud, capfd):
    args = ["slurm", "--nodes=2", "--gpus_per_node=8", "--partition=a100", "--time=1:00:00", "--setup=module load cuda",
            "--env=NCCL_DEBUG=WARN", "--sbatch_option=--exclusive"]  # fmt: skip
    assert launch.main([*args, "--", "--gin_file=configs/runs/sft.gin", "--gin.MODEL_DIR='/shared/runs/x'"]) == 0
    (call,) = cloud.calls()
    assert call[:2] == ["sbatch", "--parsable"]
    script = open(call[2]).read()
    lines = script.splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=a100",
                 "#SBATCH --time=1:00:00", "#SBATCH --exclusive", f"#SBATCH --chdir={os.getcwd()}", "module load cuda",
                 "export NCCL_DEBUG=WARN"):  # fmt: skip
        assert line in lines
    assert "JAX_LOCAL_DEVICE_IDS" not in script  # one process per GPU: JAX picks each one's GPU
    srun = shlex.split(lines[-1])
    assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
    assert srun[3:] == ["-m", "flanjax.cli", "train", "--multiprocess", "--gin_file=configs/runs/sft.gin",
                        "--gin.MODEL_DIR='/shared/runs/x'"]  # fmt: skip
    assert subprocess.run(["bash", "-n", call[2]]).returncode == 0
    captured = capfd.readouterr()
    assert captured.out.strip() == "4242" and "squeue -j 4242" in captured.err
    assert "must be on a filesystem all 2 nodes share" in captured.err


def test_slurm_one_process_per_host_lists_its_gpus():
    script = slurm.sbatch_script(TRAIN, nodes=4, gpus_per_node=4, process_per="host", job_name="j", chdir="/c", python="py",
                                 output="/c/o", env={}, setup=[], sbatch_options=[])  # fmt: skip
    assert "#SBATCH --ntasks-per-node=1" in script.splitlines() and "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script.splitlines()


def test_slurm_dry_run_writes_and_calls_nothing(cloud, capfd):
    assert launch.main(["slurm", "--dry_run", "--", "--gin_file=x.gin", "--gin.MODEL_DIR=gs://b/r"]) == 0
    out = capfd.readouterr().out
    assert cloud.calls() == [] and not os.path.exists("flanjax.sbatch")
    assert f"cat > {os.getcwd()}/flanjax.sbatch <<'FILE'" in out and f"sbatch --parsable {os.getcwd()}/flanjax.sbatch" in out
    assert "#SBATCH --ntasks-per-node=8" in out


# --- local --------------------------------------------------------------------------------------


def test_local_starts_one_process_each_with_its_devices(tmp_path, monkeypatch, capfd):
    fake = tmp_path / "flanjax"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps([os.environ['XLA_FLAGS'], *sys.argv[1:]]))\n"
                    "import time\nif '--process_id=1' in sys.argv:\n    time.sleep(1)\n    sys.exit(5)\n")  # fmt: skip
    fake.chmod(0o755)
    monkeypatch.setenv("FLANJAX", str(fake))
    assert launch.main(["local", "--processes=3", "--devices_per_process=2", "--port=2222", "--", *AWKWARD]) == 5
    runs = sorted(json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("["))
    assert [run[4] for run in runs] == ["--process_id=0", "--process_id=1", "--process_id=2"]
    for run in runs:
        assert run[:4] == ["--xla_force_host_platform_device_count=2", "train", "--coordinator_address=127.0.0.1:2222",
                           "--num_processes=3"]  # fmt: skip
        assert run[5:] == AWKWARD


def test_local_dry_run_prints_the_processes(capfd, monkeypatch):
    monkeypatch.setenv("FLANJAX", "/opt/flanjax")
    assert launch.main(["local", "--processes=2", "--dry_run", "--", "--gin_file=a.gin"]) == 0
    assert capfd.readouterr().out.splitlines() == [
        f"XLA_FLAGS=--xla_force_host_platform_device_count=4 /opt/flanjax train --coordinator_address=127.0.0.1:12355 "
        f"--num_processes=2 --process_id={i} --gin_file=a.gin &" for i in range(2)] + ["wait"]  # fmt: skip


# --- bad input: refused before anything runs --------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    ([*TPU, "--accelerator=v5p-32", "--mesh=data=3", "--", *TRAIN], r"mesh data=3 x fsdp=1 x tensor=1 does not divide the 16"),
    ([*TPU, "--slices=2", "--mesh=data=1,fsdp=-1", "--", *TRAIN], r"dcn_data x dcn_fsdp = 1 slices but the job runs on 2: set dcn_data=2"),
    ([*TPU, "--mesh=data=2,pipeline=2", "--", *TRAIN], r"unknown axis 'pipeline'"),
    ([*TPU, "--accelerator=v9-8", "--", *TRAIN], r"unknown accelerator type\. Known families: v4-N, v5p-N, v5litepod-N, v5e-N, v6e-N"),
    ([*TPU, "--accelerator=v5p-7", "--", *TRAIN], r"N must be a positive multiple of 2"),
    ([*TPU, "--", "--gin_file=a.gin", "--gin.MODEL_DIR=runs/x"], r"'runs/x' is not on Cloud Storage.*gs://BUCKET/RUN"),
    ([*TPU, "--", "--gin_file=a.gin"], r"no --gin.MODEL_DIR"),
    ([*TPU, *TRAIN], r"put `--` between"),
    ([*TPU, "--"], r"nothing to train"),
    ([*TPU, "--", *TRAIN, "--process_id=3"], r"the launcher sets how the processes join"),
    ([*TPU, "--name=My_Run", "--", *TRAIN], r"--name 'My_Run': use lowercase letters"),
    (["tpu", "--name=r", "--project=p", "--accelerator=v5p-8", "--", *TRAIN], r"no --zone.*CLOUDSDK_COMPUTE_ZONE"),
    (["tpu", "--name=r", "--zone=z", "--accelerator=v5p-8", "--", *TRAIN], r"no --project.*gcloud config get-value project"),
    (["xpk", "--cluster=c", "--workload=w", "--zone=z", "--accelerator=v5p-8", "--", *TRAIN], r"no --project"),
    (["xpk", "--cluster=c", "--workload=w", "--zone=z", "--project=p", "--accelerator=v5p-8", "--", "--gin.MODEL_DIR=/data/r"],
     r"not on Cloud Storage"),
    (["slurm", "--", "--gin_file=a.gin", "--gin.MODEL_DIR=runs/x"], r"'runs/x' is relative"),
    (["slurm", "--nodes=2", "--gpus_per_node=8", "--mesh=tensor=3", "--", *TRAIN], r"does not divide the 16 available devices"),
    (["local", "--processes=2", "--mesh=data=2,dcn_data=3", "--", "--gin_file=a.gin"], r"each process counts as a slice"),
    (["tpu", *TPU[1:], "--env=1BAD=x", "--", *TRAIN], r"--env '1BAD=x': write KEY=VALUE"),
])  # fmt: skip
def test_bad_input_is_refused_before_anything_runs(cloud, argv, message):
    with pytest.raises(LaunchError, match=message):
        launch.main(argv)
    assert cloud.calls() == []


@pytest.mark.parametrize("argv, tool, hint", [
    ([*TPU, "--", *TRAIN], "gcloud", "https://cloud.google.com/sdk/docs/install"),
    (["xpk", "--cluster=c", "--workload=w", "--zone=z", "--project=p", "--accelerator=v5p-8", "--", *TRAIN], "xpk", "pip install xpk"),
    (["slurm", "--", "--gin_file=a.gin", "--gin.MODEL_DIR=/shared/r"], "sbatch", "login node"),
])  # fmt: skip
def test_missing_engine_says_how_to_install_it(cloud, monkeypatch, tmp_path, argv, tool, hint):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LaunchError, match=rf"`{tool}` is not on PATH: .*{hint}"):
        launch.main(argv)


def test_a_dry_run_without_the_engine_prints_the_commands_and_says_what_they_need(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert launch.main(["slurm", "--dry_run", "--script", str(tmp_path / "job.sbatch"), "--", "--gin_file=a.gin", "--gin.MODEL_DIR=/shared/r"]) == 0
    out = capfd.readouterr()
    assert "`sbatch` is not on PATH here; the commands below need it" in out.err + out.out and "sbatch" in out.out


def test_zone_and_project_from_gclouds_environment_variables(cloud, monkeypatch, capfd):
    monkeypatch.setenv("CLOUDSDK_COMPUTE_ZONE", "europe-west4-a")
    monkeypatch.setenv("CLOUDSDK_CORE_PROJECT", "env-proj")
    assert launch.main(["tpu", "--name=r", "--accelerator=v5p-8", "--dry_run", "--", *TRAIN]) == 0
    assert "--zone=europe-west4-a --project=env-proj" in capfd.readouterr().out


def test_uncommitted_changes_are_refused_unless_allowed(cloud, capfd):
    with open("pyproject.toml", "a") as f:
        f.write("# edited\n")
    with pytest.raises(LaunchError, match=r"uncommitted changes \(M pyproject.toml\).*--allow_dirty"):
        launch.main([*TPU, "--", *TRAIN])
    assert cloud.calls() == []
    assert launch.main([*TPU, "--allow_dirty", "--", *TRAIN]) == 0
    assert "WITHOUT the uncommitted changes" in capfd.readouterr().err
    with tarfile.open(cloud.calls()[2][5]) as shipped:  # HEAD, not the edit
        assert b"# edited" not in shipped.extractfile("pyproject.toml").read()


def test_outside_a_git_checkout_is_refused(cloud, monkeypatch, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(LaunchError, match=r"is not a git checkout.*run `flanjax launch` from your flanjax checkout"):
        launch.main([*TPU, "--", *TRAIN])
    assert cloud.calls() == []


def test_accelerator_chips():
    assert [parse_accelerator(t).chips for t in ("v4-8", "v5p-128", "v5litepod-16", "v5e-16", "v6e-256")] == [4, 64, 16, 16, 256]


# --- through the flanjax command line -------------------------------------------------------------


def test_flanjax_launch_hands_train_and_gin_arguments_through(cloud, capfd):
    from flanjax import cli

    argv = ["launch", *TPU, "--dry_run", "--", "--gin_file=configs/runs/sft.gin", "--gin.MODEL_DIR=gs://bucket/run", "--gin.STEPS=10"]
    assert cli.main(argv) == 0
    out = capfd.readouterr().out
    # main() turns --gin.K=V into gin bindings; they come back as equivalent train arguments
    run = next(line for line in out.splitlines() if line.startswith("{ "))
    train = shlex.split(run[2 : run.index(" 2>&1")])
    assert train == ["python3", "-m", "flanjax.cli", "train", "--multiprocess", "--gin_file=configs/runs/sft.gin",
                     "--gin.MODEL_DIR='gs://bucket/run'", "--gin.STEPS=10"]  # fmt: skip
    assert cli.main(["launch", *TPU, "--", "--gin_file=a.gin", "--gin.MODEL_DIR=runs/x"]) == 1
    err = capfd.readouterr().err
    assert "flanjax: error: --gin.MODEL_DIR 'runs/x' is not on Cloud Storage" in err and "Traceback" not in err
