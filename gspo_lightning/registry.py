"""Name registries for the swappable components.

One :class:`Registry` per kind (ratio, advantage, clip, kl, ...). Entries are keyed by class name, so the
name a user writes in YAML (``class_path: SequenceRatio``), the registry key and the Python class are the
same string. The registry is an index for listing and short names; a user's own class needs no
registration: jsonargparse builds it from its import path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RegistryEntry(Generic[T]):
    """One registered class with its one-line description."""

    name: str
    cls: type[T]
    description: str


def _first_docstring_line(cls: type) -> str:
    # The class's own docstring only: an inherited one would describe the parent.
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    return doc.splitlines()[0].strip() if doc else ""


class Registry(Generic[T]):
    """Maps class names to classes of one component kind.

    Args:
        kind: human name of the kind, used in messages (``"ratio"``).
        base: every registered class must subclass it.
    """

    def __init__(self, kind: str, base: type[T]) -> None:
        self.kind = kind
        self.base = base
        self._entries: dict[str, RegistryEntry[T]] = {}

    def register(
        self, cls: type[T] | None = None, *, description: str | None = None, override: bool = False
    ) -> Callable[[type[T]], type[T]] | type[T]:
        """Register ``cls`` under its class name; usable as ``@REG.register`` or ``@REG.register(...)``.

        Raises:
            TypeError: ``cls`` does not subclass the registry's base, or has no description.
            ValueError: the name is taken and ``override`` is False.
        """

        def decorator(klass: type[T]) -> type[T]:
            if not (inspect.isclass(klass) and issubclass(klass, self.base)):
                raise TypeError(f"Cannot register {klass!r} as a {self.kind}: it must subclass {self.base.__name__}.")
            name = klass.__name__
            if name in self._entries and not override:
                existing = self._entries[name].cls
                raise ValueError(
                    f"A {self.kind} named {name!r} is already registered"
                    f" ({existing.__module__}.{existing.__qualname__})."
                    " Pass override=True to replace it, or give your class another name."
                )
            text = description or _first_docstring_line(klass)
            if not text:
                raise TypeError(f"{self.kind} {name!r} needs a description: pass description= or write a docstring.")
            self._entries[name] = RegistryEntry(name=name, cls=klass, description=text)
            return klass

        return decorator(cls) if cls is not None else decorator

    def get(self, name: str) -> type[T]:
        """Return the class registered as ``name``.

        Raises:
            KeyError: unknown name; the message lists the valid ones.
        """
        try:
            return self._entries[name].cls
        except KeyError:
            raise KeyError(
                f"Unknown {self.kind} {name!r}. Available {self.kind}s: {', '.join(sorted(self._entries))}."
                " A class of your own can be used by its import path (class_path: my_pkg.module.MyClass)."
            ) from None

    def build(self, name: str, **kwargs) -> T:
        """Instantiate the class registered as ``name`` with ``kwargs``."""
        return self.get(name)(**kwargs)

    def describe(self) -> list[RegistryEntry[T]]:
        """All entries, sorted by name."""
        return [self._entries[k] for k in sorted(self._entries)]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry(kind={self.kind!r}, names={self.names()})"
