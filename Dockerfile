# The image of every app service in deploy/compose.yaml (the Procfile's web, gpu, worker and clock); compose builds
# it from the repository root. One Dockerfile, two images:
#   CPU (web, worker, clock): the default, torch from PyTorch's CPU index (no CUDA libraries: gigabytes smaller)
#   GPU (gpu):  --build-arg TORCH_INDEX=https://pypi.org/simple, where torch's Linux wheel is the CUDA build of the
#               same version with its nvidia-* libraries; the host brings the driver (compose's gpu reservation)
# tests/test_deploy.py checks this file against the Procfile, requirements.txt and deploy/compose.yaml.
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

# The CJK font the AIGC labels and share posters are drawn with (models/labels.py)
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-wqy-microhei \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# torch first, from TORCH_INDEX: requirements.txt's `torch==2.13.0` is then already met (a `+cpu` local version
# satisfies it) and pip does not fetch PyPI's CUDA build on top. Every other package is requirements.txt's exact pin.
COPY requirements.txt ./
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0 \
    && pip install -r requirements.txt

COPY . .

# Each service names its command (the Procfile's); this one is `web`
CMD ["/bin/sh", "-c", "gunicorn --workers ${WEB_WORKERS:-4} --bind 0.0.0.0:${PORT:-8000} --config gunicorn.conf.py 'miniapp_api:create_app()'"]
