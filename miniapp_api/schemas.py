"""The client contract as pydantic models: what each /api/v1 route takes and answers.

Request models validate the request before the handler runs (miniapp_api.api.openapi wires them in with spectree;
refusals keep the error envelope, see miniapp_api.api.requests.refusal). Response models validate what handlers
answer and, with the request models, generate the OpenAPI document served at /api/v1/openapi.json.

Request models ignore unknown fields (as the API always did); response models forbid them, so the published
schemas say `additionalProperties: false` and a handler cannot answer a field the contract does not list.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, StringConstraints, model_validator
from pydantic_core import PydanticCustomError, core_schema
from werkzeug.datastructures import FileStorage

from portraits import states
from portraits.avatars import GENDERS, ROLES
from portraits.consents import FACE_PROCESSING

# ------------------------------------------------------------------------------------------------ field types

FIELD_MAX_CHARS = 128  # far above any id, code or version we issue or WeChat does (a wx.login code: 32)
NonEmptyStr = Annotated[str, StringConstraints(min_length=1, max_length=FIELD_MAX_CHARS, pattern=r"\S")]
"""A string with something other than whitespace in it, and not longer than FIELD_MAX_CHARS (field_too_long)."""


@dataclass(frozen=True)
class OneOf:
    """A non-empty string from a fixed set; the schema lists the set as its enum.

    Refusals: `string_type` for anything but a non-empty string, `not_one_of` (ctx `expected`: "a|b") otherwise."""

    values: tuple[str, ...]

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_plain_validator_function(self.check)

    def __get_pydantic_json_schema__(self, schema, handler):
        return {"type": "string", "enum": list(self.values)}

    def check(self, value):
        if not isinstance(value, str) or not value.strip():
            raise PydanticCustomError("string_type", "must be a non-empty string")
        if value not in self.values:
            raise PydanticCustomError("not_one_of", "must be one of {expected}", {"expected": "|".join(self.values)})
        return value


@dataclass(frozen=True)
class Refused:
    """A field refused with a reason code of its own instead of invalid_fields (codes clients relied on before the
    models existed), `when` it is missing, or holds a value outside its enum (for a map: any value not listed).
    Wrong JSON types of the field itself stay invalid_fields. The schema says so as `x-refusal`."""

    code: str
    message: str
    when: Literal["missing", "outside_enum"]
    details: Callable[[Any], dict] = field(default=lambda value: {})

    def __get_pydantic_json_schema__(self, schema, handler):
        return {**handler(schema), "x-refusal": {"code": self.code, "when": self.when}}

    def covers(self, error: dict) -> bool:
        """Whether this pydantic error of the field is one refused with `code`."""
        if self.when == "missing":
            return error["type"] == "missing"
        return error["type"] == "not_one_of" or len(error["loc"]) > 1


class _UploadedFile:
    """A multipart file part; a missing part, or a plain form field of that name, is `missing`."""

    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        return core_schema.no_info_plain_validator_function(cls.check)

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler):
        return {"type": "string", "format": "binary"}

    @staticmethod
    def check(value):
        if not isinstance(value, FileStorage):
            raise PydanticCustomError("missing", "a file part is required")
        return value


UploadedFile = Annotated[FileStorage, _UploadedFile]


def _no_default(schema: dict) -> None:
    schema.pop("default", None)


def omittable() -> Any:
    """A field that is absent when it does not apply (never null): not required, and no `default` published."""
    return Field(default=None, json_schema_extra=_no_default)


Gender = Annotated[str, OneOf(GENDERS)]
Role = Annotated[str, OneOf(ROLES)]
GRANT_ANSWERS = ("accept", "reject", "ban", "filter")  # wx.requestSubscribeMessage's answers per template
GrantAnswer = Annotated[str, OneOf(GRANT_ANSWERS)]
AvatarState = Literal[tuple(states.MACHINES["avatar"])]
OrderState = Literal[tuple(states.MACHINES["order"])]
RenderState = Literal[tuple(states.MACHINES["render"])]
AlbumState = Literal[tuple(states.MACHINES["album"])]
NICKNAME_MAX_CHARS = 20
Nickname = Annotated[str, StringConstraints(min_length=1, max_length=NICKNAME_MAX_CHARS, pattern=r"\S")]
# A medium's content check as the client sees it: waiting for WeChat, or passed (by WeChat, or by the review or
# timeout policy); refused ones say so in `reasons` (photos) or are not shown at all (portraits).
ContentCheck = Literal["pending", "pass", "review", "timeout"]
PNG = "image/png"  # a success answered with a PNG body instead of JSON
JPEG = "image/jpeg"  # a success answered with a JPEG body (portraits, PORTRAIT_FORMAT)
TEXT = "text/plain"  # a success answered with a plain-text body (WeChat's message push reads `success`)
MEDIA = "application/octet-stream"  # the checked medium itself, served to WeChat
ZIP = "application/zip"  # a pack's archive of delivered portraits


class Body(BaseModel):
    """A request: strict JSON types (no "yes" for true, no 1 for "1"), unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class Reply(BaseModel):
    """A response: exactly the listed fields."""

    model_config = ConfigDict(strict=True, extra="forbid")


# ---------------------------------------------------------------------------------------------------- errors

class ErrorDetail(Reply):
    code: str = Field(description="stable snake_case reason code")
    message: str = Field(description="for people; may change")
    details: dict[str, Any] = Field(description="machine-readable, per code (invalid_fields: {fields: {name: "
                                                "'missing' | 'must be ...' | 'a|b'}})")
    request_id: str = Field(description="this request's id, also in the X-Request-ID response header (the caller's "
                                        "own X-Request-ID when it was 1-128 characters of A-Z a-z 0-9 . _ : -); "
                                        "quote it to support")


class ErrorEnvelope(Reply):
    """Every refusal: the HTTP status and a stable reason code."""

    error: ErrorDetail


class PayCallbackError(ErrorEnvelope):
    """A refused WeChat Pay callback: WeChat Pay reads code/message (and redelivers on 5xx), we read `error`."""

    code: Literal["FAIL"] = omittable()
    message: str = omittable()


# ---------------------------------------------------------------------------------------------------- requests

class LoginRequest(Body):
    code: NonEmptyStr = Field(description="the code from wx.login")


class PhoneRequest(Body):
    code: NonEmptyStr = Field(description="the code of the getPhoneNumber button's bindgetphonenumber event")


class ConsentRequest(Body):
    kind: Annotated[str, OneOf((FACE_PROCESSING,)),
                    Refused("unknown_consent_kind", "Only face_processing consent exists.", "outside_enum",
                            lambda kind: {"kind": kind})]
    version: NonEmptyStr = Field(description="the version of the text shown (GET /consents)")
    age_14_or_over: bool
    own_face: bool


class AvatarRequest(Body):
    gender: Gender
    sku: NonEmptyStr = Field(default=None, json_schema_extra=_no_default,
                             description="the product the user means to buy (GET /api/v1/products): the avatar's "
                                         "min_photos and missing count toward its photo minimum (without it: "
                                         "MIN_PHOTOS). An order for another product re-judges the avatar against "
                                         "that product's minimum (409 avatar_not_ready with missing and min_photos "
                                         "if it falls short) and from then on the avatar collects for it. 400 "
                                         "unknown_sku for a product not on sale")


class PhotoUpload(Body):
    photo: Annotated[UploadedFile, Refused("photo_missing", "The multipart field 'photo' is missing.", "missing")]
    role: Role = Field(default="extra", description="front: a frontal portrait; extra: any other angle")


class OrderRequest(Body):
    avatar_id: NonEmptyStr
    sku: NonEmptyStr = Field(description="the product (GET /api/v1/products); the avatar is judged against its photo "
                                         "minimum: 409 avatar_not_ready with missing and min_photos when it falls "
                                         "short, otherwise the avatar collects for this product from now on")
    platform: NonEmptyStr = Field(default=None, json_schema_extra=_no_default,
                                  description="the client's platform (wx.getDeviceInfo: android, "
                                                             "ios, devtools, windows, mac...); with PAYMENT_RAIL="
                                                             "by_platform it picks the payment rail, and on ios the "
                                                             "make-good rule applies")
    use_credit: bool = Field(default=False, description="pay with one of the user's free redo credits for this sku "
                                                        "(402 no_make_good_credit when none is left)")


class AlbumRequest(Body):
    sku: NonEmptyStr = Field(description="an album product (GET /api/v1/products: those with `album`); 400 "
                                         "not_an_album_sku for another")
    avatar_id: NonEmptyStr = Field(description="the inviter's own trained avatar (409 avatar_not_trained)")
    nickname: Nickname = Field(default=None, json_schema_extra=_no_default,
                               description="the name the invitees see (WeChat no longer tells it to us)")
    platform: NonEmptyStr = Field(default=None, json_schema_extra=_no_default,
                                  description="the client's platform (wx.getDeviceInfo), which with "
                                              "PAYMENT_RAIL=by_platform picks the payment rail")
    use_credit: bool = Field(default=False, description="pay with one of the user's free redo credits for this "
                                                        "album sku (402 no_make_good_credit when none is left)")


class AlbumAcceptRequest(Body):
    avatar_id: NonEmptyStr = Field(description="the invitee's own trained avatar (409 avatar_not_trained)")
    nickname: Nickname = Field(default=None, json_schema_extra=_no_default,
                               description="the name the other members see")


class ProductQuery(Body):
    platform: NonEmptyStr = Field(default=None, json_schema_extra=_no_default,
                                  description="the client's platform (wx.getDeviceInfo), which "
                                                             "with PAYMENT_RAIL=by_platform decides the rail")


def _grant_problems(grants) -> dict:
    return {"grants": {template: "must be accept, reject, ban or filter"
                       for template, answer in grants.items() if answer not in GRANT_ANSWERS}}


class GrantsReport(Body):
    grants: Annotated[dict[str, GrantAnswer],
                      Refused("invalid_grants", "Some grants are not understood.", "outside_enum",
                              _grant_problems)] = Field(
        description="template id -> the answer wx.requestSubscribeMessage gave for it")


def _empty_allowed(schema: dict) -> None:
    _no_default(schema)
    schema["allowEmptyValue"] = True  # lifted onto the query parameter by miniapp_api.api.openapi


class TemplateFilter(Body):
    """Query parameters; an empty one means no filter."""

    category: NonEmptyStr = Field(default=None, json_schema_extra=_empty_allowed)
    gender: Gender = Field(default=None, json_schema_extra=_empty_allowed)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_unset(cls, query):
        return {name: value for name, value in query.items() if value != ""} if isinstance(query, dict) else query


class RenderRequest(Body):
    avatar_id: NonEmptyStr
    template_id: NonEmptyStr


class PayResource(Body):
    algorithm: str
    ciphertext: str
    associated_data: str
    nonce: str
    original_type: str


class PayNotification(Body):
    """A WeChat Pay v3 callback. It is verified (signature, timestamp) and decrypted by the payment gateway before
    anything reads it, so this model documents the body rather than validating it."""

    id: str
    create_time: str
    event_type: str
    resource_type: str
    resource: PayResource
    summary: str


class WeChatPush(Body):
    """A message push (消息推送) from WeChat, JSON or XML: in plaintext mode the event itself (ToUserName,
    FromUserName, CreateTime, MsgType, Event and the event's own fields: wxa_media_check's trace_id, result,
    detail...; xpay_goods_deliver_notify's OpenId, OutTradeNo, Env, WeChatPayInfo, GoodsInfo; xpay_refund_notify's
    OpenId, MchRefundId, WxRefundId, MchOrderId, WxOrderId, RefundFee, RetCode, RetMsg...), in safe mode ToUserName
    and Encrypt. Its
    query string carries signature, timestamp, nonce (and in safe mode encrypt_type=aes, msg_signature); it is
    verified before anything reads it, so this model documents the body rather than validating it."""

    model_config = ConfigDict(strict=True, extra="allow")  # each event has fields of its own

    ToUserName: str | None = None
    FromUserName: str | None = None
    CreateTime: int | None = None
    MsgType: str | None = None
    Event: str | None = None
    Encrypt: str | None = None


# --------------------------------------------------------------------------------------------------- responses

class FaceConsent(Reply):
    version: str
    given_at: str | None
    withdrawn_at: str | None
    current: bool = Field(description="given for today's text and not withdrawn")


class ConsentState(Reply):
    face_processing: FaceConsent | None


class SessionUser(Reply):
    id: str
    consents: ConsentState


class Session(Reply):
    token: str
    expires_in: int
    user: SessionUser


class ConsentText(Reply):
    kind: Annotated[str, OneOf((FACE_PROCESSING,))]
    version: str
    text: str


class Erased(Reply):
    avatars: int
    renders: int
    jobs: int
    tokens_revoked: bool


class Withdrawal(Reply):
    consents: ConsentState
    deleted: Erased


PhotoState = Literal[tuple(states.MACHINES["photo"])]


class Photo(Reply):
    id: str
    role: Role | None
    state: PhotoState = Field(description="judging (the upload is stored, its face is being judged: poll the avatar), "
                                          "accepted or refused (with reasons)")
    accepted: bool = Field(description="true once judged acceptable (false while judging)")
    reasons: list[str]
    content_check: ContentCheck | Literal["risky"] | None = Field(
        description="WeChat's content check of an accepted photo: pending (the avatar waits for it), pass, review or "
                    "timeout (passed by their policy), risky (refused: reasons content_risky); null for photos "
                    "refused before it, or from before the checks")


Lane = Literal["standard", "express"]
LANE_DESCRIPTION = ("the GPU lane the work waits in: express (an express sku's) is served by its own share of the GPU "
                    "workers; position and ETA count only the jobs of the same lane")


class Queue(Reply):
    state: str
    lane: Lane = Field(description=LANE_DESCRIPTION)
    position: int
    ahead: int
    eta_seconds: int
    progress: float
    step: int = omittable()
    total: int = omittable()


class Preview(Reply):
    """The free preview drawn from the front photo right after payment, before the avatar is trained: a labelled
    image ("AI生成·预览"), never a deliverable. Absent (null) when none is owed or it failed."""

    state: Literal["pending", "ready", "superseded"] = Field(
        description="pending: being drawn or content-checked; ready: url serves it; superseded: the trained "
                    "portraits are delivered and the preview is deleted")
    image_id: str | None
    url: str | None = Field(description="the labelled PNG (GET, owner only) while ready")


class Avatar(Reply):
    id: str
    state: AvatarState
    gender: Gender
    photos: list[Photo]
    accepted_count: int
    sku: str | None = Field(description="the product the avatar collects photos for (declared at creation, then "
                                        "the sku of its latest order); null: none declared, MIN_PHOTOS applies")
    min_photos: int = Field(description="accepted photos its product needs")
    max_photos: int
    missing: list[str] = Field(description="what training still needs: face_consent, front_photo, more_photos, "
                                           "content_check_pending (photos waiting for WeChat's content check), "
                                           "photos_judging (uploads whose face judging has not ended)")
    order_id: str | None
    photos_purged: bool
    failure: Literal["technical_failure"] | None
    queue: Queue | None
    preview: Preview | None


class PhotoVerdict(Reply):
    """An upload taken: stored and queued for judging (state judging). Its verdict lands in the avatar's photo list;
    the client polls GET /avatars/{id}."""

    id: str
    state: PhotoState
    accepted: bool
    reasons: list[str]
    role: Role
    avatar: Avatar


class PayParams(Reply):
    """What wx.requestPayment needs."""

    appId: str
    timeStamp: str
    nonceStr: str
    package: str
    signType: str
    paySign: str


class ExpressPromise(Reply):
    """An express order's promised wait: its training starts within wait_s of payment. Broken by more than
    margin_s, the price difference to the standard pack is refunded once (on iOS, where we cannot refund, a free
    standard pack is credited instead)."""

    state: Literal["open", "kept", "broken", "compensated"] | None = Field(
        description="null until paid; open while the training waits; kept or broken once it started (or the "
                    "deadline plus the margin passed); compensated once the difference is refunded or made good")
    wait_s: int
    margin_s: int
    difference_fen: int = Field(description="what a broken promise gives back, in fen")
    deadline: str | None = Field(description="payment time + wait_s; null until paid")
    waited_s: float | None = Field(description="payment to the training's start (or to when it was found broken)")
    compensation: Literal["refund", "make_good_credit", "covered"] | None = Field(
        description="refund: the difference refunded; make_good_credit: a free standard pack (iOS); covered: the "
                    "order was refunded in full anyway")


class Refund(Reply):
    out_refund_no: str
    amount: int
    state: str
    reason: str | None
    requested_at: str | None


class OrderRecord(Reply):
    id: str
    avatar_id: str
    sku: str
    amount: int = Field(description="fen")
    rail: str = Field(description="jsapi (WeChat Pay), xpay (virtual payment) or credit (a free redo credit)")
    platform: str | None
    state: OrderState
    render_credits: int
    lane: Lane = Field(description="express for an express sku: its training and renders wait in the express lane")
    created_at: str | None
    paid_at: str | None
    refunds: list[Refund]
    promise: ExpressPromise = omittable()


class XPayParams(Reply):
    """What wx.requestVirtualPayment needs (pass them unchanged; signData is signed as the very text given)."""

    mode: str = Field(description="short_series_goods")
    signData: str
    paySig: str
    signature: str


class Order(OrderRecord):
    preview: Preview | None = Field(description="the preview of the order's avatar, once paid")
    pay_params: PayParams = omittable()
    xpay_params: XPayParams = omittable()
    ios_make_good: str = omittable()


class RenderPlan(Reply):
    images: int = Field(description="images rendered after training, spread over the templates of the avatar's "
                                    "gender")
    batch: int = Field(description="images per batch; batches are delivered as they finish (GET "
                                   "/api/v1/packs/{order_id})")


class AlbumTerms(Reply):
    people: int = Field(description="people in the album, the buyer included: the buyer invites people - 1")


class Product(Reply):
    sku: str
    amount: int = Field(description="fen")
    render_sets: int
    min_photos: int = Field(description="accepted photos an avatar needs for this product")
    render_plan: RenderPlan | None = Field(description="what the product renders by itself after training; null: "
                                                       "the user picks render_sets templates")
    description: str
    rail: str = Field(description="how this client pays for it: jsapi (wx.requestPayment) or xpay "
                                  "(wx.requestVirtualPayment)")
    ios_make_good: str = Field(description="the make-good rule an iOS buyer is told before paying: the developer "
                                           "cannot refund iOS virtual payments, so a technical failure is made good "
                                           "with a free redo credit")
    credits: int = Field(description="the user's unused free redo credits for it (pay with use_credit)")
    lane: Lane = Field(description="express: trainings and renders wait in the express lane, with a promised wait")
    promised_wait_s: int = Field(default=None, json_schema_extra=_no_default,
                                 description="express only: the training starts within this many seconds of "
                                             "payment, or the difference is given back")
    album: AlbumTerms = omittable()


class PushReply(Reply):
    """What WeChat reads from a push answer: ErrCode 0 acknowledges it; anything else makes it push again."""

    ErrCode: int
    ErrMsg: str


class Subscriptions(Reply):
    subscriptions: dict[str, int] = Field(description="template id -> messages WeChat lets us send")


class TemplateName(Reply):
    zh: str
    en: str


class Template(Reply):
    id: str
    name: TemplateName
    category: str
    gender: Gender
    preview_url: str


class Image(Reply):
    id: str
    url: str
    poster_url: str
    likeness: float | None
    content_id: str
    render_id: str
    width: int | None
    height: int | None
    content_check: ContentCheck = Field(description="pending: waiting for WeChat's content check (url and poster_url "
                                                    "answer 409 image_pending_check until it passes)")


class PosterPending(Reply):
    """The poster cannot be made yet: WeChat has not drawn its mini-program code (it is retried)."""

    state: Literal["pending"]
    reason: Literal["wxacode_pending"]
    retry_after_s: int = Field(description="ask again after this many seconds (also the Retry-After header)")


class QueueSpot(Reply):
    lane: Lane = Field(description=LANE_DESCRIPTION)
    position: int
    ahead: int
    eta_seconds: int
    running: bool


class Render(Reply):
    id: str
    state: RenderState
    avatar_id: str
    template_id: str
    parent_id: str | None
    likeness: float | None
    parent_likeness: float | None
    # The best likeness as a share of how like the user their own photos are (1.0: as like as their photos are to
    # each other); None for avatars trained before it was measured, or without a scorable image.
    relative_likeness: float | None = None
    refinements_left: int
    images: list[Image]
    queue: QueueSpot | None


class PackBatch(Reply):
    id: str = Field(description="the batch's render id")
    index: int = Field(description="its place in the plan (a redraw has the index of the batch it makes good)")
    state: RenderState
    redraw_of: str | None = Field(description="the batch whose undelivered images this one draws again, free")
    images_owed: int
    images_delivered: int
    images_pending_check: int
    images_refunded: int = Field(description="images it could not deliver whose share of the price was refunded")
    settled: bool = Field(description="nothing more will happen to it")


class Pack(Reply):
    order_id: str
    sku: str
    phase: Literal[tuple(states.PACK_PHASES)] = Field(
        description="training: the avatar is not trained yet; rendering: batches are being drawn or checked; done: "
                    "every batch delivered, redrawn or refunded; refunded: the order was refunded before any batch")
    images_planned: int
    images_delivered: int = Field(description="passed WeChat's content check: downloadable, and in the archive")
    images_pending_check: int
    images_refunded: int = Field(description="images that could not be delivered even after a free redraw; their "
                                             "share of the price is refunded (the order's refunds list them)")
    batches_done: int = Field(description="batches settled")
    batches_pending: int
    batches: list[PackBatch]
    images: list[Image] = Field(description="the portraits so far, delivered and pending, in plan order")
    archive_url: str | None = Field(description="a zip of the delivered portraits; null while none is")


class AlbumMember(Reply):
    role: Literal["inviter", "invitee"]
    nickname: str | None
    gender: Gender | None = Field(description="the gender of the member's avatar")
    you: bool = Field(description="this member is the caller")


class AlbumSeat(Reply):
    index: int
    state: Literal["open", "taken", "declined"]
    token: str | None = Field(description="while open: the invitation's token (the scene of its share card's "
                                          "mini-program code is a=<token>)")
    invite_card_url: str | None = Field(description="while open and the album is inviting: its share card (PNG)")


class AlbumProgress(Reply):
    phase: Literal[tuple(states.PACK_PHASES)] = Field(
        description="training: no batch written yet (invitations not all accepted); rendering: batches being drawn "
                    "or checked; done: every batch delivered, redrawn or refunded")
    images_planned: int
    images_delivered: int
    images_pending_check: int
    images_refunded: int = Field(description="images that could not be delivered even after a free redraw; their "
                                             "share of the price is refunded")
    batches_done: int
    batches_pending: int


class Album(Reply):
    id: str
    sku: str
    people: int
    state: AlbumState = Field(description="awaiting_payment (the inviter pays its order), inviting (seats open), "
                                          "accepted (drawn and delivered as batches finish), declined, expired, "
                                          "withdrawn, closed (its order closed unpaid)")
    you: Literal["inviter", "invitee"]
    order_id: str | None = Field(description="the inviter's order (null for invitees: it is not theirs)")
    members: list[AlbumMember]
    seats: list[AlbumSeat]
    created_at: str
    paid_at: str | None
    invite_expires_at: str | None
    accepted_at: str | None
    withdrawn_at: str | None
    progress: AlbumProgress | None
    images: list[Image] = Field(description="the joint portraits delivered so far (both members see them); none once "
                                            "withdrawn: they are deleted for everyone")


class AlbumPurchase(Reply):
    album: Album
    order: Order = Field(description="pay it as any order (pay_params / xpay_params); once paid the album invites")


class AlbumInvitation(Reply):
    """What the invitee is shown when opening an invite card's code; a member of the album (whoever took the seat,
    the inviter, another invitee) is shown it as it stands, whatever its state."""

    sku: str
    description: str = Field(description="the product")
    people: int
    inviter_nickname: str | None
    seat: int
    state: AlbumState
    expires_at: str | None
    joined: bool = Field(False, description="I am in this album: open it (album_id) instead of accepting")
    album_id: str | None = Field(None, description="the album, for its members only (GET /api/v1/albums/{id})")


class AlbumExport(Reply):
    id: str
    role: Literal["inviter", "invitee"]
    state: AlbumState
    sku: str
    created_at: str
    accepted_at: str | None
    withdrawn_at: str | None
    image_count: int = Field(description="joint images held now (none once withdrawn)")


class ConsentRecord(Reply):
    version: str
    given_at: str | None
    withdrawn_at: str | None
    age_14_or_over: bool
    own_face: bool
    ip: str | None


class MakeGoodCredit(Reply):
    """A free redo credit given for an order we could not refund (iOS virtual payment)."""

    order_id: str = Field(description="the order it makes good")
    sku: str
    reason: str | None
    granted_at: str | None
    used_by: str | None = Field(description="the order it paid, once spent")


class PhoneState(Reply):
    masked: str = Field(description="the bound number with its middle digits hidden: 138****8000")
    country_code: str
    bound_at: str | None


class Profile(Reply):
    id: str
    created_at: str
    phone: PhoneState | None = Field(description="null until a phone is bound (POST /api/v1/me/phone)")
    phone_required: bool = Field(description="face-processing consent and orders need a bound phone "
                                             "(403 phone_required without one)")
    consents: ConsentState


class ExportedPhone(Reply):
    phone_number: str = Field(description="as WeChat gives it, with the country code outside mainland China")
    pure_phone_number: str
    country_code: str
    bound_at: str | None


class ExportedUser(Reply):
    id: str
    openid: str
    created_at: str
    phone: ExportedPhone | None
    consents: ConsentState
    consent_records: dict[str, ConsentRecord]
    subscriptions: dict[str, int]
    make_good_credits: list[MakeGoodCredit]


class ExportedImage(Reply):
    id: str
    url: str
    content_id: str
    created_at: str | None


class LabelLogEntry(Reply):
    content_id: str
    created_at: str | None


class Export(Reply):
    """Everything held about the user."""

    user: ExportedUser
    avatars: list[Avatar]
    orders: list[OrderRecord]
    renders: list[Render]
    images: list[ExportedImage]
    albums: list[AlbumExport] = Field(description="every album the user is or was in, as inviter or invitee")
    label_log: list[LabelLogEntry]


class DisclosedModel(Reply):
    name: str
    provider: str


class VisibleLabel(Reply):
    text: str = Field(description="drawn on every generated image")
    position: Literal["bottom_right"]
    text_height_ratio: float = Field(description="text height over the image's shorter side")
    min_text_px: int


class MetadataLabel(Reply):
    key: str = Field(description="the metadata entry holding the label's JSON")
    png: str
    jpeg: str
    fields: list[str] = Field(description="the GB 45438-2025 implicit-label fields written")


class PreviewLabelPolicy(Reply):
    visible_text: str = Field(description="drawn on a preview instead of the plain label")
    metadata: dict[str, str] = Field(description="added to a preview's metadata label, beside the standard's fields")


class LabelPolicy(Reply):
    standard: str
    labelled: list[str] = Field(description="what carries both labels")
    content_producer: str
    visible: VisibleLabel
    metadata: MetadataLabel
    preview: PreviewLabelPolicy
    label_log: str = Field(description="what is logged per labelled image")


class Disclosure(Reply):
    """Shown on every AI page."""

    algorithm_filing_number: str = Field(description="算法备案号")
    genai_filing_number: str = Field(description="生成式人工智能服务备案号或登记编号")
    model: DisclosedModel
    service_provider: str
    placeholder: bool = Field(description="true while any value is a development placeholder (EMBEDDED only)")
    placeholders: list[str] = Field(description="the fields still holding the placeholder")
    aigc_labels: LabelPolicy


class Deleted(Reply):
    deleted: bool


class OpenApiDocument(RootModel[dict[str, Any]]):
    """An OpenAPI 3.1 document."""
