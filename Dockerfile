# fastpath-gateway: multi-stage image (docs: README "Deployment").
#   docker build -t fastpath-gateway .
#   docker run -p 8080:8080 -v $PWD/gateway.yaml:/etc/fastpath/gateway.yaml:ro fastpath-gateway
# Stage 1 builds the Rust extension (maturin, release) into a wheel; stage 2 installs that wheel
# and its dependencies into a venv; the final stage is python slim + the venv, run as a non-root
# user. Checked offline by `make test-deploy` (hadolint + tests/deploy).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RUST_IMAGE=rust:1.85-slim-bookworm

# ---- build: the wheel (Rust extension + Python package) ---------------------------------------
FROM ${RUST_IMAGE} AS build
# not pinned: the base image's Debian release fixes python3 at 3.11.x; point releases come and go
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/maturin \
    && /opt/maturin/bin/pip install --no-cache-dir "maturin>=1.8,<2"
WORKDIR /src
# the whole workspace: cargo resolves every member (crates/bench too) before building one
COPY Cargo.toml Cargo.lock pyproject.toml README.md ./
COPY crates ./crates
COPY python ./python
RUN /opt/maturin/bin/maturin build --release --locked --out /wheels

# ---- deps: a venv with the wheel and its dependencies, built where compilers exist -------------
FROM ${PYTHON_IMAGE} AS deps
COPY --from=build /wheels /wheels
RUN python -m venv /opt/fastpath \
    && /opt/fastpath/bin/pip install --no-cache-dir /wheels/*.whl

# ---- final: slim, non-root ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="fastpath-gateway" \
      org.opencontainers.image.description="OpenAI-compatible LLM gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 fastpath \
    && useradd --system --uid 10001 --gid fastpath --home-dir /var/lib/fastpath --create-home \
       --shell /usr/sbin/nologin fastpath
COPY --from=deps /opt/fastpath /opt/fastpath
ENV PATH=/opt/fastpath/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FASTPATH_GATEWAY_CONFIG=/etc/fastpath/gateway.yaml \
    FASTPATH_GATEWAY_HOST=0.0.0.0 \
    FASTPATH_GATEWAY_PORT=8080 \
    FASTPATH_GATEWAY_DATA_DIR=/var/lib/fastpath
USER 10001:10001
WORKDIR /var/lib/fastpath
EXPOSE 8080
# no curl in the slim image: the interpreter that is there asks /healthz
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FASTPATH_GATEWAY_PORT', '8080'), timeout=2)"]
# exec form: the gateway is PID 1 and gets SIGTERM itself (granian drains, then stops its workers)
ENTRYPOINT ["fastpath-gateway"]
CMD ["serve", "--config", "/etc/fastpath/gateway.yaml"]
