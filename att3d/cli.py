"""The ``att3d`` command.

    att3d train experiment=quickstart trainer.max_steps=2000    # Hydra overrides
    att3d eval prior --help
    att3d --help

Each subcommand is one row of :data:`COMMANDS`: its help text and the
``"module:function"`` that implements it. The module is imported only when its
subcommand runs, so ``att3d --help`` stays instant (no torch) and a subcommand
whose module is not written yet says so in one line. An implementing function
takes the rest of the command line (``list[str]``, passed on untouched) and
returns an exit code.

Errors: an :class:`~att3d.utils.errors.Att3dError`, a missing file or a config
error is printed as ``att3d: error: <message>`` on one line with exit code 2, any
other exception as one line with exit code 1; ``ATT3D_DEBUG=1`` adds the
traceback. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from att3d import __version__
from att3d.utils.errors import Att3dError, NotAvailableError, one_line

PROG = "att3d"
HELP_FLAGS = ("-h", "--help")
# Exceptions reported as the user's to fix (exit code 2), besides Hydra's and OmegaConf's config errors.
USER_ERRORS = (Att3dError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


@dataclass(frozen=True)
class Command:
    """One subcommand (or a group of them).

    Attributes:
        target: ``"module:function"``; the function is called with the remaining argv and returns an exit code.
            ``None`` for a group, which dispatches to ``subcommands`` by the next word.
        summary: one line for the listing in the parent's ``--help``.
        description: one or two sentences for the command's own ``--help``.
        usage: how the arguments look, for the usage line.
        own_help: the target prints the description in its own ``--help`` (argparse targets built with
            :func:`command_parser`). When False (Hydra apps), ``--help`` prints the description first and then
            forwards ``--help`` to the target for the details.
        subcommands: the targets of a group.
    """

    target: str | None
    summary: str
    description: str
    usage: str = "[ARGS ...]"
    own_help: bool = True
    subcommands: dict[str, Command] = field(default_factory=dict)


# The command table. Filling in a subcommand = writing its module; changing where it lives = one line here.
COMMANDS: dict[str, Command] = {
    "train": Command(
        "att3d.train.app:main",
        "train an amortized text-to-3D model (Hydra app)",
        "Train one amortized model on a set of prompts with score distillation from a diffusion prior. "
        "Arguments are Hydra overrides (e.g. experiment=quickstart trainer.max_steps=2000; --cfg job prints "
        "the composed config); the run folder runs/<experiment>/<timestamp>/ gets the resolved config, logs, "
        "checkpoints and TensorBoard events.",
        usage="[OVERRIDE ...] [--cfg job] [--help]",
        own_help=False,
    ),
    "generate": Command(
        "att3d.infer.generate:main",
        "text to 3D with a trained model: meshes, renders",
        "Turn prompts into 3D objects with a trained amortized model in one forward pass each (no "
        "per-prompt optimisation), and export textured meshes and turntable renders.",
    ),
    "interpolate": Command(
        "att3d.infer.interpolate:main",
        "render along interpolations between prompts",
        "Interpolate between the text embeddings of prompts and render or export the objects that a "
        "trained amortized model produces along the way.",
    ),
    "refine": Command(
        "att3d.train.refine:main",
        "fine-tune a trained model on a few prompts",
        "Refine a trained amortized model on one or a few prompts with more score distillation steps, "
        "starting from the amortized result instead of from scratch.",
    ),
    "mesh-head": Command(
        "att3d.train.mesh_head:main",
        "train the textured-mesh head (LATTE3D stage 2)",
        "Starting from a trained amortized model, extract each prompt's mesh (DMTet), rasterize it at a higher "
        "resolution than the NeRF stage and refine the colour field (geometry optionally) with score "
        "distillation, amortized over the prompt set; writes a model folder that att3d generate loads.",
    ),
    "eval": Command(
        None,
        "evaluate priors and models on the shapes world",
        "Measure quality against the shapes world, whose every object (true shape and colour of each prompt) is "
        "known exactly.",
        usage="TARGET [ARGS ...]",
        subcommands={
            "prior": Command(
                "att3d.eval.prior_eval:main",
                "score the shapes-world diffusion prior",
                "Evaluate the embedded view-conditioned diffusion prior: how well its samples match the "
                "ground-truth renders of their captions.",
            ),
            "paraphrase": Command(
                "att3d.eval.paraphrase:main",
                "score reworded prompts the model never trained on",
                "Evaluate an amortized model on paraphrases of the shapes-world captions (colour and shape "
                "synonyms, other sentence templates) with the same metrics as 'att3d eval model'.",
            ),
            "model": Command(
                "att3d.eval.model_eval:main",
                "score an amortized model (IoU, colour, retrieval)",
                "Evaluate a trained amortized model on the shapes world (seen and held-out prompts) with the "
                "shapes-world metrics: volume IoU, colour error, silhouette IoU and retrieval accuracy.",
            ),
        },
    ),
    "bench": Command(
        "att3d.eval.bench:main",
        "speed: generation latency, training throughput",
        "Time generation per prompt and training steps per second on this machine's device.",
    ),
}


class UsageError(Att3dError):
    """A command line that att3d does not understand."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` (printed as one line) instead of printing usage and exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.HelpFormatter):
    """Help layout: command names in a column wide enough for 'interpolate', no 'COMMAND' line above them."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=28)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):  # argparse forgets the rows' extra indent
            longest = max((len(a.dest) for a in action._get_subactions()), default=0)
            width = longest + self._current_indent + self._indent_increment
            self._action_max_length = max(self._action_max_length, width)

    def _format_action(self, action: argparse.Action) -> str:
        text = super()._format_action(action)
        if isinstance(action, argparse._SubParsersAction):
            text = text.split("\n", 1)[1]  # drop the metavar line; the command rows follow
        return text


def _debug() -> bool:
    return os.environ.get("ATT3D_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def _split_target(target: str) -> tuple[str, str]:
    module, _, attr = target.partition(":")
    return module, attr or "main"


def import_target(target: str, what: str) -> Callable[..., object]:
    """Import ``"module:function"``; :class:`NotAvailableError` ``"<what> is not available yet"`` if the module
    (or the function) does not exist. A module that exists but fails to import raises its own error."""
    module_name, attr = _split_target(target)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise NotAvailableError(f"{what} is not available yet") from None
        raise
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise NotAvailableError(f"{what} is not available yet ({module_name} has no {attr}())")
    return fn


def is_available(path: str) -> bool:
    """Whether the module of a command (``"generate"``, ``"eval prior"``) exists, without importing it."""
    cmd = _lookup(path.split())
    if cmd.target is None:
        return True
    try:
        return importlib.util.find_spec(_split_target(cmd.target)[0]) is not None
    except ModuleNotFoundError:
        return False


def _lookup(words: Sequence[str]) -> Command:
    table, cmd = COMMANDS, None
    for w in words:
        cmd = table[w]
        table = cmd.subcommands
    if cmd is None:
        raise KeyError("empty command path")
    return cmd


def _add_commands(parser: argparse.ArgumentParser, table: dict[str, Command], prog: str) -> None:
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", parser_class=_Parser)
    for name, cmd in table.items():
        p = sub.add_parser(name, help=cmd.summary, description=cmd.description, add_help=False,
                           usage=f"{prog} {name} {cmd.usage}", formatter_class=_Formatter)
        if cmd.subcommands:
            _add_commands(p, cmd.subcommands, f"{prog} {name}")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (used for the help texts and top-level options; subcommands parse their own argv)."""
    parser = _Parser(
        prog=PROG,
        formatter_class=_Formatter,
        usage=f"{PROG} [-h] [--version] COMMAND [ARGS ...]",
        description="att3d: amortized text-to-3D generation. One model maps any prompt (text encoder -> "
                    "hypernetwork) to a neural field, trained for many prompts at once with score distillation.",
        epilog=f"Run '{PROG} COMMAND --help' for the arguments of a command. Set ATT3D_DEBUG=1 to see tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _add_commands(parser, COMMANDS, PROG)
    return parser


def command_parser(path: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser for the implementation of ``att3d <path>`` (e.g. ``"eval prior"``): prog and description
    come from the command table, so that ``att3d eval prior --help`` matches ``att3d eval --help``."""
    cmd = _lookup(path.split())
    kwargs.setdefault("description", cmd.description)
    return argparse.ArgumentParser(prog=f"{PROG} {path}", **kwargs)


def _help_text(words: list[str]) -> str:
    parser = build_parser()
    for w in words:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[w]
    return parser.format_help()


def _wants_help(argv: Sequence[str]) -> bool:
    head = argv[: argv.index("--")] if "--" in argv else argv
    return any(a in HELP_FLAGS for a in head)


def _unknown(kind: str, name: str, table: dict[str, Command], prog: str) -> UsageError:
    close = difflib.get_close_matches(name, table, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f" (choose from: {', '.join(table)})"
    return UsageError(f"unknown {kind} '{name}' for '{prog}'{hint}")


def _run(words: list[str], cmd: Command, argv: list[str]) -> int:
    prog = " ".join([PROG, *words])
    if cmd.subcommands:
        if not argv or argv[0] in HELP_FLAGS:
            if argv:
                print(_help_text(words), end="")
                return 0
            raise UsageError(f"'{prog}' needs a target: {', '.join(cmd.subcommands)} (see '{prog} --help')")
        name, rest = argv[0], argv[1:]
        if name not in cmd.subcommands:
            raise _unknown("target", name, cmd.subcommands, prog)
        return _run([*words, name], cmd.subcommands[name], rest)

    assert cmd.target is not None
    wants_help = _wants_help(argv)
    try:
        fn = import_target(cmd.target, f"'{prog}'")
    except NotAvailableError:
        if not wants_help:
            raise
        print(_help_text(words), end="")
        print(f"\n'{prog}' is not available yet in att3d {__version__}.")
        return 0
    if wants_help and not cmd.own_help:
        print(_help_text(words))
    return _exit_code(fn(argv))


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(f"{PROG}: error: {' '.join(str(code).split())}", file=sys.stderr)
    return 1


def dispatch(argv: Sequence[str]) -> int:
    """Parse the top-level options and run the subcommand; errors propagate (see :func:`main`)."""
    argv = list(argv)
    # Top-level options come before the command; everything after the command belongs to it, untouched.
    i = next((k for k, a in enumerate(argv) if not a.startswith("-")), len(argv))
    parser = build_parser()
    parser.parse_args(argv[:i])  # -h / --version exit here; an unknown option is a UsageError
    if i == len(argv):
        parser.print_help(sys.stderr)
        return 2
    name = argv[i]
    if name not in COMMANDS:
        raise _unknown("command", name, COMMANDS, PROG)
    return _run([name], COMMANDS[name], argv[i + 1:])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``att3d`` console script: returns the exit code, never raises."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug()
    if debug:
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        return dispatch(argv)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse or Hydra inside a subcommand
        return _exit_code(e.code)
    except BrokenPipeError:  # e.g. `att3d --help | head -1`
        try:
            sys.stdout = open(os.devnull, "w")  # keeps the interpreter from failing again at exit
        except OSError:
            pass
        return 141
    except Exception as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, USER_ERRORS) or type(e).__module__.split(".")[0] in ("hydra", "omegaconf"):
            code, msg = 2, one_line(e)  # a config error (bad override, missing key) is the user's to fix
        elif isinstance(e, ModuleNotFoundError):
            code, msg = 1, f"{one_line(e)} (a dependency is missing; reinstall att3d with its dependencies)"
        else:
            hint = "" if debug else "; ATT3D_DEBUG=1 shows the traceback"
            code, msg = 1, f"internal error: {type(e).__name__}: {one_line(e)}{hint}"
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
