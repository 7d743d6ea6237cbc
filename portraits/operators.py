"""Operator accounts: a name, a role and a salted scrypt hash. Shared by the command line and the admin pages."""
from __future__ import annotations

import re

from werkzeug.security import check_password_hash, generate_password_hash

from portraits import states

ROLES = ("viewer", "support", "admin")
ROLE_LABELS = {"viewer": "只读 Viewer", "support": "客服 Support", "admin": "管理员 Admin"}
MIN_PASSWORD_LENGTH = 12
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{1,31}$")
# Checked against when the name is unknown, so a wrong name costs as much time as a wrong password.
_DUMMY_HASH = generate_password_hash("not-a-real-password", method="scrypt")


class AccountError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def collection(db):
    return db.operators


def validate(name: str, password: str | None, role: str) -> None:
    if not NAME_PATTERN.match(name or ""):
        raise AccountError("invalid_operator_name", "名称需为 2–32 位小写字母、数字、._- ，以字母开头 (name: a-z0-9._-)")
    if role not in ROLES:
        raise AccountError("invalid_role", f"角色必须是 {', '.join(ROLES)} 之一 (unknown role)")
    if password is not None and len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError("password_too_short", f"密码至少 {MIN_PASSWORD_LENGTH} 位 (password too short)")


def create(db, name: str, password: str, role: str, by: str) -> dict:
    validate(name, password, role)
    if collection(db).find_one({"_id": name}) is not None:
        raise AccountError("operator_exists", "该账号已存在 (operator exists)")
    at = states.now()
    operator = {"_id": name, "role": role, "password_hash": generate_password_hash(password, method="scrypt"),
                "disabled": False, "session_generation": 0, "created_at": at, "created_by": by, "updated_at": at}
    collection(db).insert_one(operator)
    return operator


def update(db, name: str, *, role: str | None = None, disabled: bool | None = None,
           password: str | None = None) -> dict | None:
    """Any change ends the operator's open sessions (the session generation moves on)."""
    current = collection(db).find_one({"_id": name})
    if current is None:
        return None
    validate(name, password, role or current["role"])
    fields = {"updated_at": states.now()}
    if role is not None:
        fields["role"] = role
    if disabled is not None:
        fields["disabled"] = disabled
    if password is not None:
        fields["password_hash"] = generate_password_hash(password, method="scrypt")
    return collection(db).find_one_and_update({"_id": name}, {"$set": fields, "$inc": {"session_generation": 1}},
                                              return_document=True)


def authenticate(db, name: str, password: str) -> dict | None:
    operator = collection(db).find_one({"_id": name})
    if operator is None:
        check_password_hash(_DUMMY_HASH, password)
        return None
    if not check_password_hash(operator["password_hash"], password) or operator.get("disabled"):
        return None
    return operator


def all_operators(db) -> list[dict]:
    return list(collection(db).find({}, {"password_hash": 0}).sort("_id", 1))


def at_least(role: str, required: str) -> bool:
    return ROLES.index(role) >= ROLES.index(required)
