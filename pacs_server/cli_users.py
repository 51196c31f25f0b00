"""``macpacs users``: web users, their rights and API tokens, kept in the index.

Rights (``users.RIGHTS``) come from a role at ``add`` (``users.ROLES``) and can be changed one by
one with ``rights``. Removing a user, a new password and ``logout`` end the user's browser
sessions at once.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click

from .audit import local_actor
from .cli import command_archive, config_options

if TYPE_CHECKING:
    from .users import Users


def _users(config_path: str | None, data_dir: str | None) -> Users:
    return command_archive(config_path, data_dir).users


def _audit(config_path: str | None, data_dir: str | None, detail: str) -> None:
    """A user change in the audit trail (the command's archive's), by the account that ran the command."""
    command_archive(config_path, data_dir).audit.record("user-change", local_actor("cli"), detail=detail)


def _password(password_stdin: bool, prompt: str = "Password") -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt(prompt, hide_input=True, confirmation_prompt=True)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group()
def users() -> None:
    """Web users (for the pages, DICOMweb, WADO and XML-RPC), their rights and API tokens."""


def _rights_list(text: str | None) -> list[str]:
    return [] if not text else [item for item in text.replace(" ", ",").split(",") if item]


ROLE_HELP = "admin: everything; user: read, download, send; uploader: upload only; read: read and download."


@users.command("add")
@config_options
@click.argument("username")
@click.option("--role", type=click.Choice(["admin", "user", "uploader", "read"]), default="admin", show_default=True,
              help=ROLE_HELP)  # fmt: skip
@click.option("--rights", metavar="LIST", help="Exact rights instead of the role's, e.g. read,download.")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
def add(
    config_path: str | None, data_dir: str | None, username: str, role: str, rights: str | None, password_stdin: bool
) -> None:
    """Create a user (asks for the password twice unless --password-stdin)."""
    from .users import UserError

    manager = _users(config_path, data_dir)
    try:
        user = manager.add(username, _password(password_stdin), role, _rights_list(rights) if rights else None)
    except UserError as exc:
        raise _fail(exc) from None
    _audit(config_path, data_dir, f"added {username} ({role}: {', '.join(sorted(user.rights))})")
    click.echo(f"user {username} added ({role}: {', '.join(sorted(user.rights))})")


@users.command("list")
@config_options
def list_(config_path: str | None, data_dir: str | None) -> None:
    """List users: name, role, rights, created, open sessions, failed logins and lock."""
    now = time.time()
    for user, failures, sessions in _users(config_path, data_dir).list():
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(user.created_at))
        state = f"  {sessions} session(s)" if sessions else ""
        state += f"  {failures} failed login(s)" if failures else ""
        state += f"  locked for {int(user.locked_until - now) + 1} s" if user.locked_until > now else ""
        click.echo(f"{user.username}\t{user.role}\t{','.join(sorted(user.rights))}\t{created}{state}")


@users.command("rights")
@config_options
@click.argument("username")
@click.option("--role", type=click.Choice(["admin", "user", "uploader", "read"]), help="Start from this role's rights.")
@click.option("--grant", metavar="LIST", help="Rights to add, e.g. upload or download,send.")
@click.option("--revoke", metavar="LIST", help="Rights to take away.")
def rights(
    config_path: str | None,
    data_dir: str | None,
    username: str,
    role: str | None,
    grant: str | None,
    revoke: str | None,
) -> None:
    """Show or change what a user may do (read, download, send, upload, delete, admin)."""
    from .users import UserError

    manager = _users(config_path, data_dir)
    try:
        user = manager.set_rights(username, role, _rights_list(grant), _rights_list(revoke))
    except UserError as exc:
        raise _fail(exc) from None
    _audit(config_path, data_dir, f"rights of {user.username}: {user.role}, {','.join(sorted(user.rights)) or 'none'}")
    click.echo(f"{user.username}\t{user.role}\t{','.join(sorted(user.rights)) or '(no rights)'}")


@users.command("logout")
@config_options
@click.argument("username")
def logout(config_path: str | None, data_dir: str | None, username: str) -> None:
    """End every browser session of the user (it must log in again)."""
    from .users import UserError

    try:
        ended = _users(config_path, data_dir).end_sessions(username)
    except UserError as exc:
        raise _fail(exc) from None
    _audit(config_path, data_dir, f"logged {username} out ({ended} sessions ended)")
    click.echo(f"{ended} session(s) of {username} ended")


@users.command("remove")
@config_options
@click.argument("username")
def remove(config_path: str | None, data_dir: str | None, username: str) -> None:
    """Delete a user with its API tokens and sessions (logged-in browsers are logged out at once)."""
    from .users import UserError

    try:
        _users(config_path, data_dir).remove(username)
    except UserError as exc:
        raise _fail(exc) from None
    _audit(config_path, data_dir, f"removed {username}")
    click.echo(f"user {username} removed")


@users.command("passwd")
@config_options
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the new password from the first line of stdin.")
def passwd(config_path: str | None, data_dir: str | None, username: str, password_stdin: bool) -> None:
    """Set a new password (also lifts a lock left by wrong passwords, and ends the user's sessions)."""
    from .users import UserError

    manager = _users(config_path, data_dir)
    try:
        manager.set_password(username, _password(password_stdin, "New password"))
    except UserError as exc:
        raise _fail(exc) from None
    _audit(config_path, data_dir, f"password of {username} changed")
    click.echo(f"password of {username} changed")


@users.command("token")
@config_options
@click.argument("username")
@click.option("--name", default="", help="A label for the token (what uses it).")
@click.option("--list", "list_tokens", is_flag=True, help="List the user's tokens instead.")
@click.option("--revoke", type=int, metavar="ID", help="Revoke the token with this id.")
def token(
    config_path: str | None, data_dir: str | None, username: str, name: str, list_tokens: bool, revoke: int | None
) -> None:
    """Create an API token (Authorization: Bearer …); shown once, only its hash is kept."""
    from .users import UserError

    manager = _users(config_path, data_dir)
    try:
        if list_tokens:
            for pk, label, created in manager.tokens(username):
                click.echo(f"{pk}\t{label}\t{time.strftime('%Y-%m-%d %H:%M', time.localtime(created))}")
            return
        if revoke is not None:
            manager.revoke_token(username, revoke)
            _audit(config_path, data_dir, f"revoked API token {revoke} of {username}")
            click.echo(f"token {revoke} revoked")
            return
        created = manager.create_token(username, name)
        _audit(config_path, data_dir, f"created API token {name!r} for {username}")
        click.echo(created)
    except UserError as exc:
        raise _fail(exc) from None
