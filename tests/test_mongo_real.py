"""The same flow against a real MongoDB server: runs when MONGO_URI is set (skipped otherwise).

mongomock is what the demo and the rest of the suite use; this proves the queries, indexes and atomic updates hold
on the real server too.
"""
from __future__ import annotations

import os
import pytest

from tests.race import winners

MONGO_URI = os.environ.get("MONGO_URI")
pytestmark = [pytest.mark.mongo, pytest.mark.skipif(not MONGO_URI, reason="MONGO_URI is not set")]


@pytest.fixture
def settings_overrides():
    return {"mongo_uri": MONGO_URI}


@pytest.fixture(autouse=True)
def drop_database(services):
    yield
    services.db.client.drop_database(services.db.name)


def test_paid_flow_on_real_mongodb(paid_avatar, drain, sim):
    api, avatar, order = paid_avatar()
    drain()
    assert api.get(f"/api/v1/avatars/{avatar['id']}").get_json()["state"] == "trained"
    template = api.get("/api/v1/templates?gender=female").get_json()[0]["id"]
    render = api.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": template}).get_json()
    drain()
    assert api.get(f"/api/v1/renders/{render['id']}").get_json()["state"] == "done"
    assert api.get(f"/api/v1/orders/{order['id']}").get_json()["state"] == "fulfilled"


def test_concurrent_transitions_have_one_winner_on_real_mongodb(services):
    from portraits import states

    services.db.orders.insert_one({"_id": "P1", "state": "paid", "history": []})
    assert winners(lambda: states.transition(services.db, "order", "P1", "refunding", reason="race")) == 1


def test_one_open_order_per_avatar_is_enforced_by_the_unique_index(ready_avatar, services):
    api, avatar = ready_avatar()
    assert api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"}).status_code == 201
    second = api.post("/api/v1/orders", json={"avatar_id": avatar["id"], "sku": "avatar_pack"})
    assert second.status_code == 409
    assert services.db.orders.count_documents({"avatar_id": avatar["id"]}) == 1
