"""The README's configuration table is the declarations' own, bad values fail early, and without EMBEDDED nothing
starts on in-process stand-ins."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from portraits import products
from portraits.config import ConfigError, Settings, markdown_table
from wechat_sim.keys import generate_credentials

ROOT = Path(__file__).resolve().parent.parent
TABLE = re.compile(r"<!-- settings table: python -m portraits\.config --markdown -->\n(.*?)<!-- end of settings table -->",
                   re.S)
REAL_DEPLOYMENT = ["MONGO_URI", "REDIS_URL", "SECRET_KEY", "MASTER_KEY", "PUBLIC_BASE_URL", "WECHAT_APPID",
                   "WECHAT_SECRET", "WECHATPAY_MCHID", "WECHATPAY_PRIVATE_KEY_PATH", "WECHATPAY_CERT_SERIAL_NO",
                   "WECHATPAY_APIV3_KEY", "WECHATPAY_PUBLIC_KEY_PATH", "WECHATPAY_PUBLIC_KEY_ID", "WECHAT_PUSH_TOKEN",
                   "WECHAT_PUSH_AES_KEY", "ALGORITHM_FILING_NUMBER", "GENAI_FILING_NUMBER", "MODEL_NAME",
                   "MODEL_PROVIDER"]
FILED = {"ALGORITHM_FILING_NUMBER": "网信算备110108000000001240011号", "GENAI_FILING_NUMBER": "Beijing-MiaoXiang-20260101",
         "MODEL_NAME": "妙像写真大模型 v1", "MODEL_PROVIDER": "妙像科技有限公司"}


def test_the_readme_table_is_generated_from_the_declarations():
    found = TABLE.search((ROOT / "README.md").read_text())
    assert found, "README.md lost its settings table markers"
    assert found.group(1) == markdown_table(), "regenerate it: python -m portraits.config --markdown"


def test_every_setting_read_from_the_environment_has_a_row_and_a_meaning():
    rows = [line for line in markdown_table().splitlines()[2:]]
    names = [re.match(r"\| `([A-Z0-9_]+)` \|", row).group(1) for row in rows]
    assert len(names) == len(set(names))
    assert {"EMBEDDED", "MONGO_URI", "WECHATPAY_PRIVATE_KEY_PATH", "MASTER_KEY"} <= set(names)
    assert all(row.count("|") == 4 and not row.endswith("|  |") for row in rows)


def test_defaults_are_the_embedded_ones(tmp_path):
    settings = Settings.from_env({"INSTANCE_DIR": str(tmp_path), "EMBEDDED": "1"})
    assert settings.embedded and settings.embedded_wechat and settings.uses_tiny_model
    assert settings.mongo_uri is None and settings.redis_url is None
    assert settings.skus["avatar_pack"]["amount"] == 990
    assert (settings.min_photos, settings.max_photos) == (8, 30)
    assert (settings.train_steps, settings.train_resolution, settings.render_max_steps) == (30, 64, 4)
    assert settings.refund_backoff_s == (5, 30, 120, 600, 1800)
    assert len(settings.master_key) == 32
    assert Settings.from_env({"INSTANCE_DIR": str(tmp_path), "EMBEDDED": "true"}).secret_key == settings.secret_key
    assert settings.replace(min_photos=3).min_photos == 3 and settings.min_photos == 8
    assert settings.disclosure_placeholders == ["algorithm_filing_number", "genai_filing_number", "model_name",
                                                "model_provider"]
    assert settings.require_phone is True


def test_without_embedded_every_missing_setting_is_named_and_nothing_is_generated(tmp_path):
    with pytest.raises(ConfigError) as error:
        Settings.from_env({"INSTANCE_DIR": str(tmp_path)})
    for name in REAL_DEPLOYMENT:
        assert name in str(error.value)
    assert "EMBEDDED" in str(error.value)
    assert not (tmp_path / "secret_key").exists() and not (tmp_path / "master_key").exists()


def test_a_real_deployment_starts_from_the_environment(tmp_path):
    creds = generate_credentials()
    (tmp_path / "merchant.pem").write_text(creds.merchant_private_key_pem)
    (tmp_path / "platform.pem").write_text(creds.platform_public_key_pem)
    env = {"MONGO_URI": "mongodb://db:27017", "REDIS_URL": "redis://cache:6379/0", "SECRET_KEY": "s" * 48,
           "MASTER_KEY": base64.urlsafe_b64encode(b"A" * 32).decode(),
           "PUBLIC_BASE_URL": "https://api.example.com/",
           "WECHAT_APPID": creds.appid, "WECHAT_SECRET": creds.app_secret, "WECHATPAY_MCHID": creds.mchid,
           "WECHATPAY_PRIVATE_KEY_PATH": str(tmp_path / "merchant.pem"),
           "WECHATPAY_CERT_SERIAL_NO": creds.merchant_cert_serial_no, "WECHATPAY_APIV3_KEY": creds.apiv3_key,
           "WECHATPAY_PUBLIC_KEY_PATH": str(tmp_path / "platform.pem"),
           "WECHATPAY_PUBLIC_KEY_ID": creds.platform_public_key_id, "REFUND_BACKOFF_S": "1, 2,3",
           "WECHAT_PUSH_TOKEN": creds.push_token, "WECHAT_PUSH_AES_KEY": creds.push_aes_key,
           "CONSOLE_SECURE_COOKIES": "off", "BASE_MODEL_PATH": "/models/sd15", "INSTANCE_DIR": str(tmp_path),
           **FILED}
    settings = Settings.from_env(env)
    assert (settings.algorithm_filing_number, settings.model_provider) == (FILED["ALGORITHM_FILING_NUMBER"],
                                                                            FILED["MODEL_PROVIDER"])
    assert settings.disclosure_placeholders == []
    assert not settings.embedded and not settings.embedded_wechat and not settings.uses_tiny_model
    assert settings.master_key == b"A" * 32 and settings.public_base_url == "https://api.example.com"
    assert settings.wechatpay_private_key_pem == creds.merchant_private_key_pem
    assert settings.refund_backoff_s == (1, 2, 3) and settings.console_secure_cookies is False
    assert settings.wechat_push_aes_key == creds.push_aes_key and settings.wechat_push_mode == "safe"
    assert (settings.train_steps, settings.train_resolution, settings.render_max_steps) == (None, 512, None)
    with pytest.raises(ConfigError) as error:
        settings.replace(mongo_uri=None)
    assert "MONGO_URI" in str(error.value) and "REDIS_URL" not in str(error.value)


def test_embedded_with_a_wechat_base_url_needs_the_wechat_keys(tmp_path):
    with pytest.raises(ConfigError) as error:
        Settings.from_env({"INSTANCE_DIR": str(tmp_path), "EMBEDDED": "1", "WECHAT_API_BASE": "http://127.0.0.1:9"})
    assert "WECHATPAY_APIV3_KEY" in str(error.value) and "MONGO_URI" not in str(error.value)


@pytest.mark.parametrize("env", [{"MIN_PHOTOS": "many"}, {"BLOB_STORE": "s3"}, {"SKUS": "{not json"},
                                 {"MASTER_KEY": "c2hvcnQ="}, {"REFUND_BACKOFF_S": "5,soon"},
                                 {"CONSOLE_SECURE_COOKIES": "maybe"}, {"EMBEDDED": "perhaps"},
                                 {"WECHATPAY_TIMEOUT_S": "fast"}, {"WECHATPAY_PRIVATE_KEY_PATH": "/no/such/key.pem"}])
def test_bad_values_stop_start_up_with_the_variable_named(tmp_path, env):
    with pytest.raises(ConfigError) as error:
        Settings.from_env({"INSTANCE_DIR": str(tmp_path), "EMBEDDED": "1", **env})
    assert next(iter(env)) in str(error.value)


@pytest.mark.parametrize("product, problem", [
    ({"min_photos": 0}, "pack.min_photos"), ({"min_photos": "3"}, "pack.min_photos"),
    ({"render_plan": {"images": 100}}, "pack.render_plan"), ({"render_plan": {"images": 10, "batch": 0}},
                                                             "pack.render_plan")])
def test_a_product_s_photo_minimum_and_render_plan_are_checked_at_start_up(tmp_path, product, problem):
    skus = {"pack": {"amount": 990, "render_sets": 0, "description": "pack", **product}}
    with pytest.raises(ConfigError) as error:
        Settings.from_env({"INSTANCE_DIR": str(tmp_path), "EMBEDDED": "1", "SKUS": json.dumps(skus)})
    assert "SKUS" in str(error.value) and problem in str(error.value)


def test_the_default_products_keep_the_portrait_pack_s_minimum_and_add_the_100_avatar_pack(tmp_path):
    settings = Settings.from_env({"INSTANCE_DIR": str(tmp_path), "EMBEDDED": "1"})
    assert products.min_photos(settings, "avatar_pack") == settings.min_photos == 8
    assert products.render_plan(settings, "avatar_pack") is None
    assert settings.skus["pack_100"]["amount"] == 990
    assert products.min_photos(settings, "pack_100") == 3
    assert products.render_plan(settings, "pack_100") == {"images": 100, "batch": 10}


def _create_app(tmp_path, **env):
    """`gunicorn 'miniapp_api:create_app()'` in a clean environment, without gunicorn: the same factory call."""
    code = "from miniapp_api import create_app; app = create_app(); print(app.test_client().get('/healthz').json)"
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
             "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean, capture_output=True, text=True,
                          timeout=300)


def test_the_web_app_refuses_to_start_on_a_clean_environment(tmp_path):
    done = _create_app(tmp_path)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("portraits.config.ConfigError: missing settings:"), done.stderr
    for name in REAL_DEPLOYMENT:
        assert name in last
    assert not (tmp_path / "instance").exists()  # no generated secrets, no embedded Redis, no simulator keys


def test_the_web_app_starts_embedded_when_asked(tmp_path):
    done = _create_app(tmp_path, EMBEDDED="1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "{'ok': True}"
