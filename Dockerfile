# Admiral Optimizer gateway image.
#   docker build -t admiral-optimizer .
#   docker run -p 8000:8000 -v ./config.yaml:/etc/admiral/config.yaml:ro admiral-optimizer
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system admiral \
    && useradd --system --gid admiral --home-dir /data --no-create-home --shell /usr/sbin/nologin admiral

# The source tree stays in /opt/admiral: `admiral-optimizer migrate` needs migrations/ beside it.
WORKDIR /opt/admiral
COPY . .
RUN pip install .

# The embedded default keeps its SQLite file in the working directory.
WORKDIR /data
RUN chown admiral:admiral /data
VOLUME ["/data"]

ENV ADMIRAL_CONFIG=/etc/admiral/config.yaml

USER admiral
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

CMD ["admiral-optimizer", "serve", "--host", "0.0.0.0", "--port", "8000"]
