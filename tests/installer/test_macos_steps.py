"""Every macOS step against the scripted Mac: exact argv and order, idempotence, undo, bad input."""

from __future__ import annotations

import plistlib
import stat
import sys

import pytest

from macpacs.installer import kcpassword
from macpacs.installer.layout import LOGINWINDOW
from macpacs.installer.service import LOW_SPACE_MB, SUPERVISOR_ARGS
from macpacs.installer.steps import InstallError

from .fakes import GID, PASSWORD, UID, USER

BASE_PYTHON = str(getattr(sys, "_base_executable", None) or sys.executable)
AGENTS = f"Users/{USER}/Library/LaunchAgents"


def test_install_runs_exact_commands_in_order(mac):
    mac.install()
    root = mac.root
    changes = [list(a) for a in mac.changes()]
    pip = changes[3]
    assert changes == [
        ["pmset", "-a", "autorestart", "1", "sleep", "0", "disksleep", "0"],
        ["sysadminctl", "-autologin", "set", "-userName", USER, "-password", "-"],
        [BASE_PYTHON, "-m", "venv", f"{root}/usr/local/macpacs"],
        [
            f"{root}/usr/local/macpacs/bin/python",
            "-m",
            "pip",
            "install",
            "--upgrade",
            "--disable-pip-version-check",
            pip[-1],
        ],
        ["launchctl", "enable", f"gui/{UID}/org.macpacs.server"],
        ["launchctl", "bootstrap", f"gui/{UID}", f"{root}/{AGENTS}/org.macpacs.server.plist"],
        ["launchctl", "enable", f"gui/{UID}/org.macpacs.supervisor"],
        ["launchctl", "bootstrap", f"gui/{UID}", f"{root}/{AGENTS}/org.macpacs.supervisor.plist"],
        ["launchctl", "enable", f"gui/{UID}/org.macpacs.verify"],
        ["launchctl", "bootstrap", f"gui/{UID}", f"{root}/{AGENTS}/org.macpacs.verify.plist"],
    ]
    # The password reached sysadminctl on stdin only, and dscl checked it (on stdin) before any change.
    stdin = {argv[0]: data for argv, data, _c in mac.system.log if data}
    assert stdin["sysadminctl"] == PASSWORD + "\n"
    first_change = next(i for i, (_a, _d, c) in enumerate(mac.system.log) if c)
    dscl = next(i for i, (a, _d, _c) in enumerate(mac.system.log) if a == ("dscl", "/Search"))
    assert dscl < first_change
    mac.assert_password_hidden()
    assert mac.fake.pmset["autorestart"] == "1" and mac.fake.pmset["sleep"] == "0"
    assert (root / "etc/kcpassword").read_bytes() == kcpassword.encode(PASSWORD)
    text = mac.text()
    assert "AE title      MACPACS" in text and "Address 10.0.0.5 | AETitle MACPACS | Port 11112" in text
    assert "/testdbalive answers" in text


def test_second_run_is_already_done_and_changes_nothing(mac):
    mac.install()
    before = {p: (mac.root / p).read_bytes() for p in mac.files()}
    mac.install()
    assert mac.changes() == []
    assert mac.text().count("already done") == 7  # power .. launchd, and the wait
    assert {p: (mac.root / p).read_bytes() for p in mac.files()} == before


def test_sysadminctl_without_effect_falls_back_to_kcpassword(mac):
    mac.fake.sysadminctl_works = False  # exit 0, an error in the log, nothing written (SSH on Apple silicon)
    mac.install()
    kc = mac.root / "etc/kcpassword"
    assert kc.read_bytes() == kcpassword.encode(PASSWORD)
    st = kc.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    assert ("defaults", "write", LOGINWINDOW, "autoLoginUser", "-string", USER) in mac.changes()
    assert "sysadminctl did not take effect" in mac.text()
    mac.assert_password_hidden()


def test_reload_retries_bootstrap_while_bootout_tears_down(mac):
    mac.install()
    plist = mac.root / AGENTS / "org.macpacs.server.plist"
    plist.write_text(plist.read_text().replace("<integer>10</integer>", "<integer>11</integer>"))  # stale plist
    mac.fake.teardown_lag = 3
    mac.install()
    calls = [a for a, _d, _c in mac.system.log if a[0] == "launchctl"]
    target = f"gui/{UID}/org.macpacs.server"
    i = calls.index(("launchctl", "bootout", target))
    # bootout, then `print` polled until 113, then enable + bootstrap
    assert calls[i + 1 : i + 5] == [("launchctl", "print", target)] * 4
    assert calls[i + 5 : i + 7] == [
        ("launchctl", "enable", target),
        ("launchctl", "bootstrap", f"gui/{UID}", str(plist)),
    ]
    assert "<integer>10</integer>" in plist.read_text()


def test_daemon_mode(mac):
    mac.install(mode="daemon", password=None)
    changes = mac.changes()
    assert not any(a[0] in ("sysadminctl", "defaults") for a in changes)
    assert ("launchctl", "bootstrap", "system", f"{mac.root}/Library/LaunchDaemons/org.macpacs.server.plist") in changes
    for label in ("org.macpacs.server", "org.macpacs.supervisor", "org.macpacs.verify"):
        path = mac.root / "Library/LaunchDaemons" / f"{label}.plist"
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
        job = plistlib.loads(path.read_bytes())
        assert job["UserName"] == USER and "LimitLoadToSessionType" not in job
    assert not (mac.root / "etc/kcpassword").exists()
    assert "--mode daemon: LaunchDaemons start at boot without a login" in mac.text()


def test_plists_keys_and_types(mac):
    mac.install()
    server = plistlib.loads((mac.root / AGENTS / "org.macpacs.server.plist").read_bytes())
    supervisor = plistlib.loads((mac.root / AGENTS / "org.macpacs.supervisor.plist").read_bytes())
    types = {
        "Label": str,
        "ProgramArguments": list,
        "RunAtLoad": bool,
        "KeepAlive": bool,
        "ThrottleInterval": int,
        "ProcessType": str,
        "StandardOutPath": str,
        "StandardErrorPath": str,
        "SoftResourceLimits": dict,
        "WorkingDirectory": str,
        "EnvironmentVariables": dict,
        "ExitTimeOut": int,
    }
    for job in (server, supervisor):
        for key, kind in types.items():
            assert isinstance(job[key], kind), key
        assert job["KeepAlive"] is True and job["RunAtLoad"] is True  # true: SIGKILL is no crash for launchd
        assert job["ProcessType"] == "Interactive"
        assert isinstance(job["SoftResourceLimits"]["NumberOfFiles"], int)
        assert job["StandardErrorPath"].startswith("/Library/Logs/macpacs/")
        assert job["WorkingDirectory"] == "/Users/Shared/macpacs"
        assert job["EnvironmentVariables"]["MACPACS_CONFIG"] == "/usr/local/etc/macpacs/macpacs.toml"
        assert job["LimitLoadToSessionType"] == "Aqua"
        assert "UserName" not in job
    assert server["ProgramArguments"] == [
        "/usr/local/macpacs/bin/macpacs",
        "serve",
        "--config",
        "/usr/local/etc/macpacs/macpacs.toml",
    ]
    assert supervisor["ProgramArguments"] == [
        "/usr/local/macpacs/bin/macpacs",
        "supervise",
        "--web-url",
        "http://127.0.0.1:3333/testdbalive",
        "--heartbeat-url",
        "http://127.0.0.1:3333/heartbeat",
        "--xmlrpc-url",
        "http://127.0.0.1:8080/",
        "--dicom",
        "127.0.0.1:11112:MACPACS",
        "--pid-file",
        "/Users/Shared/macpacs/macpacs.pid",
        "--status-file",
        "/Users/Shared/macpacs/supervisor.json",
        "--mode",
        "kill",
        *SUPERVISOR_ARGS,
        "--low-space-mb",
        str(LOW_SPACE_MB),
    ]
    st = (mac.root / AGENTS / "org.macpacs.server.plist").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UID, GID, 0o644)


def test_supervisor_arguments_are_accepted_by_the_supervisor(mac):
    from click.testing import CliRunner

    from macpacs.supervisor.cli import supervise

    mac.install(ae_title="CT ROOM 1")
    args = plistlib.loads((mac.root / AGENTS / "org.macpacs.supervisor.plist").read_bytes())["ProgramArguments"]
    # --help after the real arguments: click parses and validates all of them, then prints help.
    res = CliRunner().invoke(supervise, [*args[2:], "--help"])
    assert res.exit_code == 0, res.output


def test_uninstall_undoes_in_reverse_and_keeps_data(mac):
    mac.install()
    (mac.root / "Users/Shared/macpacs/index.sqlite").write_text("data")
    mac.uninstall()
    changes = mac.changes()
    assert changes == [
        ("launchctl", "bootout", f"gui/{UID}/org.macpacs.verify"),
        ("launchctl", "bootout", f"gui/{UID}/org.macpacs.supervisor"),
        ("launchctl", "bootout", f"gui/{UID}/org.macpacs.server"),
        ("defaults", "delete", LOGINWINDOW, "autoLoginUser"),
        ("pmset", "-a", "autorestart", "0", "sleep", "1", "disksleep", "10"),
    ]
    assert mac.fake.pmset == {"autorestart": "0", "sleep": "1", "disksleep": "10", "displaysleep": "10"}
    assert mac.fake.loaded == {} or all(v >= 0 for v in mac.fake.loaded.values())
    assert mac.files() == ["Users/Shared/macpacs/index.sqlite"]
    assert (mac.root / "Library/Logs/macpacs").is_dir()


def test_uninstall_purge_data(mac):
    mac.install()
    mac.uninstall(purge=True)
    assert mac.files() == []
    assert not (mac.root / "Users/Shared/macpacs").exists()


def test_edited_config_is_kept_and_new_keys_shown(mac):
    config = mac.root / "usr/local/etc/macpacs/macpacs.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[dicom]\nae_title = "OLDPACS"\nport = 104\n')
    mac.install()
    assert config.read_text() == '[dicom]\nae_title = "OLDPACS"\nport = 104\n'
    text = mac.text()
    assert "+ [server] server_mode = True" in text
    assert "AE title      OLDPACS" in text and "DICOM port    104" in text  # the summary tells the truth
    mac.uninstall()
    assert config.exists()  # not ours to delete


def test_not_logged_in_writes_plists_and_says_when_they_load(mac):
    mac.fake.logged_in = False
    mac.install()
    assert not any(a[0] == "launchctl" for a in mac.changes())
    assert (mac.root / AGENTS / "org.macpacs.server.plist").exists()
    assert "is not logged in at the console" in mac.text()
    mac.install()
    assert mac.changes() == []


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda m: setattr(m, "is_root", False), "not running as root"),
        (lambda m: None, "no account named 'nobody'"),
        (lambda m: None, "wrong password for pacs"),
        (lambda m: setattr(m.fake, "filevault", True), "FileVault is on (FileVault is On.): automatic login"),
        (lambda m: m.taken_ports.add(3333), "port 3333 (web) is in use by another program"),
        (lambda m: setattr(m, "read_only", True), "is on a read-only volume"),
        (lambda m: setattr(m.fake, "version", "10.14.6"), "macOS 10.14.6 is too old"),
    ],
    ids=["not-root", "unknown-user", "wrong-password", "filevault", "port-taken", "read-only", "old-macos"],
)
def test_bad_input_stops_before_any_change(mac, setup, message):
    setup(mac)
    overrides: dict[str, object] = {}
    if "account" in message:
        overrides["user"] = "nobody"
    if "password" in message:
        overrides["password"] = "Not-The-Password"
    with pytest.raises(InstallError, match="Nothing was changed"):
        mac.install(**overrides)
    assert message in mac.text()
    assert "fix: " in mac.text()
    assert mac.changes() == []
    assert mac.files() == []


def test_interrupted_install_is_completed_by_a_rerun(mac):
    mac.fake.fail_bootstrap = 1
    with pytest.raises(InstallError, match="bootstrap"):
        mac.install()
    assert (mac.root / "usr/local/etc/macpacs/macpacs.toml").exists()
    mac.install()
    text = mac.text()
    assert "already done: autorestart 1" in text and "already done: macpacs 0.1.0" in text
    assert [a[1] for a in mac.changes()] == ["enable", "bootstrap"] * 3  # server, supervisor, verify
    mac.install()
    assert mac.changes() == []


def test_daemon_uninstall_boots_out_of_system_domain(mac):
    mac.install(mode="daemon", password=None)
    mac.uninstall(mode="daemon")
    assert mac.changes() == [
        ("launchctl", "bootout", "system/org.macpacs.verify"),
        ("launchctl", "bootout", "system/org.macpacs.supervisor"),
        ("launchctl", "bootout", "system/org.macpacs.server"),
        ("pmset", "-a", "autorestart", "0", "sleep", "1", "disksleep", "10"),
    ]
    assert "automatic login was not set by macpacs" in mac.text()
