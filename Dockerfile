# The swarmlog processes, for docker-compose.yml (not used by the local stack, which
# needs no Docker).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY commands commands
COPY projections projections
COPY streams streams
COPY api api
COPY infra infra
COPY sdk sdk
COPY demo demo
COPY bench bench
RUN pip install --no-cache-dir .
ENTRYPOINT ["swarmlog"]
