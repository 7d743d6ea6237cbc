"""What WeChat's content check decides, applied: a user photo counts toward its avatar only once it passes, a
portrait is delivered only once it passes (portraits.content_checks keeps the checks themselves).

- `submit` (the content-check job) submits one queued check, then applies a verdict that was pushed before the
  trace_id was written;
- `receive_media_check` (the `wxa_media_check` message push, portraits.push_events) records the verdict and
  applies it;
- `sweep` (portraits.sweeper) records the checks of a finished render that a crash kept from being recorded, times
  out checks WeChat never answered, applies the timeout policy, settles what a
  crash left unapplied, returns interrupted submissions to the queue and drains the queue as quota allows.
Applying a verdict is idempotent (a photo or image no longer pending is left as it is), so a second push, the
sweep and the submitter may all try.
"""
from __future__ import annotations

from collections import Counter

from portraits import avatars, content_checks, previews, renders

# Queued checks the sweep submits in one pass at most (the quota stops it sooner).
DRAIN_BATCH = 500
SETTLE = {"photo": avatars.apply_content_verdict, "image": renders.apply_image_verdict,
          "preview": previews.apply_preview_verdict}


def submit(services, check_id: str) -> str:
    outcome, submitted = content_checks.submit(services, check_id)
    if submitted is not None:
        settle(services, content_checks.decide(services, submitted["trace_id"]))
    return outcome


def receive_media_check(services, event: dict) -> str:
    """The `wxa_media_check` push (its signature already verified): recorded, applied if its check is known."""
    trace_id = content_checks.record_verdict(services, event)
    if trace_id is None:
        return "ignored_without_trace_id"
    decided = content_checks.decide(services, trace_id)
    if decided is None:
        return "recorded"
    settle(services, decided)
    return decided["state"]


def settle(services, check: dict | None) -> None:
    """Tell the photo or portrait what its decided check means, then mark the check settled."""
    if check is None or check["state"] not in content_checks.DECIDED:
        return
    counted, reason = content_checks.outcome(services.settings, check)
    SETTLE[check["kind"]](services, check, counted, reason)
    content_checks.mark_settled(services, check["_id"])


def sweep(services, grace_cutoff) -> Counter:
    done = Counter()
    for render in renders.renders_owing_image_checks(services, grace_cutoff):
        renders.request_image_checks(services, render)
        done["content_check_recorded"] += 1
    for check in content_checks.expire_overdue(services, content_checks.timeout_cutoff(services)):
        settle(services, check)
        done["content_check_timeout"] += 1
    for check in content_checks.unsettled(services):
        settle(services, check)
        done["content_check_settled"] += 1
    done["content_check_released"] += content_checks.release_stale_submissions(services, grace_cutoff)
    for check in content_checks.queued(services, DRAIN_BATCH):
        outcome = submit(services, check["_id"])
        if outcome == "submitted":
            done["content_check_submitted"] += 1
        elif outcome.startswith("queued_"):
            break  # out of quota, or WeChat not answering: the next sweep tries again
    return done
