# sidegate sidecar image. Listens on loopback by default: in a pod, the agent container
# shares the network namespace, so 127.0.0.1:8005 is reachable from it and from nothing else.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY codecs ./codecs
RUN pip install --no-cache-dir . && useradd --uid 10001 --no-create-home sidegate
USER 10001
ENV SIDEGATE_TRACES=/tmp/sidegate/traces.sqlite
EXPOSE 8005 8006
ENTRYPOINT ["sidegate", "serve"]
