"""The intake task: judges one uploaded photo's face (portraits.avatars.judge_upload holds the rules).

Enqueued by portraits.avatars.add_photo as tasks.JUDGE_PHOTO on the intake queue, served by `python -m jobs.worker
intake`: a process of its own with its own dlib models, so no web process decodes a photo or runs a face model.
"""
from __future__ import annotations

from jobs import context
from portraits import avatars


def judge_photo(avatar_id: str, photo_id: str) -> str:
    return avatars.judge_upload(context.services(), avatar_id, photo_id)
