"""`macpacs doctor` on the scripted Mac: PASS after an install, FAIL with the fix when something drifts."""

from __future__ import annotations

import datetime as dt
import json

from macpacs.installer import doctor

from .fakes import USER


def status(mac, state="healthy", age_s=5, restarts=0):
    when = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age_s)).isoformat()
    path = mac.root / "Users/Shared/macpacs/supervisor.json"
    path.write_text(json.dumps({"state": state, "last_check": when, "restarts_24h": restarts}))


def levels(found):
    return {f.what: f.level for f in found}


def test_healthy_install_passes(mac):
    mac.install()
    status(mac)
    finished = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    (mac.root / "Users/Shared/macpacs/verify-summary.json").write_text(
        json.dumps({"format": 1, "finished": finished, "instances": 7, "remaining": 0, "repaired": {"missing": 0}})
    )
    mac.fake.software_update("0")
    ctx = mac.context(mac_options())
    found = doctor.diagnose(ctx)
    assert [f.what for f in found if f.level != "PASS"] == []
    assert mac.system.changes() == []  # doctor never changes anything
    text = "\n".join(f.what for f in found)
    for item in (
        "power: autorestart 1",
        f"automatic login as {USER}",
        "FileVault",
        "org.macpacs.server loaded",
        "org.macpacs.supervisor loaded",
        "org.macpacs.verify loaded",
        "7 instances, no problems",
        "/testdbalive answers",
        "XML-RPC",
        "supervisor: healthy",
        "GB free",
        "Software Update",
    ):
        assert item in text, item


def test_drift_is_reported_with_fixes(mac):
    mac.install()
    status(mac, state="crash-loop", restarts=5)
    mac.fake.pmset["sleep"] = "10"
    mac.fake.filevault = True
    del mac.fake.loaded["gui/501/org.macpacs.supervisor"]
    found = doctor.diagnose(mac.context(mac_options()))
    bad = {f.what: f for f in found if f.level != "PASS"}
    assert bad["power: sleep is 10"].fix == "sudo pmset -a sleep 0"
    assert bad["FileVault: FileVault is On."].level == "FAIL"
    assert "launchctl bootstrap gui/501" in bad["org.macpacs.supervisor is not loaded in gui/501"].fix
    assert bad["supervisor: crash-loop (5 restarts in 24 h)"].level == "FAIL"
    assert any(w.startswith("Software Update may restart") for w in bad)  # reported, not changed


def test_stale_status_and_server_down(mac):
    mac.install()
    status(mac, age_s=3600)
    mac.fake.loaded.clear()
    found = levels(doctor.diagnose(mac.context(mac_options())))
    assert found["http://127.0.0.1:3333/testdbalive does not answer"] == "FAIL"
    assert any(k.startswith("the supervisor's last check was") and v == "FAIL" for k, v in found.items())


def mac_options():
    from .fakes import options

    return options(password=None)
