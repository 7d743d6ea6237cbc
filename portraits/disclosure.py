"""What the service discloses on every AI page (Deep Synthesis Provisions; Generative-AI Interim Measures; the AIGC
labelling measures): its filing numbers, the model and its provider, and how generated content is labelled."""
from __future__ import annotations

from models.labels import label_policy

LABELLED_CONTENT = ("generated_portraits", "previews", "share_posters")


def disclosure(settings) -> dict:
    return {
        "algorithm_filing_number": settings.algorithm_filing_number,
        "genai_filing_number": settings.genai_filing_number,
        "model": {"name": settings.model_name, "provider": settings.model_provider},
        "service_provider": settings.provider_name,
        "placeholder": bool(settings.disclosure_placeholders),
        "placeholders": settings.disclosure_placeholders,
        "aigc_labels": {
            **label_policy(),
            "labelled": list(LABELLED_CONTENT),
            "content_producer": settings.provider_name,
            # portraits.renders writes one label-log row per labelled image; erasure keeps it pseudonymised.
            "label_log": "content id, one-way user reference and time of every labelled image",
        },
    }
