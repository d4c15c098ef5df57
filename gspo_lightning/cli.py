"""The ``gspo-lightning`` command.

``gspo-lightning list [KIND]`` prints the registered components with their one-line descriptions.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gspo_lightning.registry import Registry


def registries() -> dict[str, Registry]:
    """Every registry users can pick from in YAML, by kind."""
    from gspo_lightning import COMPONENT_REGISTRIES

    return dict(COMPONENT_REGISTRIES)


def list_components(kinds: Sequence[str] = ()) -> str:
    """The text of ``gspo-lightning list``: each kind with its entries and descriptions."""
    regs = registries()
    unknown = [k for k in kinds if k not in regs]
    if unknown:
        raise SystemExit(f"error: unknown kind {unknown[0]!r}; choose from: {', '.join(regs)}")
    lines = []
    for kind in kinds or list(regs):
        entries = regs[kind].describe()
        width = max(len(e.name) for e in entries)
        lines.append(f"{kind}:")
        lines.extend(f"  {e.name.ljust(width)}  {e.description}" for e in entries)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "list":
        print(list_components(args[1:]))
        return
    raise SystemExit("usage: gspo-lightning list [ratio|advantage|clip|kl ...]")


if __name__ == "__main__":
    main()
