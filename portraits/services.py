"""Everything a web process or a worker needs, built once from Settings and shared (no globals per request)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from portraits.store import blobs, db as db_module, redis_client
from portraits.catalog import Catalog, load_catalog
from portraits.config import Settings
from portraits.gateways.wechatpay import PaymentGateway
from portraits.store.vault import SealedBlobs, Vault
from portraits.gateways.wechat import WeChatGateway
from portraits.gateways.xpay import XPayGateway

TEMPLATES_DIR = __import__("pathlib").Path(__file__).resolve().parent.parent / "templates"


@dataclass
class Services:
    settings: Settings
    db: object
    redis: object
    blobs: object
    wechat: WeChatGateway
    payments: PaymentGateway
    xpay: XPayGateway
    catalog: Catalog
    vault: Vault
    sealed: SealedBlobs
    simulator: object = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pipeline: object = field(default=None, repr=False)
    _renderer: object = field(default=None, repr=False)
    _previewer: object = field(default=None, repr=False)
    _analyzer: object = field(default=None, repr=False)
    _judge: object = field(default=None, repr=False)

    def pipeline(self):
        """The base diffusion pipeline, loaded once per process and kept resident between jobs."""
        with self._lock:
            if self._pipeline is None:
                from models.pipeline import load_base_pipeline

                self._pipeline = load_base_pipeline(self.settings.base_model_path)
            return self._pipeline

    def renderer(self):
        pipe = self.pipeline()
        with self._lock:
            if self._renderer is None:
                from models.render import Renderer

                self._renderer = Renderer(pipe, fuse=self.settings.render_fuse_lora,
                                          batch_size=self.settings.render_batch_size,
                                          min_slot_rank=self.settings.render_lora_slot_rank)
            return self._renderer

    def previewer(self):
        """The preview's own pipeline with its image-prompt adapter (models.preview), loaded once per process."""
        with self._lock:
            if self._previewer is None:
                from models.preview import load_previewer

                settings = self.settings
                self._previewer = load_previewer(settings.base_model_path, settings.ip_adapter_path,
                                                 settings.ip_adapter_weight_name, settings.preview_ip_scale)
            return self._previewer

    def training_pipeline(self):
        """The base pipeline without adapters: the renderer's resident LoRA slots are released first (its next
        render puts them back)."""
        pipe = self.pipeline()
        from models.render import release_lora_slots

        release_lora_slots(pipe)
        return pipe

    def candidate_judge(self):
        """The render job's judging thread, with a face analyzer of its own (dlib's objects are not thread-safe)."""
        with self._lock:
            if self._judge is None:
                from models.faces import FaceAnalyzer
                from models.ranking import CandidateJudge

                self._judge = CandidateJudge(FaceAnalyzer)
            return self._judge

    def face_analyzer(self):
        with self._lock:
            if self._analyzer is None:
                from models.faces import FaceAnalyzer

                self._analyzer = FaceAnalyzer()
            return self._analyzer


def build_services(settings: Settings, redis=None) -> Services:
    database = db_module.connect(settings)
    db_module.ensure_indexes(database)
    if redis is None:
        redis = redis_client.connect(settings.redis_url, settings.instance_dir, embedded=settings.embedded)
    blob_store = blobs.open_blob_store(settings.blob_store, settings.blob_root, database)
    vault = Vault(database, settings.master_key)
    wechat = WeChatGateway(appid=settings.wechat_appid, secret=settings.wechat_secret,
                           api_base_url=settings.wechat_api_base, redis=redis)
    return Services(
        settings=settings,
        db=database,
        redis=redis,
        blobs=blob_store,
        vault=vault,
        sealed=SealedBlobs(blob_store, vault),
        wechat=wechat,
        xpay=XPayGateway(wechat=wechat, offer_id=settings.xpay_offer_id, app_key=settings.xpay_app_key,
                         env=settings.xpay_env, api_base_url=settings.wechat_api_base,
                         timeout=settings.wechatpay_timeout_s),
        payments=PaymentGateway(
            mchid=settings.wechatpay_mchid, appid=settings.wechat_appid,
            private_key_pem=settings.wechatpay_private_key_pem, cert_serial_no=settings.wechatpay_cert_serial_no,
            apiv3_key=settings.wechatpay_apiv3_key, public_key_pem=settings.wechatpay_public_key_pem,
            public_key_id=settings.wechatpay_public_key_id, api_base_url=settings.wechatpay_api_base,
            notify_url=settings.public_base_url + "/api/v1/pay/notify",
            refund_notify_url=settings.public_base_url + "/api/v1/pay/refund-notify",
            timeout=settings.wechatpay_timeout_s, callback_max_age_s=settings.callback_max_age_s,
        ),
        catalog=load_catalog(TEMPLATES_DIR),
    )
