# One image for every pool process (gRPC server, Celery worker, beat, Flower, migrations), the
# reference worker agent and the user CLI; docker-compose.yml picks the command per service.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos protos
COPY api api
COPY orchestration orchestration
COPY models models
COPY pool pool
COPY agent agent
COPY cli cli
RUN pip install . && python -c "import api.server, orchestration.celery, agent.cli, cli.main"
# Flower's settings (named job arguments); compose passes --conf=/app/deploy/flowerconfig.py.
COPY deploy deploy

# Run as an unprivileged user; /data (task and result zips, the pool's signing key, the JWT secret
# when JWT_SECRET_KEY is unset) is a volume every pool process of one deployment shares.
RUN useradd --create-home --uid 10001 hivemind && mkdir -p /data && chown hivemind:hivemind /data
USER hivemind
VOLUME ["/data"]

# gRPC, Prometheus metrics, Flower, a worker agent's WorkerNodeService
EXPOSE 50051 9108 5555 50053
CMD ["hivemind-pool", "serve"]
