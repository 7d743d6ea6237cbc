"""Rate limits on the routes that cost something (a WeChat call, a photo judged, a prepay, a render): Flask-Limiter,
counted in the app's Redis so every web process shares the counts.

A route opts in with `endpoint(..., rate_limit="<setting>")`; the setting holds its limits ("30/minute;300/hour")
and routes naming the same setting share one count. Requests are counted per user when they carry a valid token,
per client address otherwise. The check runs before anything else of the route (the token lookup, the body), and
a request over a limit answers 429 `rate_limited` with Retry-After.
"""
from __future__ import annotations

import math
import time

from flask import request
from flask_limiter import Limiter, RateLimitExceeded

from miniapp_api.api.auth import bearer_token
from miniapp_api.errors import ApiError, envelope
from portraits import keys, privacy, users
from portraits.errors import Unauthenticated

# Approximates a window sliding over the last period from two fixed windows: no burst of twice the limit at a
# window's edge, and two counters per key instead of one entry per request.
STRATEGY = "sliding-window-counter"


def init_app(app) -> None:
    services = app.extensions["portraits"]
    settings = services.settings
    limiter = Limiter(key_func=lambda: client_key(settings), strategy=STRATEGY, storage_uri="redis://",
                      storage_options={"connection_pool": services.redis.connection_pool,
                                       "key_prefix": keys.RATE_LIMITS})
    limiter.init_app(app)
    for endpoint, view in list(app.view_functions.items()):
        setting = getattr(view, "rate_limit", None)
        if setting is not None:
            app.view_functions[endpoint] = limiter.shared_limit(getattr(settings, setting), scope=setting)(view)

    @app.errorhandler(RateLimitExceeded)
    def _rate_limited(error: RateLimitExceeded):
        reset_at = limiter.current_limit.reset_at if limiter.current_limit else time.time() + 1
        retry_after = max(1, math.ceil(reset_at - time.time()))
        response = envelope(429, "rate_limited", "Too many requests; try again later.",
                            {"limit": str(error.limit.limit), "retry_after_s": retry_after})
        response.headers["Retry-After"] = str(retry_after)
        return response


def client_key(settings) -> str:
    """Whom a request is counted against: the user its token names (checked by signature, no database), by its
    one-way reference (a counter in Redis never names a user), else its address."""
    try:
        return "user:" + privacy.one_way_ref(settings.secret_key, str(users.token_claims(settings, bearer_token())
                                                                       .get("uid")))
    except (ApiError, Unauthenticated):
        return "addr:" + (request.remote_addr or "unknown")
