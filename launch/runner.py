"""Running a launcher's commands, or printing them instead (`--dry_run`), and the launchers' error.

Every command a launcher runs goes through one `Runner`, so a dry run prints exactly the
commands a real run would run, in order, as lines of a bash script (files it would write as
`cat > FILE` here-documents), and runs none of them. Messages go to stderr.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time

from flanjax.errors import FlanjaxError


class LaunchError(FlanjaxError, ValueError):
    """Bad launcher input, or a launch step that failed: says what is wrong and what to do."""


INSTALL_HINTS = {
    "gcloud": "install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install), then run `gcloud auth login`",
    "xpk": "install it with `pip install xpk` (xpk itself calls gcloud, kubectl and docker)",
    "sbatch": "run `flanjax launch slurm` on the cluster's login node, where SLURM's sbatch is on PATH",
    "git": "install git: the launcher ships the checkout's HEAD commit to the workers",
}


def require_tool(name: str, dry_run: bool = False) -> None:
    """Refuses to start without the engine's command-line tool (a dry run, which calls none, says so and goes on)."""
    if shutil.which(name) is None:
        if not dry_run:
            raise LaunchError(f"`{name}` is not on PATH: {INSTALL_HINTS[name]}.")
        say(f"`{name}` is not on PATH here; the commands below need it: {INSTALL_HINTS[name]}.")


def shell_line(argv: list[str], env: dict[str, str] | None = None) -> str:
    """A command as a shell line (environment assignments first) that pastes back into bash. A
    multi-line argument (a script for the workers) is shown verbatim, as a here-document."""
    assignments = [f"{key}={shlex.quote(value)}" for key, value in (env or {}).items()]
    return " ".join([*assignments, *map(_shell_word, argv)])


def _shell_word(arg: str) -> str:
    if "\n" not in arg:
        return shlex.quote(arg)
    flag, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    return f"{flag}{sep}\"$(cat <<'SCRIPT'\n{value}\nSCRIPT\n)\""


def say(message: str) -> None:
    """Progress and warnings go to stderr; stdout holds the commands of a dry run."""
    print(f"flanjax launch: {message}", file=sys.stderr, flush=True)


class Runner:
    """Runs commands with their output streamed to this terminal; with `dry_run`, prints each
    command on stdout and runs none. Real runs echo each command to stderr first (`+ ...`)."""

    def __init__(self, dry_run: bool = False):
        self.dry_run = dry_run

    def _show(self, line: str) -> None:
        if self.dry_run:
            print(line, flush=True)
        else:
            print(f"+ {line}", file=sys.stderr, flush=True)

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Runs `argv` to the end; its exit status (0 in a dry run)."""
        self._show(shell_line(argv, env))
        if self.dry_run:
            return 0
        return subprocess.run(argv, env={**os.environ, **env} if env else None).returncode

    def capture(self, argv: list[str], dry_output: str = "", echo: bool = True) -> subprocess.CompletedProcess:
        """Runs `argv` and captures its output; a dry run answers `dry_output` (what the happy path
        would read, so the rest of the plan can be printed). `echo=False` for polling."""
        if echo or self.dry_run:
            self._show(shell_line(argv))
        if self.dry_run:
            return subprocess.CompletedProcess(argv, 0, dry_output, "")
        return subprocess.run(argv, capture_output=True, text=True)

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> list[subprocess.Popen]:
        """Starts `argv` without waiting for it (none in a dry run); see `wait_all`."""
        self._show(shell_line(argv, env) + " &")
        if self.dry_run:
            return []
        return [subprocess.Popen(argv, env={**os.environ, **env} if env else None)]

    def wait_all(self, processes: list[subprocess.Popen], poll_seconds: float = 0.2) -> int:
        """Waits for every started process; the first non-zero exit status, else 0. A failed
        process stops the others: they would wait for it (at the coordinator, in a collective) forever."""
        if self.dry_run:
            self._show("wait")
        pending, status = list(processes), 0
        while pending:
            for process in [p for p in pending if p.poll() is not None]:
                pending.remove(process)
                if process.returncode and not status:
                    status = process.returncode
                    for other in pending:
                        other.terminate()
            if pending:
                time.sleep(poll_seconds)
        return status

    def write(self, path: str, text: str) -> None:
        """Writes a file the commands read; a dry run prints the command that would write it."""
        if self.dry_run:
            print(f"cat > {shlex.quote(path)} <<'FILE'\n{text.rstrip(chr(10))}\nFILE", flush=True)
            return
        with open(path, "w") as f:
            f.write(text)

    def sleep(self, seconds: float) -> None:
        if not self.dry_run:
            time.sleep(seconds)

