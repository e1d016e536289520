# syntax=docker/dockerfile:1
# vkmmu: the KVM x86 MMU over HTTP. Build: `docker build -t vkmmu:0.1.0 .`
# Settings are VKMMU_* environment variables (README "Configuration"); the database defaults
# to a SQLite file in the /var/lib/vkmmu volume, PostgreSQL by VKMMU_DATABASE_URL.

ARG PYTHON_IMAGE=python:3.11.9-slim-bookworm

# --- build: a virtualenv with the pinned dependencies and vkmmu itself -----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/vkmmu/venv
# Dependencies first, from the lock alone: this layer is reused until constraints change.
COPY deploy/constraints.txt /opt/vkmmu/constraints.txt
RUN /opt/vkmmu/venv/bin/pip install --no-deps --requirement /opt/vkmmu/constraints.txt
# The service finds its Alembic scripts beside the package (app/services/lifecycle.py), so
# the source tree stays in place and is installed in editable mode against the same venv.
WORKDIR /opt/vkmmu/src
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY migrations ./migrations
RUN /opt/vkmmu/venv/bin/pip install --no-deps --constraint /opt/vkmmu/constraints.txt \
        --editable . \
    && /opt/vkmmu/venv/bin/pip check \
    && /opt/vkmmu/venv/bin/python -m compileall -q /opt/vkmmu/src/app /opt/vkmmu/src/migrations

# --- runtime: the venv and the source, no compiler, no pip cache, not root --------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="vkmmu" \
      org.opencontainers.image.description="A reference simulator of the KVM x86 MMU, served over HTTP"
RUN groupadd --system --gid 10001 vkmmu \
    && useradd --system --uid 10001 --gid vkmmu --home-dir /var/lib/vkmmu --create-home \
        --shell /usr/sbin/nologin vkmmu
COPY --from=build /opt/vkmmu /opt/vkmmu
ENV PATH=/opt/vkmmu/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VKMMU_PORT=8000 \
    VKMMU_DATABASE_URL=sqlite+aiosqlite:////var/lib/vkmmu/vkmmu.db
USER 10001:10001
WORKDIR /var/lib/vkmmu
VOLUME ["/var/lib/vkmmu"]
EXPOSE 8000
# Liveness over the loopback with the image's own Python (a slim image has no curl).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VKMMU_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["vkmmu"]
CMD ["serve", "--host", "0.0.0.0"]
