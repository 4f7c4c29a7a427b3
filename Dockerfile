# One image for every process; the Kubernetes manifests (deploy/k8s) pick the console script.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY orders orders
COPY write_service write_service
COPY read_service read_service
COPY sync_worker sync_worker
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --no-create-home orders
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
# Logs go to stdout/stderr as JSON lines (not a terminal); the services need no writable disk.
ENV PYTHONUNBUFFERED=1
CMD ["orders-write-service", "--help"]
