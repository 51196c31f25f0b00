"""What is installed where: the options of one install and the fixed, documented locations.

| | macOS | Linux |
|---|---|---|
| application (virtual environment) | /usr/local/macpacs | /usr/local/macpacs |
| config and install state | /usr/local/etc/macpacs | /etc/macpacs |
| data (default; --data-dir for a RAID volume) | /Users/Shared/macpacs | /var/lib/macpacs |
| logs | /Library/Logs/macpacs | /var/log/macpacs |
| services | ~USER/Library/LaunchAgents (agent), /Library/LaunchDaemons (daemon) | /etc/systemd/system |

docs/install-macos.md repeats this table for IT.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

SERVER_LABEL = "org.macpacs.server"
SUPERVISOR_LABEL = "org.macpacs.supervisor"
SERVER_UNIT = "macpacs.service"
SUPERVISOR_UNIT = "macpacs-supervisor.service"

PREFIX = Path("/usr/local/macpacs")
CONFIG_DIR = {"macos": Path("/usr/local/etc/macpacs"), "linux": Path("/etc/macpacs")}
DATA_DIR = {"macos": Path("/Users/Shared/macpacs"), "linux": Path("/var/lib/macpacs")}
LOG_DIR = {"macos": Path("/Library/Logs/macpacs"), "linux": Path("/var/log/macpacs")}
SYSTEMD_DIR = Path("/etc/systemd/system")
LAUNCH_DAEMONS = Path("/Library/LaunchDaemons")
KCPASSWORD = Path("/etc/kcpassword")
LOGINWINDOW = "/Library/Preferences/com.apple.loginwindow"
SOFTWARE_UPDATE = "/Library/Preferences/com.apple.SoftwareUpdate"


def detect_target() -> str:
    """The target this machine is: ``macos`` on Darwin, ``linux`` otherwise."""
    return "macos" if platform.system() == "Darwin" else "linux"


@dataclass
class Options:
    """Everything ``macpacs install`` was asked to do (the password is kept out of repr)."""

    user: str
    target: str = "macos"
    mode: str = "agent"
    data_dir: Path | None = None
    ae_title: str = "MACPACS"
    dicom_port: int = 11112
    web_port: int = 3333
    xmlrpc_port: int = 8080
    dry_run: bool = False
    yes: bool = False
    root: Path | None = None
    source: Path | None = None
    pip_options: tuple[str, ...] = ()
    wait_timeout: float = 120.0
    https: bool = False  # a self-signed certificate for the web and XML-RPC ports (installer/certificate.py)
    password: str | None = field(default=None, repr=False)

    @property
    def auto_login(self) -> bool:
        """Auto-login is needed for LaunchAgents on a Mac; daemons and Linux start at boot."""
        return self.target == "macos" and self.mode == "agent"


@dataclass(frozen=True)
class Layout:
    """Final paths of one installation (before any --root prefix)."""

    target: str
    data_dir: Path
    prefix: Path = PREFIX

    @classmethod
    def for_options(cls, options: Options) -> Layout:
        return cls(options.target, Path(options.data_dir or DATA_DIR[options.target]))

    @property
    def config_dir(self) -> Path:
        return CONFIG_DIR[self.target]

    @property
    def config_file(self) -> Path:
        return self.config_dir / "macpacs.toml"

    @property
    def state_file(self) -> Path:
        return self.config_dir / "install-state.json"

    @property
    def log_dir(self) -> Path:
        return LOG_DIR[self.target]

    @property
    def python(self) -> Path:
        return self.prefix / "bin" / "python"

    @property
    def macpacs(self) -> Path:
        return self.prefix / "bin" / "macpacs"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "macpacs.pid"

    @property
    def status_file(self) -> Path:
        return self.data_dir / "supervisor.json"
