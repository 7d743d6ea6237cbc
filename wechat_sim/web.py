"""Request parsing and the response shapes WeChat's APIs answer with, shared by the simulator's blueprints."""
from __future__ import annotations

import json
import secrets

from flask import Response, request


def json_response(payload, status: int = 200) -> Response:
    return Response(json.dumps(payload, ensure_ascii=False), status=status,
                    content_type="application/json; charset=utf-8")


def mp_error(errcode: int, errmsg: str) -> Response:
    # Mini-program APIs report errors in the body with HTTP 200.
    return json_response({"errcode": errcode, "errmsg": f"{errmsg} rid: {secrets.token_hex(6)}"})


def v3_error(status: int, code: str, message: str) -> Response:
    return json_response({"code": code, "message": message}, status)


def request_json() -> dict | None:
    """The request body as a JSON object, or None when it is anything else."""
    try:
        data = json.loads(request.get_data(as_text=True) or "null")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
