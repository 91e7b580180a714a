"""``spine-triage users`` and ``spine-triage tokens``: who may sign in to the HTTP service."""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys
from datetime import UTC, datetime
from typing import Any

from dicom_node.web.auth import ROLES, accounts
from worker.commands import COMMANDS, database_session

USERS_DESCRIPTION = """\
Users sign in to the worklist page (and may call the API with their browser session). Each
has one role, which includes those below it:

  reader     the worklist, study details, previews, results
  annotator  + submit ROIs (REST) and studies (STOW-RS)
  admin      + re-send failed deliveries and jobs, list users, make API tokens

Passwords are stored as Argon2id hashes; they are read from the terminal (twice), from
standard input with --password-stdin, or made up with --generate (printed once). Disabling
a user or changing a password ends the user's open sessions at once.

  spine-triage users add alice --role reader
  spine-triage users add admin --role admin --generate
  spine-triage users passwd alice
  spine-triage users disable bob
"""

TOKENS_DESCRIPTION = """\
An API token is a bearer credential for one client (the PACS that sends studies by STOW-RS,
a script that reads the worklist): `Authorization: Bearer <token>`. It carries exactly the
roles it is made with (reader, annotator, admin; a role does not include others here), is
shown once when made and stored only as its sha256, records when it was last used, and is
refused from the moment it is revoked. The site's SPINE_TRIAGE_API_TOKEN (embedded mode:
VAR_DIR/api-token) keeps working as a token with every role.

  spine-triage tokens create pacs-stow --role annotator
  spine-triage tokens create qa-script --role reader
  spine-triage tokens list
  spine-triage tokens revoke pacs-stow
"""


def register(subparsers: Any) -> None:
    users = subparsers.add_parser(
        "users",
        help=COMMANDS["users"].help,
        description=USERS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="add a user with a role")
    add.add_argument("username")
    add.add_argument("--role", choices=ROLES, required=True, help="reader, annotator or admin")
    _password_options(add)
    add.set_defaults(handler=_add)
    listing = sub.add_parser("list", help="users, their roles and open sessions")
    listing.set_defaults(handler=_list)
    for name, disabled, text in (
        ("disable", True, "refuse the user's sign-ins; ends their sessions at once"),
        ("enable", False, "allow a disabled user to sign in again"),
    ):
        action = sub.add_parser(name, help=text)
        action.add_argument("username")
        action.set_defaults(handler=_set_disabled, disabled=disabled)
    passwd = sub.add_parser("passwd", help="set a user's password; ends their sessions")
    passwd.add_argument("username")
    _password_options(passwd)
    passwd.set_defaults(handler=_passwd)
    role = sub.add_parser("role", help="change a user's role; ends their sessions")
    role.add_argument("username")
    role.add_argument("role", choices=ROLES)
    role.set_defaults(handler=_role)

    tokens = subparsers.add_parser(
        "tokens",
        help=COMMANDS["tokens"].help,
        description=TOKENS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tsub = tokens.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)
    create = tsub.add_parser("create", help="make a token; it is printed once")
    create.add_argument("name", help="who uses it, e.g. pacs-stow")
    create.add_argument(
        "--role",
        dest="roles",
        action="append",
        choices=ROLES,
        required=True,
        help="a role the token carries (repeat for several)",
    )
    create.set_defaults(handler=_create_token)
    tlist = tsub.add_parser("list", help="tokens (never their secrets), last use, revocation")
    tlist.set_defaults(handler=_list_tokens)
    revoke = tsub.add_parser("revoke", help="revoke a token by name or id, at once")
    revoke.add_argument("token", help="name or id")
    revoke.set_defaults(handler=_revoke_token)


def _password_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    group.add_argument(
        "--generate", action="store_true", help="make up a strong password and print it once"
    )


def _password(args: argparse.Namespace) -> str:
    if args.generate:
        password = secrets.token_urlsafe(18)
        print(f"password: {password}")
        return password
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise accounts.AccountError("the two passwords differ")
    return first


def _run(action: Any) -> int:
    try:
        action()
    except accounts.AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _add(args: argparse.Namespace) -> int:
    def action() -> None:
        password = _password(args)
        with database_session(write=True) as session:
            accounts.add_user(session, args.username, password, args.role, now=datetime.now(UTC))
        print(f"user {args.username} added ({args.role})")

    return _run(action)


def _passwd(args: argparse.Namespace) -> int:
    def action() -> None:
        password = _password(args)
        with database_session(write=True) as session:
            accounts.set_password(session, args.username, password, now=datetime.now(UTC))
        print(f"password of {args.username} changed; their sessions have ended")

    return _run(action)


def _set_disabled(args: argparse.Namespace) -> int:
    def action() -> None:
        with database_session(write=True) as session:
            accounts.set_disabled(session, args.username, args.disabled)
        print(f"user {args.username} {'disabled' if args.disabled else 'enabled'}")

    return _run(action)


def _role(args: argparse.Namespace) -> int:
    def action() -> None:
        with database_session(write=True) as session:
            accounts.set_role(session, args.username, args.role)
        print(f"user {args.username} is now {args.role}; their sessions have ended")

    return _run(action)


def _list(args: argparse.Namespace) -> int:
    with database_session() as session:
        users = accounts.list_users(session, now=datetime.now(UTC))
    if not users:
        print("no users yet: spine-triage users add NAME --role admin")
        return 0
    print(f"{'user':<24} {'role':<10} {'state':<9} {'sessions':>8}  password changed")
    for user in users:
        role = next(r for r in reversed(ROLES) if r in user.roles) if user.roles else "-"
        state = "disabled" if user.disabled else "active"
        changed = user.password_changed_at.strftime("%Y-%m-%d %H:%M")
        print(f"{user.username:<24} {role:<10} {state:<9} {user.sessions:>8}  {changed}")
    return 0


def _create_token(args: argparse.Namespace) -> int:
    def action() -> None:
        with database_session(write=True) as session:
            view, secret = accounts.create_token(
                session, args.name, args.roles, created_by="cli", now=datetime.now(UTC)
            )
        print(f"token {view.name} (id {view.id}, {', '.join(sorted(view.roles))}):")
        print(secret)
        print("it is shown this once; send it as `Authorization: Bearer <token>`", file=sys.stderr)

    return _run(action)


def _list_tokens(args: argparse.Namespace) -> int:
    with database_session() as session:
        tokens = accounts.list_tokens(session)
    if not tokens:
        print("no tokens: spine-triage tokens create NAME --role reader")
        return 0
    print(f"{'id':>4} {'name':<24} {'roles':<26} {'state':<8} last used")
    for token in tokens:
        state = "revoked" if token.revoked_at else "active"
        used = token.last_used_at.strftime("%Y-%m-%d %H:%M") if token.last_used_at else "never"
        roles = ",".join(role for role in ROLES if role in token.roles)
        print(f"{token.id:>4} {token.name:<24} {roles:<26} {state:<8} {used}")
    return 0


def _revoke_token(args: argparse.Namespace) -> int:
    def action() -> None:
        with database_session(write=True) as session:
            view = accounts.revoke_token(session, args.token, now=datetime.now(UTC))
        print(f"token {view.name} (id {view.id}) revoked")

    return _run(action)
