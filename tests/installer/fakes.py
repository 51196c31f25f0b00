"""A scripted macOS (and Linux) behind the installer's run() seam.

It answers each command as the real tool does, per shared/reference/osirix-and-macos.md:
``pmset -g`` output, ``fdesetup status``, ``dscl`` (interactive ``-authonly`` on stdin),
``sysadminctl -autologin set`` (which may exit 0 and do nothing, as over SSH on Apple silicon),
``defaults``, and ``launchctl`` with its asynchronous ``bootout`` (``print`` keeps answering 0
for a while; a ``bootstrap`` meanwhile fails with 5). Files the real tools would write
(/etc/kcpassword, the venv) are written under the test's root folder.
"""

from __future__ import annotations

import plistlib
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from macpacs.installer import kcpassword
from macpacs.installer.host import Host
from macpacs.installer.layout import LOGINWINDOW, SOFTWARE_UPDATE, Options
from macpacs.installer.steps import HEALTH_BODY
from macpacs.installer.system import Result, System

USER, UID, GID, PASSWORD = "pacs", 501, 20, "s3cret pass\\word"
VERSION = "0.1.0"


def result(argv: Sequence[str], rc: int = 0, out: str = "", err: str = "") -> Result:
    return Result(tuple(argv), rc, out, err)


@dataclass
class FakeMac:
    root: Path
    version: str = "14.5"
    filevault: bool = False
    sysadminctl_works: bool = True
    logged_in: bool = True
    teardown_lag: int = 2  # `print` calls that still answer 0 after a bootout
    fail_bootstrap: int = 0  # the next N bootstraps fail with exit 1 (an interrupted install)
    pmset: dict[str, str] = field(
        default_factory=lambda: {"autorestart": "0", "sleep": "1", "disksleep": "10", "displaysleep": "10"}
    )
    defaults: dict[tuple[str, str], str] = field(default_factory=dict)
    loaded: dict[str, int] = field(default_factory=dict)  # "gui/501/label" -> remaining teardown prints (-1: up)
    installed: bool = False
    calls: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)
    cert_not_after: str = "Mar  1 12:00:00 2029 GMT"  # what `openssl x509 -enddate` reads from a made certificate

    def __call__(self, argv: Sequence[str], input: str | None, timeout: float) -> Result:
        self.calls.append((tuple(argv), input))
        name = Path(argv[0]).name
        handler = getattr(self, f"_{name.replace('-', '_').replace('.', '_')}", None)
        if name.startswith("python"):
            handler = self._python
        if handler is None:
            return result(argv, 127, err=f"{argv[0]}: command not found")
        return handler(list(argv), input)

    # -- system -----------------------------------------------------------------------------
    def _sw_vers(self, argv: list[str], _in: str | None) -> Result:
        return result(argv, 0, self.version + "\n")

    def _id(self, argv: list[str], _in: str | None) -> Result:
        if argv[-1] != USER:
            return result(argv, 1, err=f"id: {argv[-1]}: no such user\n")
        return result(argv, 0, f"{UID if argv[1] == '-u' else GID}\n")

    def _dscl(self, argv: list[str], stdin: str | None) -> Result:
        if argv[1:] == [".", "-read", f"/Users/{USER}", "NFSHomeDirectory"]:
            return result(argv, 0, f"NFSHomeDirectory: /Users/{USER}\n")
        if argv[1:] == ["/Search"] and stdin:
            words = shlex.split(stdin)  # backslash escapes, as dscl's interactive parser
            if words[:2] == ["-authonly", USER] and words[2:] == [PASSWORD]:
                return result(argv, 0, "")
            return result(
                argv,
                0,
                "Authentication for node /Search failed. (-14090, eDSAuthFailed)\nDS Error: -14090 (eDSAuthFailed)\n",
            )
        return result(argv, 56, err="Data source (x) is not valid.\n")

    def _fdesetup(self, argv: list[str], _in: str | None) -> Result:
        return result(argv, 0, "FileVault is On.\n" if self.filevault else "FileVault is Off.\n")

    def _pmset(self, argv: list[str], _in: str | None) -> Result:
        if argv[1:] == ["-g"]:
            lines = ["System-wide power settings:", "Currently in use:"]
            lines += [
                f" {k:<20} {v}" + (" (sleep prevented by powerd)" if k == "sleep" else "")
                for k, v in self.pmset.items()
            ]
            return result(argv, 0, "\n".join(lines) + "\n")
        if argv[1] == "-a":
            pairs = argv[2:]
            for key, value in zip(pairs[::2], pairs[1::2], strict=True):
                self.pmset[key] = value
            return result(argv, 0)
        return result(argv, 1, err="Usage: pmset ...")

    def _sysadminctl(self, argv: list[str], stdin: str | None) -> Result:
        assert argv[1:] == ["-autologin", "set", "-userName", USER, "-password", "-"], argv
        if not self.sysadminctl_works:
            return result(argv, 0, err="sysadminctl[812:2d1f] ### Error:-14090 File:... Failed to set autologin\n")
        password = (stdin or "").removesuffix("\n")
        kc = self.root / "etc" / "kcpassword"
        kc.parent.mkdir(parents=True, exist_ok=True)
        kc.write_bytes(kcpassword.encode(password))
        self.defaults[(LOGINWINDOW, "autoLoginUser")] = USER
        return result(argv, 0, err=f"sysadminctl[812:2d1f] Setting auto login for {USER}\n")

    def _defaults(self, argv: list[str], _in: str | None) -> Result:
        verb, domain, key = argv[1], argv[2], argv[3]
        if verb == "read":
            if (domain, key) not in self.defaults:
                return result(argv, 1, err=f"The domain/default pair of ({domain}, {key}) does not exist\n")
            return result(argv, 0, self.defaults[(domain, key)] + "\n")
        if verb == "write":
            assert argv[4] == "-string"
            self.defaults[(domain, key)] = argv[5]
            return result(argv, 0)
        if verb == "delete":
            return result(argv, 0 if self.defaults.pop((domain, key), None) is not None else 1)
        return result(argv, 1)

    # -- launchctl ----------------------------------------------------------------------------
    def _launchctl(self, argv: list[str], _in: str | None) -> Result:
        verb, target = argv[1], argv[2]
        if verb == "print":
            if target == f"gui/{UID}" or target == "system":
                return result(
                    argv,
                    0 if (self.logged_in or target == "system") else 113,
                    err="" if self.logged_in else "Bad request.\nCould not find domain for user gui\n",
                )
            state = self.loaded.get(target)
            if state is None:
                return result(argv, 113, err=f'Could not find service "{target}" in domain\n')
            if state > 0:
                self.loaded[target] = state - 1
                return result(argv, 0, f"{target} = {{ state = exiting }}\n")
            if state == 0:
                del self.loaded[target]
                return result(argv, 113)
            return result(argv, 0, f"{target} = {{ state = running }}\n")
        if verb == "enable":
            return result(argv, 0)
        if verb == "bootout":
            if self.loaded.get(target, 0) < 0:
                self.loaded[target] = self.teardown_lag
                return result(argv, 0)
            return result(argv, 3, err="Boot-out failed: 3: No such process\n")
        if verb == "bootstrap":
            label = plistlib.loads(Path(argv[3]).read_bytes())["Label"]
            key = f"{target}/{label}"
            if self.fail_bootstrap:
                self.fail_bootstrap -= 1
                return result(argv, 1, err="Bootstrap failed: 1: Operation not permitted\n")
            if key in self.loaded:
                return result(argv, 5, err="Bootstrap failed: 5: Input/output error\n")
            self.loaded[key] = -1
            return result(argv, 0)
        return result(argv, 1)

    # -- the venv ---------------------------------------------------------------------------------
    def _python(self, argv: list[str], _in: str | None) -> Result:
        if argv[1:3] == ["-m", "venv"]:
            bindir = Path(argv[3]) / "bin"
            bindir.mkdir(parents=True, exist_ok=True)
            (bindir / "python").write_text("#!fake\n")
            return result(argv, 0)
        if argv[1:4] == ["-m", "pip", "install"]:
            (Path(argv[0]).parent / "macpacs").write_text("#!fake\n")
            self.installed = True
            return result(argv, 0, "Successfully installed macpacs-0.1.0\n")
        if argv[1] == "-c" and "version('macpacs')" in argv[2]:
            return result(argv, 0, VERSION + "\n") if self.installed else result(argv, 1, err="PackageNotFound")
        return result(argv, 1)

    # -- openssl (LibreSSL on macOS): makes placeholder PEM files, reads back cert_not_after ------------------
    def _openssl(self, argv: list[str], _in: str | None) -> Result:
        if argv[1:3] == ["req", "-x509"]:
            assert "-config" in argv and Path(argv[argv.index("-config") + 1]).is_file(), argv
            Path(argv[argv.index("-keyout") + 1]).write_text("-----BEGIN PRIVATE KEY-----\nfake\n")
            Path(argv[argv.index("-out") + 1]).write_text("-----BEGIN CERTIFICATE-----\nfake\n")
            return result(argv, 0, err="..+++++\n")
        if argv[1:4] == ["x509", "-noout", "-enddate"]:
            if not Path(argv[-1]).is_file():
                return result(argv, 1, err=f"Could not open file or uri for loading certificate from {argv[-1]}\n")
            return result(argv, 0, f"notAfter={self.cert_not_after}\n")
        return result(argv, 1, err="openssl: unexpected command")

    def software_update(self, auto: str) -> None:
        self.defaults[(SOFTWARE_UPDATE, "AutomaticallyInstallMacOSUpdates")] = auto


class RecordingSystem(System):
    """Records (argv, stdin, changes) as the installer declares them."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.log: list[tuple[tuple[str, ...], str | None, bool]] = []

    def run(self, argv, input=None, *, changes=False, secret_input=False, timeout=120.0):  # type: ignore[no-untyped-def]
        self.log.append((tuple(argv), input, changes))
        return super().run(argv, input, changes=changes, secret_input=secret_input, timeout=timeout)

    def changes(self) -> list[tuple[str, ...]]:
        return [argv for argv, _in, changes in self.log if changes]


class FakeHost(Host):
    """Probes scripted too: ports, disk, write access, the server's health answer."""

    def __init__(self, system: System, fake: FakeMac, *, root: Path, is_root: bool = True) -> None:
        super().__init__(system, root=root, is_root=is_root)
        self.fake = fake
        self.taken_ports: set[int] = set()
        self.free_bytes = 500 * 10**9
        self.read_only = False
        self.xmlrpc_probes: list[tuple[str, str | None]] = []  # (url, ca_file) doctor asked

    def port_free(self, port: int) -> bool:
        return port not in self.taken_ports

    def disk_free(self, path: Path) -> int:
        return self.free_bytes

    def writable(self, path: Path) -> str | None:
        return f"{self.existing_ancestor(path)} is on a read-only volume" if self.read_only else None

    def http_get(self, url: str, timeout: float = 5.0) -> tuple[int, str] | None:
        up = any(key.endswith("org.macpacs.server") and v < 0 for key, v in self.fake.loaded.items())
        return (200, HEALTH_BODY) if up else None

    def xmlrpc_probe(self, url: str, timeout: float = 5.0, ca_file: str | None = None) -> str | None:
        self.xmlrpc_probes.append((url, ca_file))
        return None if self.http_get(url) else "Connection refused"

    def sleep(self, seconds: float) -> None:
        return None

    def primary_ip(self) -> str:
        return "10.0.0.5"

    def hostname(self) -> str:
        return "macpro"


def options(**overrides: object) -> Options:
    values: dict[str, object] = {"user": USER, "target": "macos", "password": PASSWORD, "yes": True}
    values.update(overrides)
    return Options(**values)  # type: ignore[arg-type]
