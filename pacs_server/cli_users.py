"""``macpacs users``: web users (admins) and their API tokens, kept in the index."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click

from .cli import command_archive, config_options

if TYPE_CHECKING:
    from .users import Users


def _users(config_path: str | None, data_dir: str | None) -> Users:
    return command_archive(config_path, data_dir).users


def _password(password_stdin: bool, prompt: str = "Password") -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt(prompt, hide_input=True, confirmation_prompt=True)


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.group()
def users() -> None:
    """Web users (for the pages, DICOMweb and WADO) and API tokens."""


@users.command("add")
@config_options
@click.argument("username")
@click.option("--role", type=click.Choice(["admin", "read"]), default="admin", show_default=True)
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of stdin.")
def add(config_path: str | None, data_dir: str | None, username: str, role: str, password_stdin: bool) -> None:
    """Create a user (asks for the password twice unless --password-stdin)."""
    from .users import UserError

    manager = _users(config_path, data_dir)
    try:
        manager.add(username, _password(password_stdin), role)
    except UserError as exc:
        raise _fail(exc) from None
    click.echo(f"user {username} added ({role})")


@users.command("list")
@config_options
def list_(config_path: str | None, data_dir: str | None) -> None:
    """List users (name, role, created, lock state)."""
    now = time.time()
    for user in _users(config_path, data_dir).list():
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(user.created_at))
        lock = f"  locked for {int(user.locked_until - now) + 1} s" if user.locked_until > now else ""
        click.echo(f"{user.username}\t{user.role}\t{created}{lock}")


@users.command("remove")
@config_options
@click.argument("username")
def remove(config_path: str | None, data_dir: str | None, username: str) -> None:
    """Delete a user and its API tokens."""
    from .users import UserError

    try:
        _users(config_path, data_dir).remove(username)
    except UserError as exc:
        raise _fail(exc) from None
    click.echo(f"user {username} removed")


@users.command("passwd")
@config_options
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the new password from the first line of stdin.")
def passwd(config_path: str | None, data_dir: str | None, username: str, password_stdin: bool) -> None:
    """Set a new password (also lifts a lock left by wrong passwords)."""
    from .users import UserError

    manager = _users(config_path, data_dir)
    try:
        manager.set_password(username, _password(password_stdin, "New password"))
    except UserError as exc:
        raise _fail(exc) from None
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
            click.echo(f"token {revoke} revoked")
            return
        click.echo(manager.create_token(username, name))
    except UserError as exc:
        raise _fail(exc) from None
