"""The one seam through which the installer touches the operating system.

Every OS command of ``macpacs install``, ``uninstall`` and ``doctor`` goes through
:meth:`System.run` (ARCHITECTURE.md: "a run(argv) -> result seam"). That gives three things:

- tests replace the executor with a scripted macOS and check the exact argv, order and stdin;
- ``--dry-run`` prints every command instead of running the ones that change something;
- secrets are masked in one place: a password is only ever passed on stdin (``input``), and any
  registered secret that still shows up in argv, output or logs is replaced by ``********``.

File writes are not OS commands; they go through :class:`installer.host.Host`, which uses this
module's printer so that ``--dry-run`` shows commands and files in one ordered listing.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MASK = "********"


@dataclass(frozen=True)
class Result:
    """What a command did: exit status and its (text) output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""
    # True when the command was not run (dry run of a change, or previewing another OS).
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.skipped

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).strip()


# (argv, stdin text or None, timeout in s) -> Result
Executor = Callable[[Sequence[str], str | None, float], Result]


def subprocess_executor(argv: Sequence[str], input: str | None, timeout: float) -> Result:
    """Run a command for real.

    With stdin input the child starts in a new session, without a controlling terminal: tools that
    prompt for a password (``sysadminctl ... -password -``) then read it from stdin instead of
    opening /dev/tty and waiting for a person at the keyboard.
    """
    try:
        proc = subprocess.run(
            list(argv),
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=input is not None,
            check=False,
        )
    except FileNotFoundError:
        return Result(tuple(argv), 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Result(tuple(argv), 124, "", f"{argv[0]}: no answer after {timeout:g} s (killed)")
    return Result(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def preview_executor(host_os: str, target: str) -> Executor:
    """An executor that runs nothing: previewing a Mac from another machine with --dry-run."""

    def execute(argv: Sequence[str], _input: str | None, _timeout: float) -> Result:
        return Result(tuple(argv), 127, "", f"not run: previewing {target} on {host_os}", skipped=True)

    return execute


@dataclass
class System:
    """Runs commands through an executor; prints or logs them with secrets masked."""

    executor: Executor = subprocess_executor
    dry_run: bool = False
    out: Callable[[str], None] = print
    secrets: list[str] = field(default_factory=list)

    def add_secret(self, secret: str | None) -> None:
        if secret and secret not in self.secrets:
            self.secrets.append(secret)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def show(self, argv: Sequence[str], input: str | None, secret_input: bool) -> str:
        shown = self.mask(shlex.join(argv))
        if input is not None:
            shown += " < (password on stdin, not shown)" if secret_input else " < (stdin)"
        return shown

    def run(
        self,
        argv: Sequence[str],
        input: str | None = None,
        *,
        changes: bool = False,
        secret_input: bool = False,
        timeout: float = 120.0,
    ) -> Result:
        """Run ``argv``; ``changes`` marks commands that modify the host (not run in a dry run).

        ``secret_input`` says the stdin text is a secret: it is never printed or logged.
        """
        shown = self.show(argv, input, secret_input)
        if self.dry_run:
            self.out(f"    {'$' if changes else '?'} {shown}")
            if changes:
                return Result(tuple(argv), 0, skipped=True)
        elif changes:
            self.out(f"    $ {shown}")
        else:
            log.debug("check: %s", shown)
        result = self.executor(argv, input, timeout)
        # A tool that echoes what it read must not leak a secret through our messages.
        result = Result(
            result.argv, result.returncode, self.mask(result.stdout), self.mask(result.stderr), result.skipped
        )
        log.debug("-> %s %s", result.returncode, result.output[:500])
        return result
