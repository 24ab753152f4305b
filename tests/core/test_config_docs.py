"""Config's field table works the same pure and compiled."""

from __future__ import annotations

from dataclasses import fields

from colo_proxy.core.config import FIELD_DOCS, RULE_LISTS, Config, type_name


def test_every_field_is_documented_once() -> None:
    assert list(FIELD_DOCS) == [f.name for f in fields(Config)]
    assert all(doc.strip() for doc in FIELD_DOCS.values())


def test_field_types_read_as_names() -> None:
    kinds = {f.name: type_name(f.type) for f in fields(Config)}
    assert kinds["compare_timeout"] == "float" and kinds["max_flows"] == "int"
    rule_lists = {kinds.pop(name) for name in RULE_LISTS}
    assert set(kinds.values()) == {"float", "int", "str"}
    assert all(kind.startswith("tuple") for kind in rule_lists)
