"""`make demo`'s pieces that decide what it shows and how it exits (the demo itself runs the real processes; it is
run by hand, `make demo`, not here): the pack's shrunk plan reaches the processes as settings the products accept,
and the exit status fails on every flow that does not end as it should."""
from __future__ import annotations

import copy
import json

import pytest

from miniapp_api.dev import demo
from portraits import config, products


def _ended_well() -> dict:
    def flow(sku: str, lane: str = "standard") -> dict:
        return {"order": {"sku": sku, "lane": lane, "state": "fulfilled"}, "order_history": ["created", "paid",
                                                                                            "fulfilled"],
                "preview": {"enabled": True, "shown_after_payment_s": 1.2}}

    return {"flows": {"standard": flow("avatar_pack"), "express": flow("express_pack", "express"),
                      "pack": {**flow("pack_100"), "pack": {"images_planned": 10, "archive_images": 10}},
                      "album": {**flow("couple_album"), "album": {"images_planned": 2, "images_downloaded": 2}}},
            "errors": []}


def test_the_demo_plan_reaches_the_processes_as_settings_the_products_accept(tmp_path):
    plans = {demo.PACK_SKU: {"images": 10, "batch": 5}, demo.ALBUM_SKU: {"images": 2, "batch": 2}}
    environ = demo.demo_environ({"SKUS": json.dumps(config.DEFAULT_SKUS)}, plans, 1)
    settings = config.Settings.from_env(environ, embedded=True, instance_dir=tmp_path)
    assert {sku: products.render_plan(settings, sku) for sku in plans} == plans
    assert settings.pack_candidates_per_image == 1
    # Only the plans change: prices, photo minimums, people and every other product are as sold.
    unchanged = {sku: p for sku, p in settings.skus.items() if sku not in plans}
    assert unchanged == {sku: p for sku, p in config.DEFAULT_SKUS.items() if sku not in plans}
    for sku in plans:
        shrunk = {k: v for k, v in settings.skus[sku].items() if k != "render_plan"}
        assert shrunk == {k: v for k, v in config.DEFAULT_SKUS[sku].items() if k != "render_plan"}


def test_the_demo_plan_starts_from_the_skus_the_environment_sets(tmp_path):
    dearer = copy.deepcopy(config.DEFAULT_SKUS)
    dearer[demo.PACK_SKU]["amount"] = 1290
    environ = demo.demo_environ({"SKUS": json.dumps(dearer)}, {demo.PACK_SKU: {"images": 4, "batch": 2}}, 2)
    settings = config.Settings.from_env(environ, embedded=True, instance_dir=tmp_path)
    assert settings.skus[demo.PACK_SKU]["amount"] == 1290
    assert products.render_plan(settings, demo.PACK_SKU) == {"images": 4, "batch": 2}


def test_a_demo_whose_flows_all_ended_well_exits_zero():
    assert demo.failures(_ended_well()) == []


def test_previews_off_are_no_failure():
    summary = _ended_well()
    summary["flows"]["standard"]["preview"] = {"enabled": False}
    assert demo.failures(summary) == []


@pytest.mark.parametrize("spoil, expected", [
    (lambda s: s["flows"]["standard"]["order"].update(state="paid"), "standard: order paid, not fulfilled"),
    (lambda s: s["flows"]["express"]["order"].update(state="refunded"), "express: order refunded, not fulfilled"),
    (lambda s: s["flows"]["express"]["order"].update(lane="standard"), "express: order in the standard lane"),
    (lambda s: s["flows"]["standard"]["preview"].update(shown_after_payment_s=None), "standard: preview not shown"),
    (lambda s: s["flows"]["pack"]["pack"].update(archive_images=9), "pack: archive holds 9 images of 10 planned"),
    (lambda s: s["flows"].pop("pack"), "pack: did not finish"),
    (lambda s: s["flows"]["album"]["order"].update(state="refunded"), "album: order refunded, not fulfilled"),
    (lambda s: s["flows"]["album"]["album"].update(images_downloaded=1),
     "album: the invitee downloaded 1 joint portraits of 2 planned"),
    (lambda s: s["flows"].pop("album"), "album: did not finish"),
    (lambda s: s["errors"].append("express: timed out waiting"), "express: timed out waiting"),
])
def test_a_flow_that_did_not_end_as_it_should_fails_the_demo(spoil, expected):
    summary = _ended_well()
    spoil(summary)
    assert demo.failures(summary) == [expected]
