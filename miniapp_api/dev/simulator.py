"""The local WeChat simulator in this process, when EMBEDDED is on and no WeChat base URL is set."""
from __future__ import annotations

from portraits.config import Settings
from portraits.push_events import PUSH_PATH
from wechat_sim.keys import load_or_create_credentials
from wechat_sim.runner import start_simulator


def with_embedded_wechat(settings: Settings):
    """Return (settings pointing at a running local simulator, the simulator) — or (settings, None) when real."""
    if not settings.embedded_wechat:
        return settings, None
    creds = load_or_create_credentials(settings.instance_dir / "wechat_sim")
    # Refunds settle a moment after they are asked for, as WeChat Pay's do; message pushes (content-check verdicts,
    # virtual payment's deliveries and refunds) go to this process's message-push endpoint, in the mode it expects.
    simulator = start_simulator(creds, refund_settle_delay_s=2.0, redelivery_scale=1.0,
                                push_url=push_url(settings), push_mode=settings.wechat_push_mode)
    configured = pointed_at_simulator(settings, creds, simulator.base_url)
    if not configured.subscribe_templates:
        configured = configured.replace(subscribe_templates=dict(DEFAULT_SUBSCRIBE_TEMPLATES))
    return configured, simulator


def push_url(settings: Settings) -> str:
    """Where WeChat sends the mini-program's message pushes (miniapp_api.api.message_push)."""
    return settings.public_base_url + PUSH_PATH


def pointed_at_simulator(settings: Settings, creds, base_url: str) -> Settings:
    """Settings that talk to a WeChat simulator at base_url with its generated credentials."""
    return settings.replace(
        wechat_appid=creds.appid,
        wechat_secret=creds.app_secret,
        wechat_api_base=base_url,
        wechatpay_mchid=creds.mchid,
        wechatpay_private_key_pem=creds.merchant_private_key_pem,
        wechatpay_cert_serial_no=creds.merchant_cert_serial_no,
        wechatpay_apiv3_key=creds.apiv3_key,
        wechatpay_public_key_pem=creds.platform_public_key_pem,
        wechatpay_public_key_id=creds.platform_public_key_id,
        wechatpay_api_base=base_url,
        xpay_offer_id=creds.xpay_offer_id,
        xpay_app_key=creds.xpay_app_key if settings.xpay_env == 0 else creds.xpay_sandbox_app_key,
        wechat_push_token=creds.push_token,
        wechat_push_aes_key=creds.push_aes_key,
    )


DEFAULT_SUBSCRIBE_TEMPLATES = {
    "training_started": "tmpl_training_started",
    "avatar_ready": "tmpl_avatar_ready",
    "portraits_ready": "tmpl_portraits_ready",
    "refund_made": "tmpl_refund_made",
}
