"""Operator accounts from the command line (the console has no sign-up page).

    flask --app miniapp_api create-operator NAME --role admin
    python -m miniapp_api.cli create NAME --role support
    python -m miniapp_api.cli set-role NAME viewer | disable NAME | enable NAME | list

The password is read from CONSOLE_OPERATOR_PASSWORD or asked for twice at a hidden prompt; never pass it as an
argument (it would land in shell history and in the process list).
"""
from __future__ import annotations

import getpass
import os

import click
from flask import current_app
from flask.cli import with_appcontext

from portraits import audit, operators
from portraits.config import Settings
from portraits.store import db as db_module

PASSWORD_ENV = "CONSOLE_OPERATOR_PASSWORD"


def _password() -> str:
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    return click.prompt("Password (密码)", hide_input=True, confirmation_prompt=True)


def _cli_actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _warn_if_ephemeral(settings) -> None:
    if not settings.mongo_uri:
        click.echo("warning: MONGO_URI is unset, so this writes to an in-process database that ends with this "
                   "command; set MONGO_URI to the deployment's MongoDB.", err=True)


def create(db, name: str, role: str, password: str) -> dict:
    actor = _cli_actor()
    try:
        operator = operators.create(db, name.strip().lower(), password, role, by=actor)
    except operators.AccountError as error:
        raise click.ClickException(f"{error.code}: {error.message}")
    audit.record(db, operator=actor, role=None, action="operator_created", ip="command line",
                 target={"operator": operator["_id"]}, details={"role": role})
    return operator


@click.command("create-operator")
@click.argument("name")
@click.option("--role", type=click.Choice(operators.ROLES), required=True)
@with_appcontext
def create_operator_command(name: str, role: str) -> None:
    """Create a console operator account (password from CONSOLE_OPERATOR_PASSWORD or a prompt)."""
    services = current_app.extensions["portraits"]
    _warn_if_ephemeral(services.settings)
    operator = create(services.db, name, role, _password())
    click.echo(f"created operator {operator['_id']} ({operator['role']})")


def _database():
    settings = Settings.from_env()
    _warn_if_ephemeral(settings)
    return db_module.connect(settings)


@click.group()
def cli() -> None:
    """Console operator accounts."""


@cli.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(operators.ROLES), required=True)
def create_cmd(name: str, role: str) -> None:
    operator = create(_database(), name, role, _password())
    click.echo(f"created operator {operator['_id']} ({operator['role']})")


def _change(name: str, action: str, **changes) -> None:
    db = _database()
    try:
        updated = operators.update(db, name, **changes)
    except operators.AccountError as error:
        raise click.ClickException(f"{error.code}: {error.message}")
    if updated is None:
        raise click.ClickException(f"operator_not_found: {name}")
    audit.record(db, operator=_cli_actor(), role=None, action=f"operator_{action}", ip="command line",
                 target={"operator": name}, details=changes)
    click.echo(f"{name}: {action} done")


@cli.command("set-role")
@click.argument("name")
@click.argument("role", type=click.Choice(operators.ROLES))
def set_role_cmd(name: str, role: str) -> None:
    _change(name, "role", role=role)


@cli.command("disable")
@click.argument("name")
def disable_cmd(name: str) -> None:
    _change(name, "disable", disabled=True)


@cli.command("enable")
@click.argument("name")
def enable_cmd(name: str) -> None:
    _change(name, "enable", disabled=False)


@cli.command("list")
def list_cmd() -> None:
    for operator in operators.all_operators(_database()):
        state = "disabled" if operator.get("disabled") else "active"
        click.echo(f"{operator['_id']}\t{operator['role']}\t{state}")


if __name__ == "__main__":
    cli()
