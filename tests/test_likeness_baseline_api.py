"""The user's own likeness baseline, measured at training from the accepted photos before they are purged, and a
render's likeness reported against it (issue 15, item 5)."""
from __future__ import annotations

import pytest

from portraits import renders


@pytest.fixture
def settings_overrides():
    return {"render_max_steps": 1, "render_max_candidates": 2}


def test_training_stores_the_baseline_and_a_render_reports_its_likeness_against_it(paid_avatar, drain, services,
                                                                                    monkeypatch):
    api, avatar, _order = paid_avatar()
    drain()
    trained = services.db.avatars.find_one({"_id": avatar["id"]})
    assert trained["state"] == "trained" and "embedding_key" not in trained["photos"][0]  # photos purged ...
    assert 0.9 < trained["likeness_baseline"] <= 1.0  # ... after the baseline was measured on them

    # The tiny random model draws no faces, so give the kept images a likeness as real ones would have.
    original = renders.keep_candidates

    def scored(*args, **kwargs):
        return [renders.KeptImage(image_id=image.image_id, likeness=0.9, carried=image.carried)
                for image in original(*args, **kwargs)]

    monkeypatch.setattr(renders, "keep_candidates", scored)
    template = services.catalog.get("urban_neon_night")
    render = api.post("/api/v1/renders", json={"avatar_id": avatar["id"], "template_id": template.id}).get_json()
    drain()
    done = api.get(f"/api/v1/renders/{render['id']}").get_json()
    assert done["state"] == "done" and done["likeness"] == 0.9
    assert done["relative_likeness"] == pytest.approx(0.9 / trained["likeness_baseline"], abs=1e-3)
    exported = api.get("/api/v1/me/export").get_json()
    assert [r["relative_likeness"] for r in exported["renders"]] == [done["relative_likeness"]]
