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

from .config import ConfigError
from .targets import Target, check_name
from .yamlfile import YamlFile

__all__ = ["load_targets"]

_TOP_KEYS = frozenset({"targets"})
_TARGET_KEYS = frozenset({"socket", "path"})


def load_targets(path: str | Path) -> dict[str, Target]:
    """The targets of a config file; :class:`~aegis.config.ConfigError` names what is wrong."""
    src = str(path)
    file = YamlFile(src, ConfigError)
    top = file.mapping("", file.load(), _TOP_KEYS)
    targets: dict[str, Target] = {}
    for name, entry in file.mapping("targets", top.get("targets")).items():
        key = f"targets.{name}"
        try:
            check_name(name)
        except ValueError as exc:
            raise ConfigError(f"{src}: {key}: bad target name: {exc}") from None
        fields = file.mapping(key, entry, _TARGET_KEYS)
        if "socket" not in fields:
            raise ConfigError(f"{src}: {key}: missing socket")
        socket = file.string(f"{key}.socket", fields["socket"], empty=False)
        upstream_path = file.string(f"{key}.path", fields.get("path", "/metrics"), empty=False)
        try:
            targets[name] = Target(name, Path(socket), upstream_path)
        except ValueError as exc:
            raise ConfigError(f"{src}: {key}: {exc}") from None
    return targets
