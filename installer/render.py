"""Renders the files of an installation from the Jinja2 templates in ``templates/``.

The values are computed in Python (the services in ``service.py``, the config's here); the
templates only lay them out, with the escaping of their format: XML for plists, TOML strings,
systemd quoting. Each ``Service`` goes through one launchd template and one systemd template, so
that the two managers cannot be given different values for the same thing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2

from macpacs import templates

from .layout import SERVER_LABEL, SERVER_UNIT, Layout
from .service import Restart, Service

TEMPLATE_DIR = Path(templates.__file__).resolve().parent


def toml_string(value: object) -> str:
    """A TOML basic string; JSON's escapes are a subset of TOML's."""
    return json.dumps(str(value), ensure_ascii=False)


def systemd_quote(word: str, *, dollar: bool = True) -> str:
    """One word of a systemd command line (or, ``dollar=False``, an assignment), quoted when needed.

    ExecStart= expands ``$VAR``, so a literal ``$`` is ``$$`` there; Environment= expands no
    variables, where ``$$`` would stay two dollars.
    """
    word = word.replace("%", "%%")
    if word and not any(c in word for c in " \t\"'\\;$"):
        return word
    quoted = word.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + (quoted.replace("$", "$$") if dollar else quoted) + '"'


def systemd_assignment(name: str, value: str) -> str:
    """One Environment= assignment, ``NAME=value``, quoted when needed."""
    return systemd_quote(f"{name}={value}", dollar=False)


def systemd_path(path: str | Path) -> str:
    """A path setting (WorkingDirectory=, append:): no quoting, but ``%`` starts a specifier."""
    return str(path).replace("%", "%%")


def systemd_argv(argv: Sequence[str]) -> str:
    """An ExecStart= command line."""
    return " ".join(systemd_quote(a) for a in argv)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
        autoescape=lambda name: bool(name and name.endswith(".plist.j2")),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["toml"] = toml_string
    env.filters["systemd_assignment"] = systemd_assignment
    env.filters["systemd_argv"] = systemd_argv
    env.filters["systemd_path"] = systemd_path
    return env


def render(name: str, **values: Any) -> str:
    return _environment().get_template(name).render(**values)


def config(
    layout: Layout,
    ae_title: str,
    dicom_port: int,
    web_port: int,
    xmlrpc_port: int,
    web_tls: tuple[str, str] = ("", ""),
    xmlrpc_tls: bool = False,
) -> str:
    """macpacs.toml; ``web_tls``: the certificate and key of the web port (HTTPS), or empty;
    ``xmlrpc_tls``: the XML-RPC port serves HTTPS with them too."""
    restart = (
        f"sudo launchctl kickstart -k gui/UID/{SERVER_LABEL}, or system/{SERVER_LABEL} for a daemon"
        if layout.target == "macos"
        else f"sudo systemctl restart {SERVER_UNIT}"
    )
    return render(
        "macpacs.toml.j2",
        ae_title=ae_title,
        dicom_port=dicom_port,
        web_port=web_port,
        xmlrpc_port=xmlrpc_port,
        web_cert=web_tls[0],
        web_key=web_tls[1],
        xmlrpc_tls=xmlrpc_tls,
        data_dir=str(layout.data_dir),
        log_dir=str(layout.log_dir),
        status_file=str(layout.status_file),
        restart_hint=restart,
    )


# How each manager spells a restart policy (service.Restart says why).
LAUNCHD_KEEP_ALIVE = {Restart.ALWAYS: True}
SYSTEMD_RESTART = {Restart.ALWAYS: "always"}


def launchd_plist(service: Service, *, agent: bool) -> str:
    """The service as a launchd job: a LaunchAgent (``agent``) or a LaunchDaemon."""
    return render("launchd/job.plist.j2", service=service, agent=agent, keep_alive=LAUNCHD_KEEP_ALIVE[service.restart])


def systemd_unit(service: Service) -> str:
    """The service as a systemd system unit."""
    return render("systemd/unit.service.j2", service=service, restart=SYSTEMD_RESTART[service.restart])
