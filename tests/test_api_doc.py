"""The README's client-contract table lists every operation of the OpenAPI document, each either served as the
client page `../shared/API.md` lists it or with the reason it was added; where that page can be read, its table and
the rows that say `API.md` name the same operations."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API_DOC = Path(os.environ.get("CLIENT_CONTRACT_DOC", ROOT.parent / "shared" / "API.md"))
ROW = re.compile(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/[^`]*)` \| ([^|]+?) \|\s*(.*?)\s*\|$")
API_DOC_ROW = re.compile(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/[^` ?]*)[^`]*` \|")


def readme_rows() -> dict[str, tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- routes:", 1)[1].split("<!-- end of routes -->", 1)[0]
    rows = {}
    for line in block.splitlines():
        match = ROW.match(line)
        if match:
            method, path, where, why = match.groups()
            rows[f"{method} {path}"] = (where.strip(), why.strip())
    return rows


def normalised(path: str) -> str:
    """API.md names path parameters {id}; the spec names them after what they identify."""
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_every_operation_has_its_row_and_every_row_its_operation(client):
    spec = client.get("/api/v1/openapi.json").get_json()
    operations = {f"{method.upper()} {path}" for path, ops in spec["paths"].items() for method in ops}
    rows = readme_rows()
    assert set(rows) == operations
    for operation, (where, why) in rows.items():
        assert where in ("API.md", "added"), operation
        assert (where == "added") == bool(why), f"{operation}: an added operation says why, an API.md one does not"


@pytest.mark.skipif(not API_DOC.is_file(), reason=f"the client page is not here ({API_DOC})")
def test_the_rows_that_say_api_md_are_the_routes_api_md_lists():
    listed = {f"{m} {normalised(p)}" for m, p in
              (API_DOC_ROW.match(line).groups() for line in API_DOC.read_text().splitlines() if API_DOC_ROW.match(line))}
    said = {f"{operation.split()[0]} {normalised(operation.split()[1])}"
            for operation, (where, _) in readme_rows().items() if where == "API.md"}
    assert listed and said == listed
