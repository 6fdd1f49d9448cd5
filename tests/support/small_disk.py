"""A real, small filesystem for disk-full faults: a tmpfs of a few MiB, mounted and unmounted here.

As root the tmpfs is mounted on the host, so any process (relayd run, a CLI command, the test
itself) sees it. A user who is not root gets the same inside an unprivileged user and mount
namespace (`unshare -rm`): a holder process keeps the namespace alive, and every command that
must see the small disk (relayd itself, the filler) runs in it through `nsenter`; `command()` adds
that prefix, and is the identity as root.

Filling is done the way a disk really fills: a file of zeros takes the free blocks (tmpfs
allocates on write, so a sparse file would take nothing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

FILLER = ".filler"


class SmallDisk:
    """`with SmallDisk(path, size=8 << 20) as disk:` a tmpfs of `size` bytes at `path`."""

    def __init__(self, path: Path, *, size: int) -> None:
        self.path = path
        self.size = size
        self._holder: subprocess.Popen[bytes] | None = None

    # -- life ----------------------------------------------------------------------------------

    def __enter__(self) -> SmallDisk:
        self.path.mkdir(parents=True, exist_ok=True)
        options = f"size={self.size},mode=0755"
        if os.geteuid() == 0:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", options, "relayd-test", str(self.path)], check=True
            )
        else:
            if shutil.which("unshare") is None or shutil.which("nsenter") is None:
                raise RuntimeError("a small disk needs root, or unshare and nsenter (util-linux)")
            script = f'mount -t tmpfs -o {options} relayd-test "$1" && echo ready && exec sleep 1d'
            self._holder = subprocess.Popen(
                ["unshare", "-rm", "sh", "-c", script, "sh", str(self.path)],
                stdout=subprocess.PIPE,
            )
            assert self._holder.stdout is not None
            if self._holder.stdout.readline().strip() != b"ready":
                raise RuntimeError("could not mount a tmpfs in a user namespace")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._holder is not None:
            self._holder.kill()
            self._holder.wait()
            return
        # A daemon killed a moment ago may still hold a file open: retry, then detach lazily.
        deadline = time.monotonic() + 5
        while subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                subprocess.run(["umount", "-l", str(self.path)], check=True)
                return
            time.sleep(0.05)

    # -- what tests do with it -----------------------------------------------------------------

    def command(self, argv: list[str]) -> list[str]:
        """`argv`, run where the small disk is mounted."""
        if self._holder is None:
            return argv
        return [
            "nsenter",
            f"--target={self._holder.pid}",
            "--user",
            "--mount",
            "--preserve-credentials",
            *argv,
        ]

    def free_bytes(self) -> int:
        output = self._run(["stat", "-f", "-c", "%a %S", str(self.path)])
        available, block = (int(part) for part in output.split())
        return available * block

    def fill(self, leave: int = 0) -> None:
        """Take the free space, leaving about `leave` bytes (whole blocks) free."""
        take = max(0, self.free_bytes() - leave)
        # head stops with "No space left" if it asks for more than there is: that is fine.
        self._run(
            [
                "sh",
                "-c",
                f'head -c {take} /dev/zero >> "$1" 2>/dev/null; true',
                "sh",
                str(self.path / FILLER),
            ]
        )

    def empty(self) -> None:
        """Give back what `fill` took."""
        self._run(["rm", "-f", str(self.path / FILLER)])

    def _run(self, argv: list[str]) -> str:
        done = subprocess.run(self.command(argv), capture_output=True, text=True, check=True)
        return done.stdout
