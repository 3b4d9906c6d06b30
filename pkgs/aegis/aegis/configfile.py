"""``--config.file``: explicit targets from YAML, read and validated once, at start.

::

    targets:
      node:
        socket: /run/node-exporter/metrics.sock
      app:
        socket: /run/app/admin.sock
        path: /internal/metrics

Every error names the file and the key (``aegis.yml: targets.app.sokcet: unknown key``); a
mistyped key is an error, never silently ignored, and so is a key given twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError
from .targets import Target, check_name

__all__ = ["load_targets"]

_TOP_KEYS = frozenset({"targets"})
_TARGET_KEYS = frozenset({"socket", "path"})


class _StrictLoader(yaml.SafeLoader):
    """Rejects a key given twice: with plain YAML the second silently wins."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_targets(path: str | Path) -> dict[str, Target]:
    """The targets of a config file; :class:`~aegis.config.ConfigError` names what is wrong."""
    src = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{src}: cannot read: {exc}") from None
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{src}: not valid YAML: {exc}") from None
    top = _mapping(src, "", document, _TOP_KEYS)
    targets: dict[str, Target] = {}
    for name, entry in _mapping(src, "targets", top.get("targets")).items():
        key = f"targets.{name}"
        try:
            check_name(name)
        except ValueError as exc:
            raise ConfigError(f"{src}: {key}: bad target name: {exc}") from None
        fields = _mapping(src, key, entry, _TARGET_KEYS)
        if "socket" not in fields:
            raise ConfigError(f"{src}: {key}: missing socket")
        socket = _string(src, f"{key}.socket", fields["socket"])
        upstream_path = _string(src, f"{key}.path", fields.get("path", "/metrics"))
        try:
            targets[name] = Target(name, Path(socket), upstream_path)
        except ValueError as exc:
            raise ConfigError(f"{src}: {key}: {exc}") from None
    return targets


def _mapping(
    src: str, key: str, value: Any, allowed: frozenset[str] | None = None
) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{src}: {key or '(top level)'}: must be a mapping")
    for k in value:
        where = f"{key}.{k}" if key else str(k)
        if not isinstance(k, str):
            raise ConfigError(f"{src}: {where}: key must be a string")
        if allowed is not None and k not in allowed:
            raise ConfigError(f"{src}: {where}: unknown key (known: {', '.join(sorted(allowed))})")
    return value


def _string(src: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{src}: {key}: must be a non-empty string")
    return value
