# syntax=docker/dockerfile:1
# The example app (example_app/) on asgi_ratelimit, as a small non-root image; it carries the decision service too.
#
#   docker build -t asgi-ratelimit-example:0.1.0 .
#   docker run --rm -p 8000:8000 asgi-ratelimit-example:0.1.0                      # in-memory counts
#   docker run --rm -p 8000:8000 -e REDIS_URL=redis://redis:6379/0 asgi-ratelimit-example:0.1.0
#
# The decision service (POST /check), configured by ASGI_RATELIMIT_* variables, its token from a file:
#   docker run --rm -p 8080:8080 -e ASGI_RATELIMIT_REDIS_URL=redis://redis:6379/0 -e ASGI_RATELIMIT_WORKERS=2 \
#     -v "$PWD/token:/run/secrets/token:ro" -e ASGI_RATELIMIT_TOKEN_FILE=/run/secrets/token \
#     asgi-ratelimit-example:0.1.0 asgi-ratelimit serve
#
# Stage 1 builds wheels (the package and its runtime dependencies), so the final image carries no
# build tools, no pip cache and no source tree beyond the example app itself.
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY asgi_ratelimit ./asgi_ratelimit
RUN pip wheel --wheel-dir /wheels ".[hiredis,jwt,server]"

FROM python:${PYTHON_VERSION}-slim AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# `asgi-ratelimit serve` listens on every interface in a container, as the example app does (its default
# elsewhere is loopback); without a token it logs a WARNING at start.
ENV ASGI_RATELIMIT_HOST=0.0.0.0 ASGI_RATELIMIT_PORT=8080
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels /wheels/*.whl
# A numeric user: Kubernetes can then check runAsNonRoot without knowing the image's /etc/passwd.
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid app --no-create-home app
WORKDIR /app
COPY --chown=root:root example_app ./example_app
USER 10001:10001
# The example app, and the decision service when the image runs `asgi-ratelimit serve`.
EXPOSE 8000 8080
# Liveness only: /health/live never touches Redis (see docs/operations.md). Slim images have no curl.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health/live', timeout=2)"]
CMD ["python", "-m", "example_app", "--host", "0.0.0.0", "--port", "8000"]
