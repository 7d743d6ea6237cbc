"""security.mediaCheckAsync's other half: WeChat fetches the medium from its URL, judges it, and pushes the verdict
(the `wxa_media_check` event) to the mini-program's message-push URL, signed and, in safe mode, encrypted.

Verdicts are `pass` unless a rule says otherwise (rules match an openid and/or a media type and are used up one
check at a time when they carry a count); a rule can also hold the push (until /sim/media-checks/deliver), lose it
(never sent), or delay it. The push of a check is delivered by a timer thread delay_s after the call; a push not
answered `success` (or empty) with 200 is sent again push_retries times, push_retry_interval_s apart, as WeChat
retries message pushes. Calls are counted per minute and per day against WeChat's quotas (45011 and 45009 beyond).
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import replace
from datetime import date
from typing import TYPE_CHECKING

import requests

from wechat_sim.push import MODES, FORMATS, PushConfig, original_id, signed_push

if TYPE_CHECKING:
    from wechat_sim.simulator import WeChatSimulator

MAX_MEDIA_BYTES = 10 * 1024 * 1024
SUGGESTS = ("pass", "review", "risky")
# WeChat's labels: 100 normal, 20001 politics, 20002 porn, 20006 crime, 21000 other.
RISKY_LABEL = 20002
DEFAULTS = {"suggest": "pass", "label": 100, "delay_s": 0.0, "minute_limit": 2000, "day_limit": 200000,
            "push_retries": 3, "push_retry_interval_s": 5.0, "fetch_timeout_s": 5.0}


class MediaChecks:
    def __init__(self, sim: WeChatSimulator, push: PushConfig):
        self.sim = sim
        self.started_with = push
        self.lock = threading.RLock()
        self.reset()

    def reset(self) -> None:
        """Forget checks, rules and counters, and go back to the push configuration the simulator started with."""
        with self.lock:
            self.push = self.started_with
            self.checks: dict[str, dict] = {}
            self.rules: list[dict] = []
            self.config = dict(DEFAULTS)
            self.minute_calls: dict[int, int] = {}
            self.day_calls: dict[date, int] = {}
            self.rejected_for_quota = 0

    def configure_push(self, **changes) -> PushConfig:
        changes = {key: value for key, value in changes.items() if value is not None}
        if changes.get("mode", self.push.mode) not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if changes.get("data_format", self.push.data_format) not in FORMATS:
            raise ValueError(f"data_format must be one of {FORMATS}")
        with self.lock:
            self.push = replace(self.push, **changes)
            return self.push

    def configure(self, **changes) -> dict:
        unknown = set(changes) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        if changes.get("suggest", "pass") not in SUGGESTS:
            raise ValueError(f"suggest must be one of {SUGGESTS}")
        with self.lock:
            self.config.update(changes)
            return dict(self.config)

    def add_rule(self, rule: dict) -> dict:
        if rule.get("suggest", "pass") not in SUGGESTS:
            raise ValueError(f"suggest must be one of {SUGGESTS}")
        rule = {"openid": rule.get("openid"), "media_type": rule.get("media_type"),
                "suggest": rule.get("suggest", "pass"), "label": rule.get("label"),
                "count": rule.get("count"), "hold": bool(rule.get("hold")), "lose": bool(rule.get("lose")),
                "delay_s": rule.get("delay_s"), "errcode": int(rule.get("errcode") or 0)}
        with self.lock:
            self.rules.append(rule)
        return rule

    # ------------------------------------------------------------------------------------------- the API call

    def take_quota(self) -> int:
        """0, or WeChat's errcode for a quota used up (45011 this minute, 45009 today); counts the call if 0."""
        now = time.time()
        minute, today = int(now // 60), date.fromtimestamp(now)
        with self.lock:
            if self.day_calls.get(today, 0) >= self.config["day_limit"]:
                self.rejected_for_quota += 1
                return 45009
            if self.minute_calls.get(minute, 0) >= self.config["minute_limit"]:
                self.rejected_for_quota += 1
                return 45011
            self.minute_calls = {minute: self.minute_calls.get(minute, 0) + 1}
            self.day_calls = {today: self.day_calls.get(today, 0) + 1}
            return 0

    def _rule_for(self, openid: str, media_type: int) -> dict:
        """Caller holds the lock."""
        for rule in self.rules:
            if rule["openid"] not in (None, openid) or rule["media_type"] not in (None, media_type):
                continue
            if rule["count"] is not None:
                if rule["count"] <= 0:
                    continue
                rule["count"] -= 1
            return rule
        return {}

    def accept(self, media_url: str, media_type: int, openid: str, scene: int) -> str:
        """Record a check WeChat accepted and schedule its push; its trace_id."""
        trace_id = "-".join(secrets.token_hex(4) for _ in range(3))
        with self.lock:
            rule = self._rule_for(openid, media_type)
            suggest = rule.get("suggest") or self.config["suggest"]
            label = rule.get("label") or (100 if suggest == "pass" else RISKY_LABEL)
            delay_s = rule.get("delay_s") if rule.get("delay_s") is not None else self.config["delay_s"]
            status = "lost" if rule.get("lose") else "held" if rule.get("hold") else "scheduled"
            self.checks[trace_id] = {
                "trace_id": trace_id, "media_url": media_url, "media_type": media_type, "openid": openid,
                "scene": scene, "suggest": suggest, "label": label, "errcode": rule.get("errcode", 0),
                "status": status, "created_at": time.time(), "fetch": None, "deliveries": [],
                "done": threading.Event()}
        if status == "scheduled":
            timer = threading.Timer(float(delay_s), self.deliver, args=(trace_id,))
            timer.daemon = True
            timer.start()
        return trace_id

    # ------------------------------------------------------------------------------------------- the push

    def fetch(self, media_url: str) -> dict:
        """GET the medium as WeChat would; at most MAX_MEDIA_BYTES are taken."""
        outcome = {"status_code": None, "bytes": 0, "error": None}
        try:
            with requests.get(media_url, timeout=self.config["fetch_timeout_s"], stream=True) as response:
                outcome["status_code"] = response.status_code
                size = 0
                for chunk in response.iter_content(64 * 1024):
                    size += len(chunk)
                    if size > MAX_MEDIA_BYTES:
                        outcome["error"] = "too_large"
                        break
                outcome["bytes"] = size
                outcome["content_type"] = response.headers.get("Content-Type")
        except requests.RequestException as error:
            outcome["error"] = f"connection_error: {type(error).__name__}"
        if outcome["error"] is None and outcome["status_code"] != 200:
            outcome["error"] = f"http_{outcome['status_code']}"
        return outcome

    def event(self, check: dict) -> dict:
        """The wxa_media_check event, field for field as WeChat documents it."""
        creds = self.sim.creds
        errcode = check["errcode"] or (0 if check["fetch"]["error"] is None else -1008)
        result = {"suggest": check["suggest"], "label": check["label"]}
        return {
            "ToUserName": original_id(creds.appid), "FromUserName": check["openid"], "CreateTime": int(time.time()),
            "MsgType": "event", "Event": "wxa_media_check", "appid": creds.appid, "trace_id": check["trace_id"],
            "version": 2,
            "detail": [{"strategy": "content_model", "errcode": errcode, "suggest": result["suggest"],
                        "label": result["label"], "prob": 90 if result["suggest"] != "pass" else 0}],
            "errcode": errcode, "errmsg": "ok" if errcode == 0 else "media fetch failed",
            "result": result,
        }

    def post(self, message: dict, config: PushConfig | None = None, *, appid: str | None = None, **signing) -> dict:
        """POST one push to the configured URL; the outcome. `config`, `appid` (encrypted for) and `signing`
        (timestamp, nonce) let the control API send pushes signed with other keys, to see them refused."""
        config = config or self.push
        outcome = {"at": time.time(), "status_code": None, "body": None, "error": None, "delivered": False}
        if not config.url:
            outcome["error"] = "no_push_url"
            return outcome
        params, body, content_type = signed_push(config, appid or self.sim.creds.appid,
                                                 original_id(self.sim.creds.appid), message, **signing)
        try:
            response = requests.post(config.url, params=params, data=body, timeout=self.sim.callback_timeout_s,
                                     headers={"Content-Type": content_type, "User-Agent": "Mozilla/4.0"})
            outcome.update(status_code=response.status_code, body=response.text[:200])
        except requests.RequestException as error:
            outcome["error"] = f"connection_error: {type(error).__name__}"
        outcome["delivered"] = outcome["status_code"] == 200 and (outcome["body"] or "").strip() in ("success", "")
        return outcome

    def deliver(self, trace_id: str) -> dict | None:
        """Fetch the medium and push the verdict (with WeChat's retries); None when the check is not due (delivered,
        being delivered, lost, or forgotten by a reset)."""
        with self.lock:
            check = self.checks.get(trace_id)
            if check is None or check["status"] not in ("scheduled", "held"):
                return None
            check["status"] = "delivering"
            retries, interval = self.config["push_retries"], self.config["push_retry_interval_s"]
        try:
            check["fetch"] = self.fetch(check["media_url"])
            message = self.event(check)
            for attempt in range(retries + 1):
                outcome = self.post(message)
                check["deliveries"].append(outcome)
                if outcome["delivered"] or outcome["error"] == "no_push_url" or attempt == retries:
                    break
                time.sleep(interval)
            with self.lock:
                check["status"] = "delivered" if check["deliveries"][-1].get("delivered") else "failed"
            return check["deliveries"][-1]
        finally:
            check["done"].set()

    def flush(self, trace_id: str | None = None, include_held: bool = False) -> list[dict]:
        """Deliver the scheduled pushes now (held ones too if asked; lost ones never) and wait for every delivery
        already under way, so that on return each of them is over."""
        with self.lock:
            wanted = [c for c in self.checks.values() if trace_id in (None, c["trace_id"])]
            due = [c["trace_id"] for c in wanted
                   if c["status"] == "scheduled" or (include_held and c["status"] == "held")]
            running = [c["done"] for c in wanted if c["status"] == "delivering"]
        outcomes = [outcome for tid in due if (outcome := self.deliver(tid)) is not None]
        for done in running:
            done.wait(self.sim.callback_timeout_s * (self.config["push_retries"] + 1) + 5)
        return outcomes

    def view(self) -> list[dict]:
        with self.lock:
            return [{k: v for k, v in check.items() if k != "done"} for check in self.checks.values()]

    def stats(self) -> dict:
        with self.lock:
            by_status: dict[str, int] = {}
            for check in self.checks.values():
                by_status[check["status"]] = by_status.get(check["status"], 0) + 1
            return {"checks": len(self.checks), "by_status": by_status, "rejected_for_quota": self.rejected_for_quota,
                    "push": {"url": self.push.url, "mode": self.push.mode, "data_format": self.push.data_format}}
