FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos protos
COPY api api
COPY orchestration orchestration
COPY models models
COPY pool pool
COPY agent agent
COPY cli cli
RUN pip install --no-cache-dir .
ENV DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 50051
CMD ["hivemind-pool", "serve"]
