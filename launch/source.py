"""The code a remote run gets: the git checkout's HEAD commit, packed by `git archive`.

Shipping a commit (not the working tree) makes a run reproducible from the commit it names,
and keeps virtual environments, run directories and other local files off the workers. A
tree with uncommitted changes is refused, since those changes would silently not run;
`--allow_dirty` ships HEAD anyway, with a warning.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile

from launch.runner import LaunchError, require_tool, say


@dataclasses.dataclass(frozen=True)
class Checkout:
    root: str
    commit: str
    changes: tuple[str, ...]  # `git status --porcelain` lines: modified, staged, untracked files

    @classmethod
    def find(cls, where: str = ".") -> Checkout:
        """The git checkout around `where`. Reads only, so dry runs do it too."""
        require_tool("git")

        def git(*args: str) -> str:
            done = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True)
            if done.returncode:
                raise LaunchError(f"{os.path.abspath(where)} is not a git checkout with a commit ({done.stderr.strip()}): run "
                                  "`flanjax launch` from your flanjax checkout; the workers get its HEAD commit.")  # fmt: skip
            return done.stdout

        root = git("rev-parse", "--show-toplevel").strip()
        return cls(root, git("rev-parse", "HEAD").strip(), tuple(git("status", "--porcelain").splitlines()))

    def require_clean(self, allow_dirty: bool) -> None:
        if not self.changes:
            return
        listed = "; ".join(line.strip() for line in self.changes[:5]) + ("; ..." if len(self.changes) > 5 else "")
        if not allow_dirty:
            raise LaunchError(f"{self.root} has uncommitted changes ({listed}). The workers get the HEAD commit "
                              f"({self.commit[:12]}), without them: commit them (or stash them), or pass --allow_dirty "
                              "to ship HEAD as it is.")  # fmt: skip
        say(f"shipping HEAD {self.commit[:12]} WITHOUT the uncommitted changes ({listed}).")

    def tarball(self) -> str:
        """Where the commit's archive goes: named by the commit, so a relaunch reuses the name."""
        return os.path.join(tempfile.gettempdir(), f"flanjax-{self.commit[:12]}.tar.gz")

    def archive_command(self, out: str) -> list[str]:
        return ["git", "-C", self.root, "archive", "--format=tar.gz", f"--output={out}", self.commit]
