"""deploy/compose.yaml describes the Procfile's system: the same roles running the same commands, a durable Redis
that never evicts a job, a MongoDB replica set initiated before the app starts, and the probes the README names."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
ROLES = ("web", "gpu", "worker", "intake", "clock")
APP_ENVIRONMENT_REQUIRED = {"MONGO_URI", "REDIS_URL", "BLOB_STORE", "PROMETHEUS_MULTIPROC_DIR"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def procfile() -> dict[str, str]:
    roles = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            roles[name.strip()] = command.strip()
    return roles


def test_every_procfile_role_is_a_service_running_the_same_command(compose, procfile):
    assert set(procfile) == set(ROLES)
    for role, command in procfile.items():
        shell, flag, line = compose["services"][role]["command"]
        assert (shell, flag) == ("/bin/sh", "-c"), role
        # `$$` is compose's escape for a `$` left to the container's shell, as the Procfile's runner leaves it
        assert line.replace("$$", "$") == command, role


def test_the_app_services_share_the_settings_and_wait_for_their_stores(compose):
    for role in ROLES:
        service = compose["services"][role]
        assert APP_ENVIRONMENT_REQUIRED <= set(service["environment"]), role
        assert service["environment"]["BLOB_STORE"] == "gridfs", role  # blobs reachable from every machine
        assert service["environment"]["PROMETHEUS_MULTIPROC_DIR"] in service["tmpfs"], role  # empty at each start
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"},
                                         "mongo-init": {"condition": "service_completed_successfully"}}, role


def test_redis_keeps_an_append_only_file_synced_every_second_and_never_evicts(compose):
    command = compose["services"]["redis"]["command"]
    options = dict(zip(command[1::2], command[2::2]))
    assert command[0] == "redis-server"
    assert options == {"--appendonly": "yes", "--appendfsync": "everysec", "--maxmemory-policy": "noeviction"}
    assert any(volume.endswith(":/data") for volume in compose["services"]["redis"]["volumes"])


def test_mongodb_is_a_replica_set_initiated_once_and_the_app_connects_to_it(compose):
    mongo = compose["services"]["mongo"]["command"]
    replica_set = mongo[mongo.index("--replSet") + 1]
    init = compose["services"]["mongo-init"]
    assert init["depends_on"] == {"mongo": {"condition": "service_healthy"}} and init["restart"] == "no"
    assert "rs.initiate(" in init["command"][-1] and f"_id: '{replica_set}'" in init["command"][-1]
    for role in ROLES:
        assert f"replicaSet={replica_set}" in compose["services"][role]["environment"]["MONGO_URI"], role


def test_the_probes_are_the_ones_the_processes_offer(compose):
    services = compose["services"]
    assert "/readyz" in " ".join(services["web"]["healthcheck"]["test"])
    for role, kind in (("gpu", "gpu"), ("worker", "default"), ("intake", "intake")):
        assert services[role]["healthcheck"]["test"] == ["CMD", "python", "-m", "jobs.worker", kind, "--check"]
    assert services["gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
