"""The ``att3d`` command.

    att3d train experiment=quickstart trainer.max_steps=2000    # Hydra overrides
    att3d eval prior --help
    att3d --help

Each subcommand is one row of :data:`COMMANDS`: its help text and the ``"module:function"`` that implements
it, one module per command in this package (:mod:`att3d.cli.generate`, ...; ``train`` is the Hydra app of
:mod:`att3d.cli.train`, which reports its errors per rank itself). The module is imported only when its
subcommand runs, so ``att3d --help``
stays instant (no torch). An implementing function takes the rest of the command line (``list[str]``, passed
on untouched) and returns an exit code; its parser is :class:`~att3d.cli._args.CommandParser`.

Errors, mapped to exit codes here and only here (:func:`main`): an :class:`~att3d.utils.errors.Att3dError`, a
missing file, a config error, or a file operation that the operating system refused for a reason the user or the
machine must fix (a full disk, a file size limit, a read-only or unwritable folder, a file in the way:
:data:`~att3d.utils.errors.USER_ERRNOS`) is printed as ``att3d: error: <message>`` on one line with exit code 2
(for the latter: the path and the cause), any other exception as one line ``internal error`` with exit code 1;
``ATT3D_DEBUG=1`` adds the traceback. Ctrl-C exits with 130 (a signal that stopped a command: 128 + its number).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from att3d import __version__
from att3d.cli._args import PROG, CommandParser, UsageError, command_parser
from att3d.utils.errors import Att3dError, describe_os_error, is_user_os_error, one_line

__all__ = ["COMMANDS", "Command", "CommandParser", "UsageError", "command_parser", "dispatch", "lookup", "main"]

HELP_FLAGS = ("-h", "--help")
# Exceptions reported as the user's to fix (exit code 2), besides Hydra's and OmegaConf's config errors and the
# OSErrors of att3d.utils.errors.USER_ERRNOS (no space, file too large, read-only, a file in the way, ...).
USER_ERRORS = (Att3dError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
               FileExistsError)
#: Texts of a failed write in the errors of libraries that drop the operating system's error: torch.save's zip
#: writer (``[enforce fail at inline_container.cc:672] . unexpected pos ...``), safetensors' ``os error N``.
_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter failed", "file write failed")


def user_message(error: BaseException) -> str | None:
    """The one-line message of an exception that is the user's to fix (exit code 2), or None for a bug.

    An :class:`OSError` names the path and the cause (``/x/run: Read-only file system (EROFS; ...)``); a write
    that a library reports without its cause (torch.save's ``unexpected pos``, safetensors' ``os error 28``) is
    one line too.
    """
    if isinstance(error, Att3dError):
        return one_line(error)
    if isinstance(error, OSError) and (isinstance(error, USER_ERRORS) or is_user_os_error(error)):
        return describe_os_error(error) if error.strerror else one_line(error)
    if isinstance(error, USER_ERRORS) or type(error).__module__.split(".")[0] in ("hydra", "omegaconf"):
        return one_line(error)
    text = " ".join(str(error).split())
    match = re.search(r"os error (\d+)", text)
    if match is not None:
        code = int(match.group(1))
        return describe_os_error(OSError(code, os.strerror(code)))
    if any(t in text for t in _WRITE_FAILURES):
        return (f"a file could not be written (a full disk, a file size limit or a read-only folder?): "
                f"{text.split(' (')[0][:200]}")
    return None


@dataclass(frozen=True)
class Command:
    """One subcommand (or a group of them).

    Attributes:
        target: ``"module:function"``; the function is called with the remaining argv and returns an exit code.
            ``None`` for a group, which dispatches to ``subcommands`` by the next word.
        summary: one line for the listing in the parent's ``--help``.
        description: one or two sentences for the command's own ``--help``.
        usage: how the arguments look, for the usage line.
        own_help: the target prints the description in its own ``--help`` (targets whose parser is a
            :class:`CommandParser`). When False (Hydra apps), ``--help`` prints the description first and then
            forwards ``--help`` to the target for the details.
        subcommands: the targets of a group.
    """

    target: str | None
    summary: str
    description: str
    usage: str = "[ARGS ...]"
    own_help: bool = True
    subcommands: dict[str, Command] = field(default_factory=dict)


# The command table. Adding a subcommand = one module in att3d/cli/ and one row here.
COMMANDS: dict[str, Command] = {
    "train": Command(
        "att3d.cli.train:main",
        "train an amortized text-to-3D model, any stage (Hydra app)",
        "Train one amortized model on a set of prompts with score distillation from a diffusion prior. "
        "Arguments are Hydra overrides (e.g. experiment=quickstart trainer.max_steps=2000; --cfg job prints "
        "the composed config); stage=mesh init_from=MODEL trains LATTE3D's textured-mesh stage from a trained "
        "model. The run folder runs/<experiment>/<timestamp>/ gets the resolved config, logs, checkpoints and "
        "TensorBoard events.",
        usage="[OVERRIDE ...] [--cfg job] [--help]",
        own_help=False,
    ),
    "generate": Command(
        "att3d.cli.generate:main",
        "text to 3D with a trained model: meshes, renders",
        "Turn prompts into 3D objects with a trained amortized model in one forward pass each (no "
        "per-prompt optimisation), and export textured meshes and turntable renders.",
    ),
    "interpolate": Command(
        "att3d.cli.interpolate:main",
        "render along interpolations between prompts",
        "Interpolate between the text embeddings of prompts and render or export the objects that a "
        "trained amortized model produces along the way.",
    ),
    "refine": Command(
        "att3d.cli.refine:main",
        "fine-tune a trained model on a few prompts",
        "Refine a trained amortized model on one or a few prompts with more score distillation steps, "
        "starting from the amortized result instead of from scratch.",
    ),
    "eval": Command(
        None,
        "evaluate priors and models on the shapes world",
        "Measure quality against the shapes world, whose every object (true shape and colour of each prompt) is "
        "known exactly.",
        usage="TARGET [ARGS ...]",
        subcommands={
            "prior": Command(
                "att3d.cli.eval:prior_main",
                "score the shapes-world diffusion prior",
                "Evaluate the embedded view-conditioned diffusion prior: how well its samples match the "
                "ground-truth renders of their captions.",
            ),
            "paraphrase": Command(
                "att3d.cli.eval:paraphrase_main",
                "score reworded prompts the model never trained on",
                "Evaluate an amortized model on paraphrases of the shapes-world captions (colour and shape "
                "synonyms, other sentence templates) with the same metrics as 'att3d eval model'.",
            ),
            "model": Command(
                "att3d.cli.eval:model_main",
                "score an amortized model (IoU, colour, retrieval)",
                "Evaluate a trained amortized model on the shapes world (seen and held-out prompts) with the "
                "shapes-world metrics: volume IoU, colour error, silhouette IoU and retrieval accuracy.",
            ),
        },
    ),
    "bench": Command(
        "att3d.cli.bench:main",
        "speed: generation latency, training throughput",
        "Time generation per prompt and training steps per second on this machine's device.",
    ),
    "demo": Command(
        "att3d.demo.command:main",
        "local web app: prompt to 3D in the browser",
        "Serve a local web app (gradio, http://127.0.0.1:7860 by default): a prompt becomes a textured, rotatable "
        "3D object in one forward pass (GLB/OBJ/PLY downloads), two prompts and a slider walk the interpolation "
        "between them, and the model cards are shown. No public link unless --share.",
        usage="[--host HOST] [--port PORT] [--model PATH ...] [--out DIR]",
    ),
}


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


def import_target(target: str) -> Callable[..., object]:
    """The function of ``"module:function"`` (``main`` when no function is named), imported now."""
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr or "main")


def lookup(words: Sequence[str]) -> Command:
    """The row of a command path (``["eval", "prior"]``); KeyError for an unknown one."""
    table, cmd = COMMANDS, None
    for w in words:
        cmd = table[w]
        table = cmd.subcommands
    if cmd is None:
        raise KeyError("empty command path")
    return cmd


def _add_commands(parser: argparse.ArgumentParser, table: dict[str, Command], prog: str) -> None:
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", parser_class=CommandParser)
    for name, cmd in table.items():
        p = sub.add_parser(name, help=cmd.summary, description=cmd.description, add_help=False,
                           usage=f"{prog} {name} {cmd.usage}", formatter_class=_Formatter)
        if cmd.subcommands:
            _add_commands(p, cmd.subcommands, f"{prog} {name}")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (used for the help texts and top-level options; subcommands parse their own argv)."""
    parser = CommandParser(
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
    fn = import_target(cmd.target)
    if not cmd.own_help and _wants_help(argv):
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
    """Entry point of the ``att3d`` console script: returns the exit code, never raises.

    The one mapping of exceptions to exit codes: a user error (:data:`USER_ERRORS`, Hydra's and OmegaConf's
    config errors) -> 2, a missing dependency -> 1 naming it, anything else -> 1 ``internal error``, Ctrl-C ->
    130; each printed as one line ``att3d: error: ...`` (``ATT3D_DEBUG=1`` prints the traceback first).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug()
    if debug:
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        return dispatch(argv)
    except KeyboardInterrupt as e:  # Ctrl-C; att3d.train.trainer.StoppedAtOnce carries its signal's exit code
        if debug:
            traceback.print_exc()
        message = getattr(e, "message", None)
        print(f"{PROG}: {message}" if message else f"{PROG}: interrupted", file=sys.stderr)
        return int(getattr(e, "exit_code", 130))
    except SystemExit as e:  # argparse's --help / --version, or Hydra inside a subcommand
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
        user = user_message(e)
        if user is not None:
            code, msg = 2, user  # a config error (bad override, missing key), a refused file operation, ...
        elif isinstance(e, ModuleNotFoundError):
            code, msg = 1, f"{one_line(e)} (a dependency is missing; reinstall att3d with its dependencies)"
        else:
            hint = "" if debug else "; ATT3D_DEBUG=1 shows the traceback"
            code, msg = 1, f"internal error: {type(e).__name__}: {one_line(e)}{hint}"
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return code
