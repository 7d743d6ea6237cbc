"""The same flow against a real database server: MONGO_URI's, else a SecantusDB server the session starts.

The rest of the suite runs on mongomock unless MONGO_URI is set; this proves the queries, indexes and atomic updates
hold on a server too (and, with MONGO_URI, on MongoDB itself).
"""
from __future__ import annotations

import pytest

from tests.race import winners

pytestmark = [pytest.mark.mongo]


@pytest.fixture
def settings_overrides(database_server):
    return {"mongo_uri": database_server}


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


def test_a_photo_refused_as_a_different_person_is_that_photo(services):
    """The positional update SecantusDB refuses in find_one_and_update (and mongomock applies to the wrong element)."""
    from portraits.avatars import refuse_as_different_person

    photos = [{"id": f"ph{n}", "accepted": True, "crop_key": f"c{n}", "embedding_key": f"e{n}", "phash": "1"}
              for n in range(3)]
    services.db.avatars.insert_one({"_id": "A1", "photos": photos})
    updated = refuse_as_different_person(services, "A1", {"id": "ph1"})
    assert [(p["id"], p["accepted"], "crop_key" in p) for p in updated["photos"]] == [
        ("ph0", True, True), ("ph1", False, False), ("ph2", True, True)]
    assert updated["photos"][1]["reasons"] == ["different_person"]
    assert refuse_as_different_person(services, "A1", {"id": "ph1"}) is None  # refused already: nothing matches
