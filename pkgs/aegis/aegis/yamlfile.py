"""Strict YAML files whose every error names the file and the key.

``--config.file`` and ``--web.config.file`` are read and validated the same way, so the reading
and the shape checks live here once: a key given twice is an error (plain YAML lets the second
silently win; Go's ``yaml.UnmarshalStrict`` refuses it), so is an unknown key, and every message
reads ``<file>: <key.path>: <problem>``. Each caller keeps its own exception type
(``ConfigError``, ``WebConfigError``): a :class:`YamlFile` raises the one it was given.
"""

from __future__ import annotations

import functools
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import yaml

__all__ = ["YamlFile"]


@functools.cache
def _strict_loader() -> type[yaml.SafeLoader]:
    """A SafeLoader that rejects a key given twice. Built at the first file read: PyYAML is
    imported only when a configuration file is given (about 0.5 MB of every process)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
            seen: list[Any] = []  # a list: keys may be unhashable until the base class refuses
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} given twice", key_node.start_mark
                    )
                seen.append(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


@dataclass(frozen=True)
class YamlFile:
    """One file being validated: its name for messages and the exception to raise."""

    src: str
    error: type[Exception]

    def load(self) -> Any:
        """The parsed document (``None`` for an empty file)."""
        try:
            text = Path(self.src).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise self.error(f"{self.src}: cannot read: {exc}") from None
        loader = _strict_loader()
        import yaml

        try:
            return yaml.load(text, Loader=loader)  # a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise self.error(f"{self.src}: not valid YAML: {exc}") from None

    def mapping(
        self, key: str, value: Any, allowed: Collection[str] | None = None
    ) -> dict[str, Any]:
        """``value`` as a mapping with string keys (absent is empty); ``key`` "" is the top."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(f"{self.src}: {key or '(top level)'}: must be a mapping")
        for k in value:
            where = f"{key}.{k}" if key else str(k)
            if not isinstance(k, str):
                raise self.error(f"{self.src}: {where}: key must be a string")
            if allowed is not None and k not in allowed:
                known = ", ".join(sorted(allowed))
                raise self.error(f"{self.src}: {where}: unknown key (known: {known})")
        return value

    def string(self, key: str, value: Any, *, empty: bool = True) -> str:
        """``value`` as a string; with ``empty=False`` a blank one is an error too."""
        if not isinstance(value, str) or (not empty and not value):
            raise self.error(f"{self.src}: {key}: must be a {'' if empty else 'non-empty '}string")
        return value

    def strings(self, key: str, value: Any) -> tuple[str, ...]:
        """``value`` as a list of strings (absent is empty)."""
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.error(f"{self.src}: {key}: must be a list of strings")
        return tuple(self.string(key, v) for v in value)
