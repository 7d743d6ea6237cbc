"""Every environment variable the service reads is in the README's configuration table, and bad values fail early."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from miniapp_api.config import ConfigError, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_variable_read_is_documented_in_the_readme_table():
    read = set(re.findall(r"""env(?:\.get)?\(\s*["']([A-Z0-9_]+)["']""", (ROOT / "miniapp_api/config.py").read_text()))
    read |= set(re.findall(r"""_(?:number|choice|json|flag)\(\s*env,\s*["']([A-Z0-9_]+)["']""",
                           (ROOT / "miniapp_api/config.py").read_text()))
    table = "\n".join(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `"))
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    assert read, "no variables found: the pattern above is out of date"
    assert read - documented == set()


def test_defaults_are_the_embedded_ones(tmp_path):
    settings = Settings.from_env({"INSTANCE_DIR": str(tmp_path)})
    assert settings.embedded_wechat and settings.uses_tiny_model
    assert settings.mongo_uri is None and settings.redis_url is None
    assert settings.skus["avatar_pack"]["amount"] == 990
    assert (settings.min_photos, settings.max_photos) == (8, 30)
    assert len(settings.master_key) == 32
    assert Settings.from_env({"INSTANCE_DIR": str(tmp_path)}).secret_key == settings.secret_key


@pytest.mark.parametrize("env", [{"MIN_PHOTOS": "many"}, {"BLOB_STORE": "s3"}, {"SKUS": "{not json"},
                                 {"MASTER_KEY": "c2hvcnQ="}])
def test_bad_values_stop_start_up_with_the_variable_named(tmp_path, env):
    with pytest.raises(ConfigError) as error:
        Settings.from_env({"INSTANCE_DIR": str(tmp_path), **env})
    assert next(iter(env)) in str(error.value)
