"""Checking the app against its published OpenAPI document: strict schema validators, and a recorder of every
/api/v1 exchange of the test session.

Loaded as a pytest plugin by tests/test_contract.py (`pytest_plugins`), so it records the requests of every test
module of the session, not only that one; the test that reads the record (`runs_last`) runs after all others.
Nothing here needs pytest's assertion rewriting: PYTEST_DONT_REWRITE.
"""
from __future__ import annotations

import ast
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from flask import request, request_finished
from openapi_schema_validator import OAS31Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from werkzeug.exceptions import MethodNotAllowed

from miniapp_api.api.openapi import document

SPEC_URI = "urn:openapi"


def spec_path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule)


def strict(schema):
    """The published schema, with no undocumented field allowed anywhere (an object published as open, with
    additionalProperties true, such as WeChat's message push, stays open)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    tightened = {key: strict(value) for key, value in schema.items()}
    if tightened.get("type") == "object" and "properties" in tightened and "additionalProperties" not in schema:
        tightened["additionalProperties"] = False
    return tightened


def pointer(*parts: str) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


class Published:
    """JSON Schema validators for places in the document, its $refs resolved (optionally made strict)."""

    def __init__(self, spec: dict, tighten: bool = True):
        self.spec = strict(spec) if tighten else spec
        resource = Resource.from_contents(self.spec, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(SPEC_URI, resource)
        self._validators: dict[str, OAS31Validator] = {}

    def resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            schema = self.at(schema["$ref"].removeprefix("#"))
        return schema

    def at(self, where: str):
        node = self.spec
        for part in where.split("/")[1:]:
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def validate(self, where: str, instance) -> None:
        validator = self._validators.get(where)
        if validator is None:
            validator = self._validators[where] = OAS31Validator({"$ref": f"{SPEC_URI}#{where}"},
                                                                 registry=self.registry)
        validator.validate(instance)

    def response_schema(self, path: str, method: str, status: int | str) -> str:
        return pointer("paths", path, method, "responses", str(status), "content", "application/json", "schema")


# ---------------------------------------------------------------------------- statuses the code can raise

class RaiseSites:
    """A static walk of the API and domain code: the statuses a function can refuse with, through the functions of
    ours it calls (by name, or as module.function). Refusals are DomainError kinds (status: DOMAIN_STATUS) and
    ApiError(...) / _fail(...) with a literal status. Methods (services().payments...) are not followed, so this
    finds a lower bound, never a status that cannot happen."""

    def __init__(self, root: Path, kinds: dict[str, int]):
        self.kinds = kinds
        self.modules = {}
        for path in [*sorted((root / "portraits").rglob("*.py")), *sorted((root / "miniapp_api" / "api").glob("*.py"))]:
            parts = list(path.relative_to(root).with_suffix("").parts)
            self.modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = ast.parse(path.read_text("utf-8"))
        self._memo: dict[tuple[str, str], set[int]] = {}
        self._functions = {module: {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef,
                                                                                     ast.AsyncFunctionDef))}
                           for module, tree in self.modules.items()}
        self._assigned = {module: {target.id: node for node in tree.body if isinstance(node, ast.Assign)
                                   for target in node.targets if isinstance(target, ast.Name)}
                          for module, tree in self.modules.items()}
        self._imported = {module: self._imports(tree) for module, tree in self.modules.items()}

    def functions(self, module: str) -> dict[str, ast.FunctionDef]:
        return self._functions[module]

    def statuses(self, module: str, name: str, _stack: tuple = ()) -> set[int]:
        key = (module, name)
        if key in self._memo or key in _stack:
            return self._memo.get(key, set())
        function = self.functions(module)[name]
        # Route decorators (bp.post(...), endpoint(...)) are calls; a plain one (login_required) is followed.
        nodes = [*function.body, *(d for d in function.decorator_list if not isinstance(d, ast.Call))]
        found = set()
        for node in (n for top in nodes for n in ast.walk(top)):
            found |= self._refusal(node)
            if isinstance(node, ast.Name) and node.id in self._globals(module):
                found |= {s for n in ast.walk(self._globals(module)[node.id]) for s in self._refusal(n)}
            target = self._resolve(module, node)
            if target is not None:
                found |= self.statuses(*target, _stack + (key,))
        self._memo[key] = found
        return found

    def _refusal(self, node) -> set[int]:
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if name in self.kinds:
            return {self.kinds[name]}
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                "ApiError", "_fail") and node.args and isinstance(node.args[0], ast.Constant):
            return {node.args[0].value}
        return set()

    def _globals(self, module: str) -> dict[str, ast.AST]:
        return self._assigned[module]

    def _imports(self, tree: ast.Module) -> dict[str, str]:
        """alias -> "module" or "module:name", for what the module imports."""
        found = {}
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found[alias.asname or alias.name] = full if full in self.modules else f"{node.module}:{alias.name}"
        return found

    def _resolve(self, module: str, node) -> tuple[str, str] | None:
        imports = self._imported[module]
        if isinstance(node, ast.Name):
            if node.id in self.functions(module) and not isinstance(node.ctx, ast.Store):
                return module, node.id
            where, _, name = imports.get(node.id, "").partition(":")
            if name and where in self.modules and name in self.functions(where):
                return where, name
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            where = imports.get(node.value.id, "")
            if where in self.modules and node.attr in self.functions(where):
                return where, node.attr
        return None


# ------------------------------------------------------------------------------------------- the recorder

@dataclass
class Exchange:
    method: str
    path: str  # as in the spec: /api/v1/avatars/{avatar_id}
    status: int
    problems: list[str] = field(default_factory=list)


class Recorder:
    """Every /api/v1 exchange of our apps in this process: its route, status, and where it disagrees with the spec."""

    def __init__(self):
        self.lock = threading.Lock()
        self.exchanges: list[Exchange] = []
        self._published: tuple[int, Published, Published] | None = None

    def published(self, spec: dict) -> tuple[Published, Published]:
        """The document made strict (for our answers) and as published (for what a client may send)."""
        if self._published is None or self._published[0] != id(spec):
            self._published = (id(spec), Published(spec), Published(spec, tighten=False))
        return self._published[1], self._published[2]

    def __call__(self, app, response, **_):
        if "portraits" not in app.extensions or request.method in ("HEAD", "OPTIONS"):
            return
        rule = request.url_rule
        if rule is None and isinstance(request.routing_exception, MethodNotAllowed):
            adapter = app.url_map.bind_to_environ(request.environ)
            rule, _ = adapter.match(method=sorted(request.routing_exception.valid_methods)[0], return_rule=True)
        if rule is None or not rule.rule.startswith("/api/v1"):
            return
        exchange = Exchange(request.method.lower(), spec_path(rule.rule), response.status_code)
        try:
            exchange.problems = check(*self.published(document()), exchange, response)
        except Exception as error:  # a recorder must never break the request it watches
            exchange.problems = [f"could not check: {error!r}"]
        with self.lock:
            self.exchanges.append(exchange)


def check(published: Published, as_published: Published, exchange: Exchange, response) -> list[str]:
    """Where one exchange disagrees with the document: an undocumented status, a body or header not as published
    (`published`, made strict: no undocumented field), or (when it was accepted) a request the document does not
    allow (`as_published`: request bodies may carry fields the API ignores, as the fuzz test's do)."""
    operations = published.spec["paths"].get(exchange.path, {})
    if exchange.status == 405:
        problems = [f"{m} has no 405" for m, op in operations.items() if "405" not in op["responses"]]
        allowed = {m.strip().lower() for m in response.headers.get("Allow", "").split(",")} - {"head", "options"}
        if allowed != set(operations):
            problems.append(f"Allow {response.headers.get('Allow')!r} is not {sorted(operations)}")
        return problems
    operation = operations.get(exchange.method)
    if operation is None:
        return ["undocumented operation"]
    documented = operation["responses"].get(str(exchange.status))
    if documented is None:
        return [f"undocumented status {exchange.status}"]
    problems = []
    content = documented.get("content", {})
    if not content:
        if response.direct_passthrough is False and response.get_data():
            problems.append("a body where none is documented")
    elif response.mimetype not in content:
        problems.append(f"{response.mimetype} is not one of {sorted(content)}")
    elif response.mimetype == "application/json":
        problems += _invalid(published, published.response_schema(exchange.path, exchange.method, exchange.status),
                             response.get_json(), "response")
    if 200 <= exchange.status < 300:
        problems += _request_problems(as_published, exchange, operation)
    return problems


def _request_problems(published: Published, exchange: Exchange, operation: dict) -> list[str]:
    problems = []
    for index, parameter in enumerate(operation.get("parameters", [])):
        if parameter["in"] != "query" or parameter["name"] not in request.args:
            continue
        value = request.args[parameter["name"]]
        if value == "" and parameter.get("allowEmptyValue"):
            continue
        problems += _invalid(published, pointer("paths", exchange.path, exchange.method, "parameters", str(index),
                                                "schema"), value, f"query {parameter['name']}")
    body = operation.get("requestBody", {}).get("content", {})
    # A body sent as another documented media type (WeChat's XML message pushes) is not held to the JSON schema.
    other_media = request.mimetype in body and request.mimetype != "application/json"
    if "application/json" in body and not other_media:
        problems += _invalid(published, pointer("paths", exchange.path, exchange.method, "requestBody", "content",
                                                "application/json", "schema"), request.get_json(silent=True),
                             "request")
    if "multipart/form-data" in body:
        form = {**request.form.to_dict(), **{name: "<file>" for name in request.files}}
        problems += _invalid(published, pointer("paths", exchange.path, exchange.method, "requestBody", "content",
                                                "multipart/form-data", "schema"), form, "form")
    return problems


def _invalid(published: Published, where: str, instance, what: str) -> list[str]:
    try:
        published.validate(where, instance)
    except Exception as error:
        return [f"{what} does not match {where}: {getattr(error, 'message', error)}"]
    return []


RECORDER = Recorder()
request_finished.connect(RECORDER, weak=False)


# ------------------------------------------------------------------------------------------- pytest plugin

def runs_last(test):
    """Run this test after every other test of the session."""
    test.runs_last = True
    return test


def pytest_collection_modifyitems(session, config, items):
    last = [item for item in items if getattr(getattr(item, "obj", None), "runs_last", False)]
    items[:] = [item for item in items if item not in last] + last
