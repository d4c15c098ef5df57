"""The ``gspo-lightning`` command: LightningCLI's ``fit`` / ``validate`` / ``test`` / ``predict``, plus ``list``.

``gspo-lightning fit`` with no ``--config`` runs the embedded demo (``configs/demo.yaml``).
``gspo-lightning list [KIND ...]`` prints the registered components with their one-line descriptions.
``gspo-lightning plan --config ... [--device_memory 80GiB]`` prints the run's memory budget per device
(``gspo_lightning.plan``): it reads the configuration ``fit`` reads and instantiates none of it.

Resuming (``--ckpt_path last`` across version folders, refusing broken checkpoint files, atomic writes):
``gspo_lightning.checkpoints``.
"""

from __future__ import annotations

import difflib
import re
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from gspo_lightning.callbacks.progress import use_step_progress_bar
from gspo_lightning.checkpoints import (
    AtomicCheckpointIO,
    check_checkpoint_file,
    checkpoint_folders,
    find_last_checkpoint,
    remove_interrupted_saves,
)
from gspo_lightning.config_checks import (
    check_batch_shape,
    check_engine_installed,
    check_trainer_overlaps,
    moved_option_message,
    yaml_error_message,
)
from gspo_lightning.registry import Registry

CONFIG_DIR = Path(__file__).parent / "configs"
DEMO_CONFIG = CONFIG_DIR / "demo.yaml"


def registries() -> dict[str, Registry]:
    """Every registry users can pick from in YAML, by kind."""
    from gspo_lightning import COMPONENT_REGISTRIES
    from gspo_lightning.agents import (
        ENVIRONMENTS,
        TOOL_PARSERS,
        calculator,  # noqa: F401 (registers the built-in environment)
    )
    from gspo_lightning.data.prompts import PROMPT_SOURCES
    from gspo_lightning.engines import ENGINES
    from gspo_lightning.rewards import REWARDS

    kinds = {"reward": REWARDS, "engine": ENGINES, "prompts": PROMPT_SOURCES}
    return {**COMPONENT_REGISTRIES, **kinds, "tool_parser": TOOL_PARSERS, "environment": ENVIRONMENTS}


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


LIST_HELP = (
    "List the registered components (ratios, advantages, clips, KLs, token masks, rewards, engines, prompt sources,"
    " tool-call parsers, environments)."
)
PLAN_HELP = "Print the run's memory budget per device (no weights loaded): does it fit, and what to turn if not."


# -- misspelled components -------------------------------------------------------------------------------
_UNKNOWN_NAME = re.compile(r"Expected a dot import path string: (\S+)")
_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')


def _expected_kind(message: str, regs: dict[str, Registry]) -> str | None:
    """The kind whose base class jsonargparse names as the expected type in ``message``."""
    for kind, reg in regs.items():
        if re.search(rf"{re.escape(f'{reg.base.__module__}.{reg.base.__qualname__}')}(?![\w.])", message):
            return kind
    return None


def _nearest(name: str, names: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_component_message(message: str) -> str | None:
    """One line for a jsonargparse error about an unknown short component name, else None.

    It names the option, the nearest registered name of the expected kind (or says which kind a name of
    another kind is) and points at ``gspo-lightning list``.
    """
    match = _UNKNOWN_NAME.search(message)
    if match is None:
        return None
    name, regs = match.group(1), registries()
    key = _PARSER_KEY.search(message)
    where = f"{key.group(1)}: " if key else ""
    kind = _expected_kind(message, regs)
    listing = f"`gspo-lightning list {kind}`" if kind else "`gspo-lightning list`"
    own = "; a class of your own goes by its import path (my_module.MyClass)."
    other = next((k for k, reg in regs.items() if name in reg and k != kind), None)
    if kind is not None and other is not None:
        names = ", ".join(regs[kind].names())
        return f"{where}{name!r} is a {regs[other].kind}, not a {regs[kind].kind}; use one of {names} ({listing}){own}"
    candidates = [n for k in ([kind] if kind else regs) for n in regs[k].names()]
    nearest = _nearest(name, candidates)
    unknown = f"{where}unknown {regs[kind].kind if kind else 'component'} {name!r}"
    if nearest is None:
        return f"{unknown}; run {listing} to see the registered ones{own}"
    return f"{unknown}; did you mean {nearest!r}? Run {listing} to see them all{own}"


_UNKNOWN_CALLABLE = re.compile(r"expects a function or a callable class: (.+?)\. Got value: (\S+)")


def unknown_callable_message(message: str) -> str | None:
    """One line for an import path of a tool, environment or rollout function that does not import, else None."""
    match, key = _UNKNOWN_CALLABLE.search(message), _PARSER_KEY.search(message)
    if match is None:
        return None
    where = f"{key.group(1)}: " if key else ""
    return (
        f"{where}cannot import {match.group(2)} ({match.group(1)}); give the import path of a function or class on"
        " the Python path (my_module.my_tool)."
    )


class GSPOArgumentParser(LightningArgumentParser):
    """LightningCLI's parser; a misspelled component name is one line suggesting the nearest registered one, and
    an option from before the option groups one line naming its new path."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        hint = (
            moved_option_message(message)
            or unknown_component_message(message)
            or unknown_callable_message(message)
            or yaml_error_message(message)
        )
        if hint is None:
            super().error(message, ex)
        if not self.exit_on_error:
            raise ArgumentError(None, hint) from ex
        sys.stderr.write(f"error: {hint}\n")
        self.exit(2)


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
        plan_parser = self.init_parser(description=PLAN_HELP)
        self._add_arguments(plan_parser)  # the fit configuration, parsed the same way
        plan_parser.add_argument(
            "--device_memory", type=str | None, default=None,
            help="Memory of one device, e.g. 80GiB, 80GB, 81920MiB (default: the GPU's, or this machine's RAM).",
        )  # fmt: skip
        parser._subcommands_action.add_subcommand("plan", plan_parser, help=PLAN_HELP)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse ``args``; ``list`` and ``plan`` print and exit here, before any class is instantiated.

        A ``--ckpt_path`` file is checked here too, before LightningCLI reads its hyperparameters.
        """
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand == "list":
            print(list_components(self.config.list.kinds))
            sys.exit(0)
        if subcommand == "plan":
            text, status = plan_text(self.config.plan)
            print(text)
            sys.exit(status)  # 0: fits; DOES_NOT_FIT_STATUS (3) after the whole report, for launch scripts
        if subcommand is not None:
            check_checkpoint_file(self.config[subcommand].get("ckpt_path"))
            check_engine_installed(self.config[subcommand])
            check_trainer_overlaps(self.config[subcommand])
            check_batch_shape(self.config[subcommand])

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The data module tokenizes with the model's tokenizer; sampling settings are given once, under data."""
        parser.link_arguments("model.policy.path", "data.tokenizer")
        parser.link_arguments("data.sampling.temperature", "model.loss.temperature")
        parser.link_arguments("data.sampling.max_new_tokens", "model.loss.max_new_tokens")

    @override
    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The Trainer, saving checkpoints with :class:`AtomicCheckpointIO` unless a plugin picked another IO, and
        with a progress bar that counts optimizer steps (``callbacks.progress``) in place of Lightning's default.

        Every run also gets: the run's fingerprint in its checkpoints (``RunFingerprint``, what ``--ckpt_path
        last`` matches), a stop on SIGTERM with a checkpoint (``GracefulStop``), and the final policy as a Hugging
        Face folder (an ``HFExport``, unless the configuration has one).
        """
        from gspo_lightning.callbacks import GracefulStop, HFExport
        from gspo_lightning.checkpoints import RunFingerprint, run_fingerprint

        trainer = super().instantiate_trainer(**kwargs)
        use_step_progress_bar(trainer)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer.callbacks.extend([RunFingerprint(run_fingerprint(config)), GracefulStop()])
        if not any(isinstance(cb, HFExport) for cb in trainer.callbacks):
            trainer.callbacks.append(HFExport())
        return trainer

    def before_fit(self) -> None:
        """Remove what killed saves left, resolve and check ``--ckpt_path``, warn about a rounded max_steps."""
        self._remove_interrupted_saves()
        self._resolve_ckpt_path()
        self._warn_if_max_steps_rounds_up()

    def before_validate(self) -> None:
        """Resolve and check ``--ckpt_path``."""
        self._resolve_ckpt_path()

    def _remove_interrupted_saves(self) -> None:
        if not self.trainer.is_global_zero:
            return
        folders = [f for _, fs, _ in checkpoint_folders(self.trainer) for f in fs]
        removed = remove_interrupted_saves(folders)
        if removed:
            rank_zero_info(
                f"Removed {len(removed)} partial checkpoint file(s) left by an interrupted save:"
                f" {', '.join(map(str, removed))}"
            )

    def _resolve_ckpt_path(self) -> None:
        """``last`` becomes the complete checkpoint of this run (same fingerprint) with the most optimizer steps,
        across the version folders; one line says which.

        Raises:
            SystemExit: nothing to resume, only other runs' checkpoints (listed), or that checkpoint is empty or
                truncated (one line).
        """
        from gspo_lightning.checkpoints import run_fingerprint

        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            path, line = find_last_checkpoint(self.trainer, run_fingerprint(self.config[self.subcommand]))
            check_checkpoint_file(str(path))
            rank_zero_info(line)
            config["ckpt_path"] = str(path)

    def _warn_if_max_steps_rounds_up(self) -> None:
        """``trainer.max_steps`` counts optimizer steps; training stops only after a whole rollout batch."""
        update = self.model.options.update
        mini_batches, epochs = update.mini_batches, update.epochs
        per_batch, max_steps = update.steps_per_rollout, self.trainer.max_steps
        if max_steps > 0 and max_steps % per_batch:
            rounded = -(-max_steps // per_batch) * per_batch
            rank_zero_warn(
                f"trainer.max_steps={max_steps} is not a multiple of the {per_batch} optimizer steps per rollout"
                f" batch (model.update.mini_batches={mini_batches} x epochs={epochs}); training stops after whole"
                f" rollout batches, so it rounds up to {rounded}. Set a multiple of {per_batch} to silence this."
            )


def plan_text(config) -> tuple[str, int]:
    """The text of ``gspo-lightning plan`` for its parsed configuration, and the exit status: 0 when the run
    fits, ``DOES_NOT_FIT_STATUS`` (3) when it does not.

    Raises:
        SystemExit: what the planner cannot read or find offline, as one line.
    """
    from gspo_lightning.plan import DOES_NOT_FIT_STATUS, plan_run, render

    settings = config.as_dict()
    device_memory = settings.pop("device_memory", None)
    try:
        plan = plan_run(settings, device_memory)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    return render(plan), 0 if plan.fits else DOES_NOT_FIT_STATUS


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> GSPOLightningCLI:
    """Build (and run) the LightningCLI. ``args`` excludes the program name."""
    from gspo_lightning.module import GSPOModule
    from gspo_lightning.rollout import RolloutDataModule

    return GSPOLightningCLI(
        GSPOModule,
        RolloutDataModule,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_class=GSPOArgumentParser,
    )


def with_demo_default(args: list[str]) -> list[str]:
    """Insert the demo config after the subcommand when no ``--config`` is given."""
    if (
        args
        and args[0] in ("fit", "validate", "plan")
        and not any(a == "--config" or a.startswith("--config=") for a in args)
    ):
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
    """Run ``gspo-lightning`` on ``argv`` (default: ``sys.argv[1:]``).

    A run stopped by SIGTERM ends with one line (the step, the checkpoint, the resume command) and exit status 143
    (``callbacks.stop``), not with Lightning's silent exit status 0.
    """
    from gspo_lightning.callbacks.stop import STOP_EXCEPTIONS, STOPPED_EXIT_CODE, stopped_message

    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    args = list(sys.argv[1:] if argv is None else argv)
    # LightningCLI reads sys.argv itself; giving it `args` as well would make it warn about both.
    sys.argv = [sys.argv[0], *with_demo_default(args)]
    try:
        cli_main()
    except STOP_EXCEPTIONS as stop:
        report = getattr(stop, "stop_report", None)
        if report is None or report.global_zero:
            sys.stdout.flush()  # the line comes last, after anything still buffered
            sys.stderr.write(f"{stopped_message(report, args)}\n")
        sys.exit(STOPPED_EXIT_CODE)


if __name__ == "__main__":
    main()
