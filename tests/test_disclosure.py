"""GET /api/v1/disclosure: public, from settings, placeholders marked in embedded mode, the label policy the
labeller really follows."""
from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from models.labels import LABEL_TEXT, PREVIEW_KIND, PREVIEW_LABEL_TEXT, label_image, read_label
from portraits.config import DISCLOSURE_PLACEHOLDER

FILED = {"algorithm_filing_number": "网信算备110108000000001240011号",
         "genai_filing_number": "Beijing-MiaoXiang-20260101", "model_name": "妙像写真大模型 v1",
         "model_provider": "妙像科技有限公司"}


def test_embedded_disclosure_is_public_and_says_it_is_a_placeholder(client, services):
    answer = client.get("/api/v1/disclosure")  # no token: shown before login, on every AI page
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["placeholder"] is True
    assert body["placeholders"] == list(FILED)
    assert body["algorithm_filing_number"] == body["genai_filing_number"] == DISCLOSURE_PLACEHOLDER
    assert body["model"] == {"name": DISCLOSURE_PLACEHOLDER, "provider": DISCLOSURE_PLACEHOLDER}
    assert body["service_provider"] == services.settings.provider_name


@pytest.mark.parametrize("settings_overrides", [FILED])
def test_filed_numbers_and_model_come_from_settings(client):
    body = client.get("/api/v1/disclosure").get_json()
    assert body["placeholder"] is False and body["placeholders"] == []
    assert body["algorithm_filing_number"] == FILED["algorithm_filing_number"]
    assert body["genai_filing_number"] == FILED["genai_filing_number"]
    assert body["model"] == {"name": FILED["model_name"], "provider": FILED["model_provider"]}


def test_the_published_label_policy_is_what_the_labeller_writes(client, services):
    policy = client.get("/api/v1/disclosure").get_json()["aigc_labels"]
    assert policy["standard"] == "GB 45438-2025"
    assert set(policy["labelled"]) == {"generated_portraits", "previews", "share_posters"}
    assert policy["content_producer"] == services.settings.provider_name
    labelled = label_image(Image.new("RGB", (295, 413), (67, 142, 219)), content_id="AIGC-TEST",
                           provider=services.settings.provider_name)
    written = read_label(labelled)
    assert list(written) == policy["metadata"]["fields"]
    assert written["ContentProducer"] == policy["content_producer"]
    with Image.open(io.BytesIO(labelled)) as image:
        assert json.loads(image.text[policy["metadata"]["key"]])["ProduceID"] == "AIGC-TEST"
    preview = read_label(label_image(Image.new("RGB", (128, 128)), content_id="AIGC-PREVIEW",
                                     provider=services.settings.provider_name, kind=PREVIEW_KIND))
    assert {k: preview.pop(k) for k in policy["preview"]["metadata"]} == policy["preview"]["metadata"]
    assert list(preview) == policy["metadata"]["fields"]
    assert policy["preview"]["visible_text"] == PREVIEW_LABEL_TEXT and LABEL_TEXT in PREVIEW_LABEL_TEXT
    assert policy["visible"]["text"] == "AI生成"
    assert policy["visible"]["text_height_ratio"] >= 0.05  # the standard's minimum


def test_the_contract_documents_the_disclosure_as_public(client):
    operation = client.get("/api/v1/openapi.json").get_json()["paths"]["/api/v1/disclosure"]["get"]
    assert operation["security"] == []
    assert "200" in operation["responses"] and "401" not in operation["responses"]
