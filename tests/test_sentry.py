"""Error reports go through a real sentry_sdk client, Flask's and RQ's integrations included, to a transport that
keeps them in memory: what would leave the process names no openid, user id, token or photo key."""
from __future__ import annotations

import json
import secrets

import pytest
import sentry_sdk
from sentry_sdk.integrations.flask import FlaskIntegration
from sentry_sdk.integrations.rq import RqIntegration
from sentry_sdk.transport import Transport

from portraits import reporting, tasks

OPENID = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
USER_ID = "u_" + "3f" * 10
PHOTO_KEY = f"users/{USER_ID}/avatars/av_1/photos/p_1"
TOKEN = "eyJ1aWQiOiJ1XzEyMyJ9.aQ3Lbg.Xk1c2Vy3Z-Wt0n8hZTzYf0m3v9Q"
PHONE = "13800138000"
SECRETS = (OPENID, USER_ID, TOKEN, PHONE)


class MemoryTransport(Transport):
    def __init__(self, options=None):
        super().__init__(options)
        self.events = []

    def capture_envelope(self, envelope):
        event = envelope.get_event()
        if event is not None:
            self.events.append(event)


@pytest.fixture
def reported():
    """Sentry started as the processes start it, sending to memory."""
    def start(integrations):
        transport = MemoryTransport()
        assert reporting.init_error_reporting("https://public@sentry.invalid/1", "test", integrations, transport)
        return transport.events

    yield start
    sentry_sdk.get_client().close()
    sentry_sdk.get_global_scope().set_client(None)


def leaked(events) -> list[str]:
    text = json.dumps(events, default=str)
    return [secret for secret in SECRETS if secret in text]


def test_nothing_is_reported_unless_a_dsn_is_set():
    assert reporting.init_error_reporting("", "test", [FlaskIntegration()]) is False
    assert not sentry_sdk.get_client().is_active()


def test_the_scrubber_masks_identities_wherever_they_stand():
    event = {
        "message": f"login of {OPENID} as {USER_ID} (phone {PHONE}) failed reading {PHOTO_KEY}",
        "user": {"id": USER_ID},
        "request": {"headers": [["Authorization", f"Bearer {TOKEN}"], ["X-Request-ID", "r-1"]],
                    "data": {"code": "081xYz", "openid": OPENID, "nested": {"owner": USER_ID}},
                    "query_string": f"token={TOKEN}"},
        "extra": {"args": [USER_ID, "av_1"], "key": PHOTO_KEY},
        "contexts": {"response": {"status_code": 500}},
        "breadcrumbs": {"values": [{"data": {"phone_info": {"purePhoneNumber": PHONE}, "at": 1764597600000}}]},
    }
    scrubbed = reporting.scrub_event(event)
    assert leaked([scrubbed]) == [] and "user" not in scrubbed
    assert scrubbed["request"]["headers"] == [["Authorization", "[Filtered]"], ["X-Request-ID", "r-1"]]
    assert scrubbed["request"]["data"]["code"] == "[Filtered]"
    assert scrubbed["extra"] == {"args": ["[Filtered]", "av_1"], "key": "users/[Filtered]/avatars/av_1/photos/p_1"}
    assert scrubbed["contexts"] == {"response": {"status_code": 500}}
    assert scrubbed["breadcrumbs"]["values"][0]["data"] == {"phone_info": "[Filtered]", "at": 1764597600000}


def test_an_error_in_a_request_is_reported_without_the_users_identity(app, client, reported):
    events = reported([FlaskIntegration()])

    @app.get("/boom")
    def boom():
        raise RuntimeError(f"cannot open {PHOTO_KEY} for {OPENID}")

    answer = client.get(f"/boom?token={TOKEN}", headers={"Authorization": f"Bearer {TOKEN}",
                                                         "X-Request-ID": "boom-1"})
    assert answer.status_code == 500
    assert events, "the error was not reported"
    assert leaked(events) == []
    assert any("users/[Filtered]/avatars/av_1" in json.dumps(event, default=str) for event in events)


def test_a_failing_job_is_reported_without_the_users_identity(services, drain, reported):
    events = reported([RqIntegration()])
    tasks.enqueue(services, tasks.DEFAULT, "os.path.getsize", f"/nonexistent/{PHOTO_KEY}", USER_ID,
                  job_id="job-" + secrets.token_hex(4))
    drain()
    assert events, "the job's failure was not reported"
    assert leaked(events) == []
    assert "users/[Filtered]" in json.dumps(events, default=str)
