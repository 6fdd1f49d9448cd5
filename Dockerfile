# relayd in a container: build with `docker build -t relayd .`, see docs/deployment.md.
#
# Two stages: the builder installs relayd and its dependencies into a virtual env at
# /opt/relayd; the final image copies that env alone, so no build leftovers (sources, build
# backends, wheels) ship. Both stages use the same base image, so the env's interpreter path
# (/usr/local/bin/python3.12) is valid in both.
# tests/test_container.py replays this file's `python -m venv` and `pip install` commands and
# runs its HEALTHCHECK command against a live relay: keep them plain commands joined by &&.

FROM python:3.12-slim AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

# The build context is filtered by .dockerignore down to pyproject.toml, README.md and relayd/.
WORKDIR /src
COPY . .

# `pip install .` builds relayd's wheel and resolves its dependencies from pyproject.toml; the
# versions are bounded there, which is why the install is not pinned here. pip byte-compiles
# as it installs, so the read-only env starts fast for the unprivileged user.
RUN python -m venv /opt/relayd \
    && /opt/relayd/bin/pip install --no-cache-dir .


FROM python:3.12-slim

# A fixed, unprivileged uid, so volume ownership and `docker run --user` stay predictable.
# --no-log-init: a large uid would otherwise grow /var/log/faillog into a sparse giant.
RUN groupadd --system --gid 10001 relayd \
    && useradd --system --no-log-init --uid 10001 --gid relayd \
        --home-dir /var/lib/relayd --shell /usr/sbin/nologin relayd \
    && mkdir -p /etc/relayd /var/lib/relayd \
    && chown relayd:relayd /var/lib/relayd \
    && chmod 0700 /var/lib/relayd

COPY --from=builder /opt/relayd /opt/relayd

# PATH: `relayd` and `python` are the env's. RELAYD_CONFIG: mount the config read-only there.
# STATE_DIRECTORY: relayd's default state_dir (outbox, sign-in caches), a volume below.
# PYTHONUNBUFFERED: log lines reach `docker logs` as they are written.
ENV PATH=/opt/relayd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAYD_CONFIG=/etc/relayd/config.yaml \
    STATE_DIRECTORY=/var/lib/relayd \
    RELAYD_HEALTH_URL=http://127.0.0.1:9464/healthz

# Numeric, so runtimes (and Kubernetes' runAsNonRoot) can tell it is not root without the
# image's /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/relayd
VOLUME ["/var/lib/relayd"]

# The admin endpoint (/healthz, /metrics). The config must say `admin: {listen: 0.0.0.0:9464}`
# for a published port to reach it; the health check below uses 127.0.0.1 inside.
EXPOSE 9464

# No curl in a slim image: the interpreter that is here anyway does the GET. urlopen raises for
# a refused connection, a timeout and any status >= 400; proxies are bypassed on purpose, since
# an inherited HTTP_PROXY must not carry a loopback probe elsewhere.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as u\ntry:\n    u.build_opener(u.ProxyHandler({})).open(os.environ.get('RELAYD_HEALTH_URL', 'http://127.0.0.1:9464/healthz'), timeout=5).close()\nexcept Exception as exc:\n    sys.exit(f'unhealthy: {exc}')"]

# relayd handles SIGTERM itself: stop watching, let deliveries in flight finish, commit the
# outbox. Give it `docker stop -t` longer than shutdown_grace. SIGHUP reloads the config.
STOPSIGNAL SIGTERM
ENTRYPOINT ["relayd"]
CMD ["run"]
