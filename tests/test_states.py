"""The state machines: only the documented moves exist, and a transition is a compare-and-set with one winner."""
from __future__ import annotations

import pytest

from portraits import states
from portraits.store import db as db_module
from tests.race import winners


def test_machines_match_the_product_lifecycles():
    assert states.MACHINES["avatar"]["collecting"] == {"ready"}
    assert states.sources("avatar", "trained") == {"training"}
    assert {"created", "closed"} <= states.sources("order", "paid")
    assert states.sources("order", "refunded") >= {"refunding"}
    assert states.MACHINES["order"]["refunded"] == set()
    assert states.sources("render", "done") == {"rendering"}
    for machine in states.MACHINES.values():
        for targets in machine.values():
            assert targets <= set(machine)


def test_an_illegal_transition_is_refused_loudly(services):
    with pytest.raises(states.IllegalTransition):
        states.transition(services.db, "order", "P1", "paid", expect={"refunded"})
    with pytest.raises(states.IllegalTransition):
        states.transition(services.db, "order", "P1", "teleported")


def test_a_transition_from_the_wrong_state_does_nothing(services):
    services.db.orders.insert_one({"_id": "P1", "state": "created", "history": []})
    assert states.transition(services.db, "order", "P1", "refunded") is None
    assert services.db.orders.find_one({"_id": "P1"})["state"] == "created"
    moved = states.transition(services.db, "order", "P1", "paid", by="test", reason="why")
    assert moved["state"] == "paid"
    assert moved["history"][-1]["to"] == "paid" and moved["history"][-1]["by"] == "test"


def test_concurrent_transitions_have_exactly_one_winner(services):
    services.db.orders.insert_one({"_id": "P2", "state": "paid", "history": []})
    assert winners(lambda: states.transition(services.db, "order", "P2", "refunding", reason="race")) == 1
    assert len(services.db.orders.find_one({"_id": "P2"})["history"]) == 1


def test_payment_notification_records_expire_and_an_old_plain_index_is_replaced(services):
    database = services.db
    database.pay_notifications.drop_indexes()
    database.pay_notifications.create_index("received_at")  # what deployments before the TTL have
    db_module.ensure_indexes(database)
    db_module.ensure_indexes(database)  # idempotent
    index = database.pay_notifications.index_information()["received_at_1"]
    assert index["expireAfterSeconds"] == db_module.PAY_NOTIFICATION_TTL_S
