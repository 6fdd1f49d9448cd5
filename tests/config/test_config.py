"""Tests for relayd.config: models, defaults, environment substitution and error messages."""

import base64
import pickle
import re
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from relayd.config import (
    AccountConfig,
    Config,
    ConfigError,
    ConfigIssue,
    DriveConfig,
    WebhookConfig,
    load_config,
    parse_config,
    parse_duration,
    resource_path,
)

REPO = Path(__file__).resolve().parents[2]
SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"o" * 24).decode()
CLIENT_ID = "00000000-0000-0000-0000-000000000000"

# A small valid configuration; tests append to it or change a line.
BASE = f"""\
accounts:
  ci:
    token_command: get-token --for graph
  work:
    client_id: {CLIENT_ID}
webhooks:
  downstream:
    url: https://hooks.example/onedrive
    secret: {SECRET}
drives:
  - name: alice
    account: ci
    resource: me
    webhook: downstream
"""


def parse(
    text: str, env: dict[str, str] | None = None, base_dir: Path = Path("/etc/relayd")
) -> Config:
    return parse_config(
        textwrap.dedent(text), filename="config.yaml", env=env or {}, base_dir=base_dir
    )


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(text, env)
    assert str(caught.value) == "\n".join(str(issue) for issue in caught.value.issues)
    return [str(issue) for issue in caught.value.issues]


# --------------------------------------------------------------------------- defaults


def test_an_empty_file_is_refused() -> None:
    # A file truncated by a failed write must not reload into a relay with no drives.
    for text in ("", "# nothing configured yet\n", "---\n", "~\n"):
        assert problems(text) == [
            "config.yaml: the file is empty; see config.example.yaml for what goes in it"
        ]


def test_a_file_of_empty_lists_gives_all_defaults() -> None:
    config = parse("drives: []\n")

    assert config.graph.base_url == "https://graph.microsoft.com/v1.0"
    assert config.state_dir == Path("state").absolute()
    assert config.shutdown_grace == 5.0
    assert config.admin.listen == "127.0.0.1:9464"
    assert (config.admin.enabled, config.admin.host, config.admin.port) == (True, "127.0.0.1", 9464)
    assert (config.log.level, config.log.format) == ("info", "json")
    assert config.outbox.delivered_retention == 7 * 86400
    assert (config.accounts, config.webhooks, config.drives) == ({}, {}, ())


def test_section_defaults() -> None:
    config = parse(BASE)

    work = config.accounts["work"]
    assert work.kind == "msal"
    assert work.tenant == "organizations"
    assert work.authority_host == "https://login.microsoftonline.com"
    assert work.scopes == ("Files.Read",)
    hook = config.webhooks["downstream"]
    assert hook.headers == {}
    assert hook.timeout == 15.0
    assert hook.secrets == hook.secret == (SECRET,)
    assert hook.secret_file is None
    assert (hook.concurrency, hook.ordered) == (8, False)
    assert (hook.retry.initial_delay, hook.retry.max_delay, hook.retry.max_age) == (
        5.0,
        3600.0,
        3 * 86400.0,
    )
    assert config.drives == (
        DriveConfig(name="alice", account="ci", resource="me", webhook=("downstream",)),
    )


def test_empty_sections_mean_defaults() -> None:
    config = parse("graph:\nadmin:\nlog:\naccounts:\nwebhooks:\ndrives:\n")

    assert config == parse("drives: []\n")


def test_values_are_normalised() -> None:
    config = parse(
        f"""\
        graph: {{base_url: "https://graph.microsoft.us/v1.0/"}}
        admin: {{listen: "[::1]:0"}}
        log: {{level: DEBUG, format: console}}
        accounts:
          gov:
            client_id: {CLIENT_ID}
            authority_host: https://login.microsoftonline.us/
            scopes: Files.Read Sites.Read.All
        webhooks:
          a:
            url: http://localhost:8080/hook
            headers: {{X-Retries: 3, X-Flag: yes}}
            secret: [{SECRET}, {OTHER_SECRET}]
        """
    )

    assert config.graph.base_url == "https://graph.microsoft.us/v1.0"
    assert (config.admin.host, config.admin.port) == ("::1", 0)
    assert config.log.level == "debug"
    assert config.accounts["gov"].authority_host == "https://login.microsoftonline.us"
    assert config.accounts["gov"].scopes == ("Files.Read", "Sites.Read.All")
    assert config.webhooks["a"].headers == {"X-Retries": "3", "X-Flag": "true"}
    assert config.webhooks["a"].secrets == (SECRET, OTHER_SECRET)


def test_admin_endpoint_can_be_turned_off() -> None:
    assert parse('admin: {listen: ""}').admin.enabled is False
    assert parse("admin:\n  listen:\n").admin.enabled is False


def test_account_kinds() -> None:
    config = parse(
        """\
        accounts:
          a: {client_id: 00000000-0000-0000-0000-000000000000}
          b: {token_command: "az account get-access-token --query 'access token'"}
          c: {token_file: secrets/graph-token}
        """
    )

    assert [account.kind for account in config.accounts.values()] == ["msal", "command", "file"]
    assert config.accounts["b"].token_argv == (
        "az",
        "account",
        "get-access-token",
        "--query",
        "access token",
    )
    assert config.accounts["c"].token_file == Path("/etc/relayd/secrets/graph-token")


def test_drive_webhook_list_and_graph_path() -> None:
    config = parse(
        BASE
        + """\
  - name: team.docs_2
    account: work
    resource: sites/contoso.sharepoint.com,1111,2222/lists/3333
    webhook: [downstream]
"""
    )

    drive = config.drives[1]
    assert drive.webhook == ("downstream",)
    assert drive.drive_path == "sites/contoso.sharepoint.com,1111,2222/lists/3333/drive"


def test_yaml_merge_keys_work() -> None:
    config = parse(
        f"""\
        webhooks:
          a: &hook
            url: https://a.example/
            secret: {SECRET}
            retry: {{max_age: 1d}}
          b:
            <<: *hook
            url: https://b.example/
        """
    )

    assert config.webhooks["b"].url == "https://b.example/"
    assert config.webhooks["b"].retry.max_age == 86400
    assert config.webhooks["b"].secrets == (SECRET,)


# --------------------------------------------------------------------------- example file


def test_example_config_loads_with_its_environment_variables_set() -> None:
    path = REPO / "config.example.yaml"
    text = path.read_text()
    # Every ${NAME} in it (not ${NAME:-default}) must be set; the secret one gets a valid secret.
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
    assert "RELAYD_WEBHOOK_SECRET" in required

    config = load_config(path, env=dict.fromkeys(required, SECRET))

    assert {account.kind for account in config.accounts.values()} >= {"msal", "command"}
    assert config.webhooks["downstream"].secrets == (SECRET,)
    resources = [drive.resource for drive in config.drives]
    assert resources[0] == "me"
    assert resources[1].startswith("sites/") and "/lists/" in resources[1]
    accounts = {config.accounts[drive.account].kind for drive in config.drives}
    assert accounts == {"msal", "command"}


def test_example_config_without_its_environment_fails_clearly() -> None:
    path = REPO / "config.example.yaml"

    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})

    assert "environment variable RELAYD_WEBHOOK_SECRET is not set" in str(caught.value)


# --------------------------------------------------------------------------- messages


def test_issue_formats() -> None:
    assert str(ConfigIssue("c.yaml", 12, "drives[1].resourse", "unknown key")) == (
        "c.yaml:12: drives[1].resourse: unknown key"
    )
    assert str(ConfigIssue("c.yaml", None, "drives[1]", "oops")) == "c.yaml: drives[1]: oops"
    assert str(ConfigIssue("c.yaml", 3, "", "oops")) == "c.yaml:3: oops"
    assert str(ConfigIssue("c.yaml", None, "", "oops")) == "c.yaml: oops"


def test_unknown_key_names_file_line_and_path() -> None:
    text = BASE + "  - name: bob\n    account: ci\n    resourse: me\n    webhook: downstream\n"

    assert problems(text) == [
        "config.yaml:15: drives[1].resource: missing required key",
        "config.yaml:17: drives[1].resourse: unknown key; did you mean 'resource'?",
    ]


def test_unknown_top_level_key_even_when_empty() -> None:
    assert problems("drive:\n") == ["config.yaml:1: drive: unknown key; did you mean 'drives'?"]


def test_empty_required_value() -> None:
    text = BASE.replace("    url: https://hooks.example/onedrive\n", "    url:\n")

    assert problems(text) == ["config.yaml:8: webhooks.downstream.url: a value is required"]


def test_duplicate_drive_name() -> None:
    text = BASE + "  - name: alice\n    account: ci\n    resource: me\n    webhook: downstream\n"

    assert problems(text) == [
        "config.yaml:15: drives[1].name: duplicate drive name 'alice' (first at line 11)"
    ]


def test_unknown_account_and_webhooks() -> None:
    text = BASE.replace("account: ci", "account: cii").replace(
        "webhook: downstream", "webhook: [downstream, upstream]"
    )

    assert problems(text) == [
        "config.yaml:12: drives[0].account: unknown account 'cii' (known: ci, work)",
        "config.yaml:14: drives[0].webhook[1]: unknown webhook 'upstream' (known: downstream)",
    ]


def test_unknown_webhook_written_as_a_string_and_no_accounts() -> None:
    text = "drives:\n  - {name: a, account: x, resource: me, webhook: nope}\n"

    assert problems(text) == [
        "config.yaml:2: drives[0].account: unknown account 'x' (no accounts are defined)",
        "config.yaml:2: drives[0].webhook: unknown webhook 'nope' (no webhooks are defined)",
    ]


def test_invalid_yaml_reports_the_line() -> None:
    assert problems("log:\n  level: info\n  format: [json\n") == [
        "config.yaml:4: invalid YAML at column 1: expected ',' or ']', but got '<stream end>' "
        "(while parsing a flow sequence at line 3)"
    ]


def test_invalid_yaml_shows_the_line_and_column() -> None:
    assert problems("drives:\n  - name: d\n   account: a\n") == [
        "config.yaml:3: invalid YAML at column 4: expected <block end>, but found"
        " '<block mapping start>' (while parsing a block collection at line 2)\n"
        "  3 |    account: a\n"
        "    |    ^"
    ]


def test_invalid_yaml_hides_what_may_be_a_credential_on_the_line_it_shows() -> None:
    secret = "whsec_" + "A" * 43 + "="
    for line in (
        f"    secret: {secret}",
        "    Authorization: Bearer eyJ0.eyJ1.sig",
        f"  - {secret}",
    ):
        text = f"webhooks:\n  w:\n    url: http://127.0.0.1:1/\n{line}\n  [\n"
        shown = "\n".join(problems(text))
        assert "invalid YAML" in shown
        assert secret not in shown and "eyJ" not in shown


def test_an_unknown_key_suggests_the_nearest_known_one() -> None:
    text = (
        "webhooks:\n  w:\n    url: http://127.0.0.1:1/\n    retry: {max_delays: 1h}\n"
        "    timeuot: 5s\n"
    )
    assert problems(text) == [
        "config.yaml:4: webhooks.w.retry.max_delays: unknown key; did you mean 'max_delay'?",
        "config.yaml:5: webhooks.w.timeuot: unknown key; did you mean 'timeout'?",
    ]


def test_base_url_needs_the_api_version() -> None:
    for url in ("https://graph.microsoft.com", "https://graph.microsoft.com/", "http://h/graph"):
        assert problems(f"graph: {{base_url: {url!r}}}\n") == [
            "config.yaml:1: graph.base_url: must end with Graph's API version,"
            " e.g. https://graph.microsoft.com/v1.0"
        ]
    assert parse("graph: {base_url: 'https://graph.microsoft.com/beta/'}\n").graph.base_url == (
        "https://graph.microsoft.com/beta"
    )


def test_check_files_requires_a_readable_token_file(tmp_path: Path) -> None:
    text = "accounts:\n  a: {token_file: missing-token}\n"
    # The daemon reads the file at each token request (a sidecar may write it later)...
    assert parse(text, base_dir=tmp_path).accounts["a"].token_file == tmp_path / "missing-token"
    # ...while check-config asks for it now, without quoting the value (it may be a token).
    with pytest.raises(ConfigError) as caught:
        parse_config(text, filename="c.yaml", env={}, base_dir=tmp_path, check_files=True)
    assert str(caught.value) == (
        "c.yaml:2: accounts.a.token_file: cannot read the file: No such file or directory"
    )
    (tmp_path / "missing-token").write_text("t")
    parse_config(text, filename="c.yaml", env={}, base_dir=tmp_path, check_files=True)


def test_duplicate_yaml_key() -> None:
    assert problems("log:\n  level: info\n  level: debug\n") == [
        "config.yaml:3: log.level: duplicate key (first at line 2)"
    ]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    assert problems(text) == ["config.yaml:1: the top level must be a mapping of settings"]


def test_several_problems_are_all_reported_sorted_by_line() -> None:
    text = """\
        shutdown_grace: soon
        log: {level: loud}
        accounts:
          a: {client_id: not-a-guid}
        webhooks:
          w: {url: ftp://x, concurrency: 0, timeout: 0}
        drives:
          - {name: -bad, account: a, resource: teams/x, webhook: w}
        admin: {listen: "localhost:99999"}
        """

    assert problems(text) == [
        "config.yaml:1: shutdown_grace: invalid duration 'soon': expected a number of seconds or"
        " a string like '15s', '250ms', '2m', '1h30m' or '3d'",
        "config.yaml:2: log.level: Input should be 'debug', 'info', 'warning' or 'error'",
        "config.yaml:4: accounts.a.client_id: expected the application (client) id, a GUID like"
        " 00000000-0000-0000-0000-000000000000",
        "config.yaml:6: webhooks.w.url: expected an http:// or https:// URL with a host",
        "config.yaml:6: webhooks.w.timeout: duration must be greater than zero",
        "config.yaml:6: webhooks.w.concurrency: Input should be greater than or equal to 1",
        "config.yaml:8: drives[0].name: invalid name '-bad': expected 1 to 64 letters, digits,"
        " '.', '_' or '-', starting with a letter or digit",
        "config.yaml:8: drives[0].resource: unsupported resource 'teams/x': expected me,"
        " drives/{drive-id}, groups/{group-id}, users/{user-id}, sites/{site-id}"
        " or sites/{site-id}/lists/{list-id}",
        "config.yaml:9: admin.listen: port must be between 0 and 65535",
    ]


def test_type_errors_read_well() -> None:
    text = "drives: {a: 1}\nwebhooks: [x]\ngraph: 5\nlog: {format: 3}\n"

    assert problems(text) == [
        "config.yaml:1: drives: expected a list",
        "config.yaml:2: webhooks: expected a mapping",
        "config.yaml:3: graph: expected a mapping",
        "config.yaml:4: log.format: Input should be 'json' or 'console'",
    ]


def test_bad_names_for_accounts_and_webhooks() -> None:
    text = f"""\
        accounts:
          ../x: {{token_file: t}}
        webhooks:
          'a b': {{url: http://h, secret: {SECRET}}}
        """

    assert problems(text) == [
        "config.yaml:2: accounts[\"../x\"]: invalid name '../x': expected 1 to 64 letters, digits,"
        " '.', '_' or '-', starting with a letter or digit",
        "config.yaml:4: webhooks[\"a b\"]: invalid name 'a b': expected 1 to 64 letters, digits,"
        " '.', '_' or '-', starting with a letter or digit",
    ]


def test_application_credentials_are_refused_with_an_explanation() -> None:
    text = BASE.replace(
        f"    client_id: {CLIENT_ID}\n", f"    client_id: {CLIENT_ID}\n    client_secret: s3cr3t\n"
    )

    assert problems(text) == [
        "config.yaml:6: accounts.work.client_secret: application credentials are not accepted:"
        " Graph's socketIo endpoint only accepts delegated (user) tokens; use client_id for"
        " device-code sign-in (relayd login) or token_command/token_file"
    ]


@pytest.mark.parametrize(
    ("account", "found"),
    [
        ("{tenant: common}", ""),
        (f"{{client_id: {CLIENT_ID}, token_file: t}}", " (found client_id and token_file)"),
    ],
)
def test_account_needs_exactly_one_token_source(account: str, found: str) -> None:
    assert problems(f"accounts:\n  a: {account}\n") == [
        "config.yaml:2: accounts.a: set exactly one of client_id (device-code sign-in),"
        f" token_command or token_file{found}"
    ]


def test_msal_settings_on_other_accounts_are_refused() -> None:
    assert problems("accounts:\n  a:\n    token_file: t\n    tenant: common\n") == [
        "config.yaml:4: accounts.a.tenant: only applies to client_id accounts"
    ]


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ('"az \'unbalanced"', "cannot split the command line: No closing quotation"),
        ('"  "', "the command must not be empty"),
    ],
)
def test_token_command_must_split(command: str, message: str) -> None:
    assert problems(f"accounts:\n  a:\n    token_command: {command}\n") == [
        f"config.yaml:3: accounts.a.token_command: {message}"
    ]


def test_reserved_scopes_and_retry_order() -> None:
    text = f"""\
        accounts:
          a:
            client_id: {CLIENT_ID}
            scopes: [Files.Read, offline_access]
        webhooks:
          w:
            url: https://h/
            retry:
              initial_delay: 2m
              max_delay: 1m
        """

    assert problems(text) == [
        "config.yaml:4: accounts.a.scopes[1]: offline_access is added by MSAL itself; remove it",
        "config.yaml:10: webhooks.w.retry.max_delay: max_delay must not be shorter than"
        " initial_delay",
    ]


def test_header_checks() -> None:
    text = """\
        webhooks:
          w:
            url: https://h/
            headers:
              Webhook-Signature: x
              "Bad Name": y
        """

    assert problems(text) == [
        "config.yaml:5: webhooks.w.headers.Webhook-Signature: this header is set by relayd",
        'config.yaml:6: webhooks.w.headers["Bad Name"]: not a valid HTTP header name',
    ]


# --------------------------------------------------------------------------- environment


def test_environment_substitution() -> None:
    config = parse(
        """\
        state_dir: ${STATE:-/srv/relayd}
        shutdown_grace: ${GRACE}
        log: {level: "${LEVEL:-warning}", format: "${FORMAT:-console}"}
        webhooks:
          w:
            url: https://${HOST}/hook?price=$$5&cost=$9
            headers: {X-Api-Key: "${KEY}", X-Empty: "${EMPTY}", X-Fallback: "${EMPTY:-none}"}
            concurrency: ${CONCURRENCY}
            ordered: ${ORDERED}
        """,
        env={
            "GRACE": "10s",
            "FORMAT": "json",
            "HOST": "hooks.example",
            "KEY": "k-123",
            "EMPTY": "",
            "CONCURRENCY": "4",
            "ORDERED": "true",
        },
    )

    assert config.state_dir == Path("/srv/relayd")
    assert config.shutdown_grace == 10.0
    assert (config.log.level, config.log.format) == ("warning", "json")
    hook = config.webhooks["w"]
    assert hook.url == "https://hooks.example/hook?price=$5&cost=$9"
    assert hook.headers == {"X-Api-Key": "k-123", "X-Empty": "", "X-Fallback": "none"}
    assert (hook.concurrency, hook.ordered) == (4, True)


def test_keys_are_not_substituted() -> None:
    assert problems('"${UNSET}": 1\n') == [
        'config.yaml:1: ["${UNSET}"]: unknown key; expected one of: accounts, admin, cluster,'
        " drives, graph, log, outbox, shutdown_grace, state_dir, store, tls, webhooks"
    ]


def test_unset_variable_is_reported_at_its_key() -> None:
    text = """\
        webhooks:
          downstream:
            url: https://hooks.example/
            headers: {X-Api-Key: "${DOWNSTREAM_KEY}"}
            timeout: ${TIMEOUT}
        """

    assert problems(text) == [
        "config.yaml:4: webhooks.downstream.headers.X-Api-Key: environment variable"
        " DOWNSTREAM_KEY is not set",
        "config.yaml:5: webhooks.downstream.timeout: environment variable TIMEOUT is not set",
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${1X}", "invalid substitution: expected ${NAME} or ${NAME:-default}"),
        ("a${X", "unterminated '${' (write '$$' for a literal '$')"),
        ("${X:-${Y}}", "nested substitutions are not supported"),
    ],
)
def test_malformed_substitution(value: str, message: str) -> None:
    assert problems(f"state_dir: '{value}'\n") == [f"config.yaml:1: state_dir: {message}"]


def test_substituted_values_never_appear_in_messages() -> None:
    leaked = "hunter2-do-not-print"
    text = """\
        shutdown_grace: ${A}
        log: {level: "${A}"}
        webhooks:
          w: {url: "${A}", secret: "${A}", headers: {X-Key: "${A}"}}
        drives:
          - {name: "${A}", account: "${A}", resource: "${A}", webhook: "${A}"}
        """

    message = "\n".join(problems(text, env={"A": leaked}))

    assert leaked not in message
    assert "drives[0].account: unknown account (no accounts are defined)" in message
    assert "drives[0].resource: unsupported resource: expected me" in message
    assert "shutdown_grace: invalid duration: expected" in message


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (15, 15.0),
        (15.5, 15.5),
        ("15", 15.0),
        ("0.5", 0.5),
        ("15s", 15.0),
        ("250ms", 0.25),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("3d", 259200.0),
        ("1h30m", 5400.0),
        ("1d 2h 3m 4s 5ms", 93784.005),
        ("1.5h", 5400.0),
        (" 7d ", 604800.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "duration must not be negative"),
        ("-5s", "duration must not be negative"),
        (0, "duration must be greater than zero"),
        ("0s", "duration must be greater than zero"),
        ("", "invalid duration ''"),
        ("soon", "invalid duration 'soon'"),
        ("15 s x", "invalid duration '15 s x'"),
        ("30m1h", "invalid duration '30m1h'"),
        ("1m30m", "invalid duration '1m30m'"),
        ("5y", "invalid duration '5y'"),
        ("inf", "invalid duration 'inf'"),
        (float("nan"), "invalid duration nan"),
        (True, "invalid duration True"),
        (None, "invalid duration None"),
        ([5], "invalid duration [5]"),
    ],
)
def test_parse_duration_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(value)


def test_parse_duration_zero_where_allowed() -> None:
    assert parse_duration("0s", allow_zero=True) == 0.0
    config = parse("shutdown_grace: 0\noutbox: {delivered_retention: 0s}\n")
    assert (config.shutdown_grace, config.outbox.delivered_retention) == (0.0, 0.0)


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("whsec_c2hvcnQ=", "secret decodes to 5 bytes"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "secret decodes to 65 bytes"),
        ("whsec_not base64!!", "secret is not valid base64"),
        ("whsec_AAAA", "secret decodes to 3 bytes"),
    ],
)
def test_invalid_secret_is_explained_but_never_printed(secret: str, message: str) -> None:
    text = f"webhooks:\n  w:\n    url: https://h/\n    secret: [{SECRET}, '{secret}']\n"

    with pytest.raises(ConfigError) as caught:
        parse(text)

    (issue,) = caught.value.issues
    assert (issue.line, issue.path) == (4, "webhooks.w.secret[1]")
    assert issue.message.startswith(message)
    assert "openssl rand -base64 32" in issue.message
    assert secret.removeprefix("whsec_") not in str(caught.value)
    assert SECRET.removeprefix("whsec_") not in str(caught.value)


def test_empty_secret() -> None:
    assert problems("webhooks:\n  w: {url: 'https://h/', secret: ''}\n") == [
        "config.yaml:2: webhooks.w.secret: secret is empty; expected 'whsec_' followed by the"
        " base64 of 16 to 64 random bytes; generate one with:"
        ' echo "whsec_$(openssl rand -base64 32)"'
    ]


def test_secret_from_environment_is_not_printed() -> None:
    bad = "whsec_" + base64.b64encode(b"short").decode()

    (line,) = problems("webhooks:\n  w:\n    url: https://h/\n    secret: ${S}\n", env={"S": bad})

    assert line.startswith("config.yaml:4: webhooks.w.secret: secret decodes to 5 bytes;")
    assert bad.removeprefix("whsec_") not in line


def test_secret_without_prefix_is_accepted() -> None:
    bare = SECRET.removeprefix("whsec_")

    config = parse(f"webhooks:\n  w: {{url: 'https://h/', secret: '{bare}'}}\n")

    assert config.webhooks["w"].secrets == (bare,)


def test_secrets_are_not_in_repr() -> None:
    config = parse(
        BASE.replace("    secret:", "    headers: {X-Api-Key: api-key-value}\n    secret:")
    )

    shown = repr(config) + str(config)
    assert SECRET.removeprefix("whsec_") not in shown
    assert "api-key-value" not in shown
    assert "get-token" not in shown


def test_secret_file(tmp_path: Path) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "webhook-secret").write_text(f"{SECRET}\n {OTHER_SECRET}\n")
    text = "webhooks:\n  w:\n    url: https://h/\n    secret_file: creds/webhook-secret\n"

    config = parse(text, base_dir=tmp_path)

    hook = config.webhooks["w"]
    assert hook.secrets == (SECRET, OTHER_SECRET)
    assert hook.secret_file == tmp_path / "creds" / "webhook-secret"
    assert config == parse(text, base_dir=tmp_path)


def test_unreadable_secret_file_names_key_and_path(tmp_path: Path) -> None:
    text = "webhooks:\n  w:\n    url: https://h/\n    secret_file: missing\n"

    with pytest.raises(ConfigError) as caught:
        parse(text, base_dir=tmp_path)

    assert str(caught.value) == (
        f"config.yaml:4: webhooks.w.secret_file: cannot read {tmp_path / 'missing'}:"
        " No such file or directory"
    )


def test_bad_secret_in_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(f"{SECRET} whsec_dG9vc2hvcnQ=")

    with pytest.raises(ConfigError) as caught:
        parse(f"webhooks:\n  w: {{url: 'https://h/', secret_file: '{path}'}}\n")

    assert str(caught.value) == (
        f"config.yaml:2: webhooks.w.secret_file: secret 2 of 2 in {path}: secret decodes to 8"
        " bytes; expected 'whsec_' followed by the base64 of 16 to 64 random bytes; generate one"
        ' with: echo "whsec_$(openssl rand -base64 32)"'
    )
    assert "dG9vc2hvcnQ" not in str(caught.value)


def test_empty_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("\n")

    with pytest.raises(ConfigError, match=re.escape(f"{path} contains no secret")):
        parse(f"webhooks:\n  w: {{url: 'https://h/', secret_file: '{path}'}}\n")


def test_secret_and_secret_file_together(tmp_path: Path) -> None:
    text = f"webhooks:\n  w:\n    url: https://h/\n    secret: {SECRET}\n    secret_file: f\n"

    with pytest.raises(ConfigError) as caught:
        parse(text, base_dir=tmp_path)

    assert str(caught.value) == (
        "config.yaml:5: webhooks.w.secret_file: set either secret or secret_file, not both"
    )


# --------------------------------------------------------------------------- state_dir


def test_state_dir_defaults_to_systemd_state_directory() -> None:
    config = parse("drives: []\n", env={"STATE_DIRECTORY": "/var/lib/relayd:/var/lib/other"})

    assert config.state_dir == Path("/var/lib/relayd")


def test_state_dir_default_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    assert parse("drives: []\n", base_dir=Path("/etc/relayd")).state_dir == tmp_path / "state"


def test_relative_state_dir_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "relayd.yaml"
    path.parent.mkdir()
    path.write_text("state_dir: data\n")

    config = load_config(path, env={"STATE_DIRECTORY": "/ignored"})

    assert config.state_dir == tmp_path / "conf" / "data"
    assert config.state_dir.is_absolute()


def test_home_is_not_expanded() -> None:
    assert problems("state_dir: ~/relayd\n") == [
        "config.yaml:1: state_dir: '~' is not expanded here; write ${HOME}/... or an absolute path"
    ]


# --------------------------------------------------------------------------- resources


@pytest.mark.parametrize(
    ("resource", "path"),
    [
        ("me", "me/drive"),
        ("drives/b!AbC-123_x", "drives/b!AbC-123_x"),
        ("groups/0f0e-11", "groups/0f0e-11/drive"),
        ("users/alice@contoso.com", "users/alice@contoso.com/drive"),
        ("sites/contoso.sharepoint.com,a1b2,c3d4", "sites/contoso.sharepoint.com,a1b2,c3d4/drive"),
        (
            "sites/contoso.sharepoint.com,a1b2,c3d4/lists/e5f6",
            "sites/contoso.sharepoint.com,a1b2,c3d4/lists/e5f6/drive",
        ),
    ],
)
def test_resource_path(resource: str, path: str) -> None:
    assert resource_path(resource) == path


@pytest.mark.parametrize(
    "resource",
    [
        "",
        "Me",
        "me/drive",
        "drives/",
        "drives/a/b",
        "drives/a b",
        "groups/",
        "groups/x/drive",
        "users/",
        "users/x/drive",
        "sites/s/lists/",
        "sites//lists/l",
        "sites/s/drives/l",
        "teams/x",
        "drives/..",
        "drives/x?y",
    ],
)
def test_resource_path_rejects(resource: str) -> None:
    with pytest.raises(ValueError, match="unsupported resource"):
        resource_path(resource)


# --------------------------------------------------------------------------- reloads


def test_two_loads_compare_equal_and_changes_are_visible(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(BASE)

    first = load_config(path, env={})
    again = load_config(path, env={})
    path.write_text(BASE.replace("resource: me", "resource: drives/abc"))
    changed = load_config(path, env={})

    assert first == again
    assert first.drives[0] == again.drives[0]
    assert hash(first.drives[0]) == hash(again.drives[0])
    assert first.webhooks == changed.webhooks
    assert first.drives[0] != changed.drives[0]


def test_models_are_frozen() -> None:
    config = parse(BASE)

    with pytest.raises(ValidationError):
        config.drives[0].name = "bob"  # type: ignore[misc]


# --------------------------------------------------------------------------- files & API


def test_load_config_names_the_file_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("relayd.yaml").write_text("drive: []\n")

    with pytest.raises(ConfigError) as caught:
        load_config("relayd.yaml", env={})

    assert str(caught.value) == "relayd.yaml:1: drive: unknown key; did you mean 'drives'?"


def test_load_config_missing_file() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config("/nonexistent/relayd.yaml", env={})

    assert str(caught.value) == (
        "/nonexistent/relayd.yaml: cannot read the file: No such file or directory"
    )


def test_load_config_uses_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("log: {level: '${RELAYD_TEST_LEVEL}'}\n")
    monkeypatch.setenv("RELAYD_TEST_LEVEL", "error")

    assert load_config(path).log.level == "error"


def test_config_error_pickles() -> None:
    with pytest.raises(ConfigError) as caught:
        parse("drive: 1\n")

    copy = pickle.loads(pickle.dumps(caught.value))

    assert copy.issues == caught.value.issues


def test_models_built_in_code_are_cross_checked() -> None:
    account = AccountConfig(token_command="get-token")
    webhook = WebhookConfig(url="https://h/", secret=SECRET)
    drive = DriveConfig(name="a", account="nope", resource="me", webhook="w")

    with pytest.raises(
        ValidationError, match=r"drives\[0\]\.account: unknown account \(known: ci\)"
    ):
        Config(accounts={"ci": account}, webhooks={"w": webhook}, drives=(drive,))


def test_graph_budget_poll_interval_and_throttle_tenant() -> None:
    config = parse(BASE)
    assert config.graph.requests_per_minute == 600  # half of a small tenant's 1,200 units
    assert all(drive.changes.poll_interval == 3600.0 for drive in config.drives)
    assert config.accounts["ci"].throttle_tenant is None
    assert parse("graph:\n  requests_per_minute: 1200\n").graph.requests_per_minute == 1200
    assert problems("graph:\n  requests_per_minute: 0\n") == [
        "config.yaml:2: graph.requests_per_minute: Input should be greater than or equal to 1"
    ]
    assert problems("accounts:\n  a:\n    token_file: t\n    throttle_tenant: 'a b'\n") == [
        "config.yaml:4: accounts.a.throttle_tenant: expected a tenant id, a tenant domain or"
        " another plain name"
    ]


def test_the_admin_server_is_asked_on_loopback_when_it_listens_everywhere() -> None:
    for listen, url in (
        ("127.0.0.1:9464", "http://127.0.0.1:9464"),
        ("0.0.0.0:9464", "http://127.0.0.1:9464"),
        ("[::1]:9000", "http://[::1]:9000"),
    ):
        assert parse(f"admin: {{listen: '{listen}'}}\n").admin.local_url() == url
    assert parse("admin: {listen: '0.0.0.0:0'}\n").admin.local_url(port=41000) == (
        "http://127.0.0.1:41000"
    )
