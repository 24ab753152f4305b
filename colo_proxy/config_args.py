"""Every core Config field as a command-line flag, merged over a TOML file.

One helper for all subcommands, so `replay` and `run` accept the same
thresholds spelled the same way: `--compare-timeout 2.5` on the command line
is `compare_timeout = 2.5` in the file (top level or in a [core] table; the
table wins where both set a key).  Flags override the file; unknown keys and
bad values are ConfigErrors.

One file serves every command: each command reads its own table ([run],
[bridge]) and the core thresholds, and checks the whole file, so a typo is an
error wherever it is, while another command's settings are never one.
Every byte option takes one size syntax (`65536`, `512K`, `64M`, `2G`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from colo_proxy.core.config import CHOICES, FIELD_DOCS, RULE_LISTS, Config, type_name
from colo_proxy.core.rules import FlowRule, MaskRule, parse_flow_rule, parse_mask
from colo_proxy.errors import ConfigError

_DEST_PREFIX = "cfg_"

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

COMMAND_TABLES = ("run", "bridge")
"""Tables other commands own; their keys may also sit at the top level."""


def size_value(value: object) -> int:
    """A byte count from an int or a size string (``1048576``, ``512K``, ``64M``, ``2GiB``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"bad size {value!r}")
    t = value.strip().upper().replace("_", "").removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    num = t[:-1] if unit else t
    if not num.isdigit():
        raise ValueError(f"bad size {value!r} (expected N, NK, NM or NG)")
    return int(num) * _UNITS[unit]


def parse_size(text: str) -> int:
    """argparse type for every byte option."""
    try:
        return size_value(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def is_size_key(name: str) -> bool:
    """Whether a setting counts bytes (and so takes the size syntax)."""
    return name.endswith(("_bytes", "_buffer", "_block_size", "_cap"))


def _field_doc(name: str) -> str:
    """The description of a Config field, for --help."""
    return FIELD_DOCS.get(name, "")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """Add --config FILE.toml and one flag per Config field."""
    parser.add_argument("--config", metavar="FILE.toml",
                        help="settings file; flags given on the command line win")
    group = parser.add_argument_group("thresholds and limits (seconds, bytes)")
    policy = parser.add_argument_group("flow rules and masks (repeatable; before the file's)")
    policy.add_argument("--flow-rule", dest=_DEST_PREFIX + "flow_rules", action="append",
                        type=_rule_flag(parse_flow_rule), metavar="mode=M[,protocol=P,port=N,"
                        "addr=NET,vlan=V]", help=_field_doc("flow_rules"))
    policy.add_argument("--mask", dest=_DEST_PREFIX + "masks", action="append",
                        type=_rule_flag(parse_mask), metavar="[PROTO/]PORT:REGEX",
                        help=_field_doc("masks"))
    for f in fields(Config):
        default = f.default if f.default is not MISSING else None
        if f.name in RULE_LISTS:
            continue
        if f.name in CHOICES:
            group.add_argument(
                "--" + f.name.replace("_", "-"), dest=_DEST_PREFIX + f.name, default=None,
                choices=CHOICES[f.name], help=f"{_field_doc(f.name)} (default {default})",
            )
            continue
        kind: Any = float if type_name(f.type) == "float" else int
        if is_size_key(f.name):
            kind = parse_size
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=_DEST_PREFIX + f.name, type=kind,
            default=None, metavar="N", help=f"{_field_doc(f.name)} (default {default})",
        )


def read_toml(path: str) -> dict[str, Any]:
    """A whole TOML document; unreadable or invalid files are ConfigErrors."""
    import tomllib  # here, not at the top: most starts read no file (its regexes cost)

    try:
        with Path(path).open("rb") as fh:
            return tomllib.load(fh)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror or err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


def _command_keys() -> dict[str, frozenset[str]]:
    """The keys of each command's table (imported late: those modules import this one)."""
    out: dict[str, frozenset[str]] = {}
    try:
        from colo_proxy.runtime.run_cli import RUN_KEYS
        out["run"] = frozenset(RUN_KEYS)
    except ImportError:  # pragma: no cover - a trimmed install
        pass
    try:
        from colo_proxy.runtime.bridge_cli import BRIDGE_KEYS
        out["bridge"] = frozenset(BRIDGE_KEYS)
    except ImportError:  # pragma: no cover
        pass
    return out


def check_document(path: str, data: dict[str, Any]) -> None:
    """Every table and key of the file is known to some command (one file serves all)."""
    core_keys = {f.name for f in fields(Config)}
    tables = _command_keys()
    anywhere = set(core_keys).union(*tables.values())
    unknown: list[str] = []
    for key, value in data.items():
        if key == "core" or key in COMMAND_TABLES:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{key}] must be a table")
            known = core_keys if key == "core" else tables.get(key, frozenset(value))
            unknown += [f"[{key}] {k}" for k in value if k not in known]
        elif isinstance(value, dict):
            unknown.append(f"[{key}]")
        elif key not in anywhere:
            unknown.append(key)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}")


def load_toml(path: str) -> dict[str, Any]:
    """The core settings in a TOML file: the top level's, then the [core] table's."""
    data = read_toml(path)
    check_document(path, data)
    core_keys = {f.name for f in fields(Config)}
    core = {k: v for k, v in data.items() if k in core_keys}
    core.update(data.get("core", {}))
    for key, value in core.items():
        if is_size_key(key) and isinstance(value, str):
            try:
                core[key] = size_value(value)
            except ValueError as err:
                raise ConfigError(f"{path}: {key}: {err}") from None
    return core


def config_from_args(args: argparse.Namespace, extra_keys: frozenset[str] = frozenset()) -> Config:
    """Build the Config from --config (if any) and the flags.

    `extra_keys` is accepted for older callers and unused: every command's keys are
    known here (see check_document).
    """
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_toml(args.config))
    for f in fields(Config):
        flag = getattr(args, _DEST_PREFIX + f.name, None)
        if flag is not None:
            if f.name in RULE_LISTS:  # flags first: the first matching rule wins
                flag = list(flag) + list(values.get(f.name, []))
            values[f.name] = flag
    return Config.from_mapping(values)


def _rule_flag(parse: Callable[[str], FlowRule | MaskRule]) -> Callable[[str], object]:
    """An argparse type for --flow-rule/--mask: a bad rule is a usage error."""
    def convert(text: str) -> object:
        try:
            return parse(text)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return convert
