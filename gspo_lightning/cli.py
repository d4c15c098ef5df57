"""The ``gspo-lightning`` command: LightningCLI's ``fit`` / ``validate`` / ``test`` / ``predict``, plus ``list``.

``gspo-lightning fit`` with no ``--config`` runs the embedded demo (``configs/demo.yaml``).
``gspo-lightning list [KIND ...]`` prints the registered components with their one-line descriptions.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from gspo_lightning.registry import Registry

CONFIG_DIR = Path(__file__).parent / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def registries() -> dict[str, Registry]:
    """Every registry users can pick from in YAML, by kind."""
    from gspo_lightning import COMPONENT_REGISTRIES
    from gspo_lightning.data.prompts import PROMPT_SOURCES
    from gspo_lightning.engines import ENGINES
    from gspo_lightning.rewards import REWARDS

    return {**COMPONENT_REGISTRIES, "reward": REWARDS, "engine": ENGINES, "prompts": PROMPT_SOURCES}


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


LIST_HELP = "List the registered components (ratios, advantages, clips, KLs, rewards, engines, prompt sources)."


class GSPOLightningCLI(LightningCLI):
    """LightningCLI with the values two parts need given once, and a ``list`` subcommand."""

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Add ``list`` next to the Trainer subcommands; it takes only the kinds to show.

        The kinds are checked by :func:`list_components`, not by ``choices``: on Python < 3.12 argparse rejects an
        empty ``nargs="*"`` positional that has choices.
        """
        super()._add_subcommands(parser, **kwargs)
        list_parser = self.parser_class(description=LIST_HELP)
        kinds = ", ".join(registries())
        list_parser.add_argument("kinds", nargs="*", default=[], metavar="KIND", help=f"Any of: {kinds}; none: all.")
        parser._subcommands_action.add_subcommand("list", list_parser, help=LIST_HELP)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args``; ``list`` prints the components and exits here, before any class is instantiated."""
        super().parse_arguments(parser, args)
        if self.config.get("subcommand") == "list":
            print(list_components(self.config.list.kinds))
            sys.exit(0)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The data module tokenizes with the model's tokenizer; sampling settings are given once, under data."""
        parser.link_arguments("model.model", "data.tokenizer")
        parser.link_arguments("data.sampling.temperature", "model.temperature")
        parser.link_arguments("data.sampling.max_new_tokens", "model.max_new_tokens")


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> GSPOLightningCLI:
    """Build (and run) the LightningCLI. ``args`` excludes the program name."""
    from gspo_lightning.datamodule import RolloutDataModule
    from gspo_lightning.module import GSPOModule

    return GSPOLightningCLI(
        GSPOModule,
        RolloutDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
    )


def with_demo_default(args: list[str]) -> list[str]:
    """Insert the demo config after the subcommand when no ``--config`` is given."""
    if args and args[0] in ("fit", "validate") and not any(a == "--config" or a.startswith("--config=") for a in args):
        return [args[0], "--config", str(DEMO_CONFIG), *args[1:]]
    return args


# Warnings Lightning raises about choices this project makes on purpose: the batch is pulled inside
# training_step (so generation sees the latest weights), and checkpoints hold post-update weights.
EXPECTED_WARNINGS = (
    r".*`dataloader_iter` step flavor.*",
    r".*Found `dataloader_iter` argument in the `training_step`.*",
    r".*ModelCheckpoint with manual optimization and every_n_train_steps.*",
    # torch 2.13 deprecates LeafSpec, which Lightning 2.6's CombinedLoader still uses (not ours to fix)
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
)


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``gspo-lightning`` on ``argv`` (default: ``sys.argv[1:]``)."""
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    args = list(sys.argv[1:] if argv is None else argv)
    # LightningCLI reads sys.argv itself; giving it `args` as well would make it warn about both.
    sys.argv = [sys.argv[0], *with_demo_default(args)]
    cli_main()


if __name__ == "__main__":
    main()
