# One image for every Stepline process: stepline, stepline-worker, stepline-scheduler.
# Configured only by environment variables (STEPLINE_*, OTEL_*); see docker-compose.yml.
# Your own workflows: build FROM this image, COPY your modules into /app (or mount them
# there), and run `stepline-worker --workflows your.module`.

# --- build: install the stepline distribution (not editable) into a virtualenv
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stepline/__init__.py stepline/cli.py stepline/py.typed ./stepline/
COPY shared ./shared
COPY worker ./worker
COPY scheduler ./scheduler
COPY producer ./producer
RUN python -m venv /opt/stepline && /opt/stepline/bin/pip install .

# --- runtime: the virtualenv and the examples, run as an unprivileged user
FROM python:3.11-slim
ENV PATH=/opt/stepline/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin stepline
COPY --from=build /opt/stepline /opt/stepline
# Workflow modules are named relative to the working directory: `--workflows examples.order_fulfilment`.
WORKDIR /app
COPY examples ./examples
# Numeric, so a runtime that cannot read /etc/passwd still runs it unprivileged.
USER 10001:10001
CMD ["stepline", "--help"]
