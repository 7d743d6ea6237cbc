"""deploy/compose.yaml describes the Procfile's system: the same roles running the same commands, a durable Redis
that never evicts a job, a MongoDB replica set initiated before the app starts, and the probes the README names.
The Dockerfile it builds is parsed too (no docker here): the image has what the Procfile's commands need."""
from __future__ import annotations

import fnmatch
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from miniapp_api.dev.supervisor import read_procfile
from models.labels import CJK_FONT_PACKAGE

ROOT = Path(__file__).resolve().parent.parent
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
ROLES = ("web", "gpu", "worker", "intake", "clock")
APP_ENVIRONMENT_REQUIRED = {"MONGO_URI", "REDIS_URL", "BLOB_STORE", "PROMETHEUS_MULTIPROC_DIR"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def procfile() -> dict[str, str]:
    return read_procfile(ROOT / "Procfile")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, `\\` continuations joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text())


def arguments_of(instructions, keyword: str) -> list[str]:
    return [arguments for found, arguments in instructions if found == keyword]


def pins(requirements: Path) -> dict[str, str]:
    found = {}
    for line in requirements.read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name, equals, version = requirement.partition("==")
            assert equals and version and not re.search(r"[<>=!~*,; ]", version), f"not pinned exactly: {line}"
            found[re.sub(r"\[.*\]", "", name).lower()] = version
    return found


def ignored_by(dockerignore: Path, relative: str) -> bool:
    patterns = [line.strip().rstrip("/") for line in dockerignore.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = Path(relative).parts
    prefixes = ["/".join(parts[:length]) for length in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatch(prefix, pattern)
               for pattern in patterns for prefix in prefixes)


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


def test_the_app_services_are_built_from_the_repositorys_dockerfile_into_the_directory_they_run_in(compose,
                                                                                                    dockerfile):
    deploy = ROOT / "deploy"
    (workdir,) = arguments_of(dockerfile, "WORKDIR")
    for role in ROLES:
        service = compose["services"][role]
        build = service["build"]
        assert (deploy / build["context"]).resolve() == ROOT, role
        assert (deploy / build["context"] / build["dockerfile"]).resolve() == ROOT / "Dockerfile", role
        assert service["image"], role  # built once, tagged, reused by the services of the same build
        assert service["working_dir"] == workdir, role


def test_the_image_runs_the_python_the_pins_are_tested_on_with_the_cjk_font(dockerfile):
    (base,) = arguments_of(dockerfile, "FROM")
    assert base == f"python:{sys.version_info.major}.{sys.version_info.minor}-slim"
    installs = " ".join(arguments_of(dockerfile, "RUN"))
    assert re.search(rf"apt-get install [^&]*\b{re.escape(CJK_FONT_PACKAGE)}\b", installs), installs


def test_the_image_installs_requirements_txt_pinned_and_torch_from_the_index_its_role_needs(compose, dockerfile):
    required = pins(ROOT / "requirements.txt")  # every line an exact pin
    assert "requirements.txt" in " ".join(arguments_of(dockerfile, "COPY")).split()
    installs = " ".join(arguments_of(dockerfile, "RUN"))
    assert "pip install -r requirements.txt" in installs
    torch = re.search(r'pip install --index-url "?\$\{?TORCH_INDEX\}?"? torch==(\S+)', installs)
    assert torch, installs
    assert torch.group(1) == required["torch"]  # the same torch, whichever build of it
    # first, so that requirements.txt's torch pin is already met by the index's build
    assert installs.index(torch.group(0)) < installs.index("pip install -r requirements.txt")
    assert f"TORCH_INDEX={CPU_TORCH_INDEX}" in arguments_of(dockerfile, "ARG")
    for role in ROLES:
        index = compose["services"][role]["build"]["args"]["TORCH_INDEX"]
        if role == "gpu":
            assert index != CPU_TORCH_INDEX and compose["services"]["gpu"]["image"] != compose["services"]["web"]["image"]
        else:
            assert index == CPU_TORCH_INDEX, role


def test_the_image_has_what_every_procfile_command_runs(dockerfile, procfile):
    assert "requirements.txt" in arguments_of(dockerfile, "COPY")[0]  # the dependencies before the code (cached)
    assert ". ." in arguments_of(dockerfile, "COPY")  # the repository, less .dockerignore
    dockerignore = ROOT / ".dockerignore"
    required = pins(ROOT / "requirements.txt")
    for role, command in procfile.items():
        words = shlex.split(command)
        program = words[0]
        assert program == "python" or program in required, (role, program)  # the base image's python, or a pin
        named = [word for word in words if word.endswith(".py")]
        named += [word.replace(".", "/") for word in words[words.index("-m") + 1:][:1]] if "-m" in words else []
        named += [re.sub(r"[:(].*", "", word) for word in words if ":" in word and "(" in word]  # the WSGI app
        for relative in named:
            assert (ROOT / relative).exists() or (ROOT / f"{relative}.py").exists(), (role, relative)
            assert not ignored_by(dockerignore, relative), (role, relative)
    for needed in ("templates", "portraits", "models", "jobs", "miniapp_api"):
        assert not ignored_by(dockerignore, needed), needed
    for local_state in (".venv", "instance", ".git", "jobs/__pycache__"):
        assert ignored_by(dockerignore, local_state), local_state


def test_the_images_default_command_is_the_procfiles_web(dockerfile, procfile):
    (command,) = arguments_of(dockerfile, "CMD")
    shell, flag, line = yaml.safe_load(command)  # a JSON array
    assert (shell, flag, line) == ("/bin/sh", "-c", procfile["web"])
