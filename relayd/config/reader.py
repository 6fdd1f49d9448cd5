"""The configuration's YAML reader: the file composed into data that remembers every key's line,
`${VAR}` references expanded, then validated against the schema (`parse_config`, `load_config`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import yaml
from pydantic import ValidationError

from relayd.config.errors import ConfigError, ConfigIssue, Invalid, Loc
from relayd.config.report import Document, Reporter
from relayd.config.schema import Config, raw_reference_problems

# --------------------------------------------------------------------------- YAML -> data

_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_MAP_TAG: Final = "tag:yaml.org,2002:map"
_SEQ_TAG: Final = "tag:yaml.org,2002:seq"
# Enough for any real configuration, small enough to stop "billion laughs" alias bombs.
_MAX_NODES: Final = 100_000

_REFERENCE: Final = re.compile(r"\$(?:(?P<escape>\$)|\{(?P<body>[^}]*)\}|(?P<open>\{))")
_REFERENCE_BODY: Final = re.compile(
    r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL
)


def _expand(text: str, env: Mapping[str, str]) -> tuple[str, bool, list[str]]:
    """Substitute ``${VAR}``, ``${VAR:-default}`` and ``$$`` in ``text``.

    Returns the result, whether any variable was referenced, and the problems found. A lone
    ``$`` followed by anything else is kept as written. Problems never quote the text.
    """
    problems: list[str] = []
    referenced = False

    def replace(match: re.Match[str]) -> str:
        nonlocal referenced
        if match["escape"]:
            return "$"
        if match["open"]:
            problems.append("unterminated '${' (write '$$' for a literal '$')")
            return ""
        body = _REFERENCE_BODY.fullmatch(match["body"])
        if body is None:
            problems.append("invalid substitution: expected ${NAME} or ${NAME:-default}")
            return ""
        referenced = True
        name, default = body["name"], body["default"]
        value = env.get(name)
        if default is None:
            if value is None:
                problems.append(f"environment variable {name} is not set")
                return ""
            return value
        if "${" in default:
            problems.append("nested substitutions are not supported")
            return ""
        return value or default

    return _REFERENCE.sub(replace, text), referenced, problems


class _TooLarge(Exception):
    pass


class _Builder:
    """Turns a composed YAML node tree into plain data, recording the line of every key."""

    def __init__(self, loader: yaml.SafeLoader, env: Mapping[str, str]) -> None:
        self.loader = loader
        self.env = env
        self.doc = Document()
        self.budget = _MAX_NODES
        self.active: set[int] = set()  # collections being built, to stop recursive aliases

    def problem(self, loc: Loc, node: yaml.Node, message: str, *, unusable: bool = False) -> None:
        self.doc.problems.append((loc, node.start_mark.line + 1, Invalid(message)))
        if unusable:  # the value is dropped; validating what is left would only add noise
            self.doc.unusable.add(loc)

    def build(self, node: yaml.Node, loc: Loc) -> object:
        self.budget -= 1
        if self.budget < 0:
            raise _TooLarge
        self.doc.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, loc)
        if id(node) in self.active:
            self.problem(loc, node, "recursive YAML alias", unusable=True)
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode) and node.tag == _MAP_TAG:
                return self.mapping(node, loc)
            if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ_TAG:
                return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
            self.problem(loc, node, f"unsupported YAML tag {node.tag}", unusable=True)
            return None
        finally:
            self.active.discard(id(node))

    def scalar(self, node: yaml.ScalarNode, loc: Loc) -> object:
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            self.problem(loc, node, f"invalid YAML value: {exc.problem}", unusable=True)
            return None
        except ValueError as exc:  # e.g. a timestamp like 2024-02-30
            self.problem(loc, node, f"invalid YAML value: {exc}", unusable=True)
            return None
        if isinstance(value, str) and "$" in value:
            value, referenced, problems = _expand(value, self.env)
            if referenced:
                self.doc.substituted.add(loc)
            for message in problems:
                self.problem(loc, node, message, unusable=True)
        return value

    def mapping(self, node: yaml.MappingNode, loc: Loc) -> dict[str, object]:
        result: dict[str, object] = {}
        for key_node, value_node in self.pairs(node, loc):
            key_loc = (*loc, key_node.value)
            self.doc.lines[key_loc] = key_node.start_mark.line + 1
            result[key_node.value] = self.build(value_node, key_loc)
        return result

    def pairs(self, node: yaml.MappingNode, loc: Loc) -> list[tuple[yaml.ScalarNode, yaml.Node]]:
        """The key/value nodes in effect: the mapping's own keys, then keys merged in with
        ``<<`` that the mapping does not override (earlier merge sources win)."""
        own: dict[str, tuple[yaml.ScalarNode, yaml.Node]] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merged.extend(
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
            elif not isinstance(key_node, yaml.ScalarNode):
                self.problem(loc, key_node, "keys must be plain strings")
            elif key_node.value in own:
                first = own[key_node.value][0].start_mark.line + 1
                self.problem(
                    (*loc, key_node.value), key_node, f"duplicate key (first at line {first})"
                )
            else:
                own[key_node.value] = (key_node, value_node)
        for source in merged:
            if not isinstance(source, yaml.MappingNode):
                self.problem(loc, source, "'<<' must merge a mapping or a list of mappings")
                continue
            if id(source) in self.active:
                self.problem(loc, source, "recursive YAML alias")
                continue
            self.active.add(id(source))
            try:
                for key_node, value_node in self.pairs(source, loc):
                    own.setdefault(key_node.value, (key_node, value_node))
            finally:
                self.active.discard(id(source))
        return list(own.values())


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[int | None, str]:
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem is None:
        return None, f"invalid YAML: {exc}"
    mark = exc.problem_mark
    if mark is None:
        return None, f"invalid YAML: {exc.problem}"
    message = f"invalid YAML at column {mark.column + 1}: {exc.problem}"
    if exc.context:
        context_line = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        message += f" ({exc.context}{context_line})"
    lines = text.splitlines()
    if mark.line < len(lines):
        number = str(mark.line + 1)
        message += (
            f"\n  {number} | {_masked_source_line(lines[mark.line])}"
            f"\n  {' ' * len(number)} | {' ' * mark.column}^"
        )
    return mark.line + 1, message


# A line shown from a file that does not parse: its key is all we know, so a value after a key
# that may hold a credential is hidden, and so is anything shaped like a webhook secret.
_SENSITIVE_LINE: Final = re.compile(
    r"^(\s*(?:-\s+)?[\"']?[\w.-]*(?:secret|token|password|authorization|headers|key)[\w.-]*"
    r"[\"']?\s*:).*$",
    re.IGNORECASE,
)


def _masked_source_line(line: str) -> str:
    line = _SENSITIVE_LINE.sub(r"\1 <hidden>", line)
    return re.sub(r"whsec_\S+", "whsec_<hidden>", line)


def _read_document(text: str, env: Mapping[str, str], filename: str) -> Document:
    """Compose and convert the YAML; raises ConfigError when nothing can be validated."""

    def fail(line: int | None, message: str) -> ConfigError:
        return ConfigError([ConfigIssue(filename, line, "", message)])

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
            # A truncated file must not reload into a relay with no drives at all.
            raise fail(None, "the file is empty; see config.example.yaml for what goes in it")
        if not isinstance(root, yaml.MappingNode):
            raise fail(root.start_mark.line + 1, "the top level must be a mapping of settings")
        builder = _Builder(loader, env)
        data = builder.build(root, ())
        builder.doc.data = data if isinstance(data, dict) else {}
        return builder.doc
    except yaml.YAMLError as exc:
        raise fail(*_yaml_problem(exc, text)) from None
    except _TooLarge:
        raise fail(None, "the document is too large (too many YAML aliases?)") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- entry points


def parse_config(
    text: str,
    *,
    filename: str,
    env: Mapping[str, str],
    base_dir: Path,
    check_files: bool = False,
) -> Config:
    """Validate configuration ``text``; ``filename`` is only used in messages.

    Relative paths in the file are taken relative to ``base_dir`` (the config file's folder).
    ``check_files`` also requires files the daemon only reads later (token_file) to be readable
    now, as `relayd check-config` does. Raises :class:`ConfigError` listing every problem found.
    """
    doc = _read_document(text, env, filename)
    reporter = Reporter(filename, doc)
    issues = [reporter.issue(loc, problem, line) for loc, line, problem in doc.problems]
    issues += [
        reporter.issue(problem.at, problem)
        for problem in raw_reference_problems(doc.data, doc.lines)
        if not reporter.is_unusable(problem.at)
    ]
    context = {
        "base_dir": base_dir.absolute(),
        "env": env,
        "references_checked": True,
        "check_files": check_files,
    }
    try:
        config = Config.model_validate(doc.data, context=context)
    except ValidationError as exc:
        issues += reporter.from_validation(exc)
    if issues:
        # `from None`: the chained pydantic error would add nothing and could carry inputs.
        raise ConfigError(issues) from None
    return config


def load_config(
    path: str | os.PathLike[str],
    *,
    env: Mapping[str, str] | None = None,
    check_files: bool = False,
) -> Config:
    """Read and validate the configuration file at ``path``.

    ``env`` (default: ``os.environ``) supplies ``${VAR}`` substitutions and
    ``STATE_DIRECTORY``. Messages name the file as ``path`` was given. Raises
    :class:`ConfigError`, also when the file cannot be read.
    """
    filename = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        issue = ConfigIssue(filename, None, "", f"cannot read the file: {exc.strerror or exc}")
        raise ConfigError([issue]) from None
    except UnicodeDecodeError as exc:
        issue = ConfigIssue(filename, None, "", f"not UTF-8 text (byte {exc.start})")
        raise ConfigError([issue]) from None
    return parse_config(
        text,
        filename=filename,
        env=os.environ if env is None else env,
        base_dir=Path(path).absolute().parent,
        check_files=check_files,
    )
