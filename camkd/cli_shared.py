"""What every command module of the `camkd` CLI shares (`cli.py`, `cli_bench.py`): the group and command classes,
``friendly``, the choices built from where they are defined, the options several commands take, and --out.

Every input error is one line on stderr starting with ``error:`` and exit code 2: our own (CamkdError, through
``friendly``) and the parser's (bad range, missing option, unknown choice, through ``OneLineErrors``) alike.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

try:  # recent typer vendors click as typer._click (Abort in typer.exceptions); older releases use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover
    from click.exceptions import Abort, ClickException, NoArgsIsHelpError

from camkd.data import dataset_names
from camkd.device import DEVICES
from camkd.errors import CamkdError
from camkd.methods import list_methods
from camkd.output import output_prefix, write_result
from camkd.precision import PRECISIONS
from camkd.store.layout import DTYPES


class OneLineErrors(TyperGroup):
    """Print the parser's usage errors as one ``error:`` line (exit 2) instead of a boxed block."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as e:
            typer.echo(e.ctx.get_help() if e.ctx else str(e))
            sys.exit(0)
        except ClickException as e:
            ctx = getattr(e, "ctx", None)  # the (sub)command's own help: 'camkd bench speed --help'
            where = f"; see '{' '.join(['camkd', *ctx.command_path.split()[1:]]) if ctx else 'camkd'} --help'"
            # one line: a missing choice lists the choices one per line ("Choose from:\n\ta,\n\tb")
            msg = " ".join(e.format_message().replace("Value error, ", "").split()).rstrip(".").replace(". Choose from:",
                                                                                                     "; choose from")
            typer.echo(f"error: {msg[0].lower() + msg[1:] if msg else msg}{where}", err=True)
            sys.exit(2)
        except Abort:
            typer.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def _argument_name(param: TyperArgument) -> str:
    return (param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else "")


class PlainHelp(TyperCommand):
    """A command (``@app.command(..., cls=PlainHelp)``) whose parameters --help and the usage line name as click
    does rather than by typer's Python types (``STORE <str>``, ``{RUN}...``, ``--arch <str>``,
    ``--epochs <int range>``): arguments by their metavar (``STORE``, ``RUN...``), options by theirs or else by
    their name (``--arch ARCH``), choices as ``a|b|c``. Only click's public hooks: the options' ``metavar``,
    ``collect_usage_pieces`` and ``format_options``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperOption) and not param.is_flag and param.metavar is None:
                desc = param.type_descriptor
                choices = desc.choices if desc.is_choice else None
                param.metavar = "|".join(str(getattr(c, "value", c)) for c in choices) if choices else param.name.upper()

    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            pieces += [_argument_name(param)] if isinstance(param, TyperArgument) else param.get_usage_pieces(ctx)
        return pieces

    def format_options(self, ctx: typer.Context, formatter) -> None:
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if isinstance(param, TyperArgument):
                arguments.append((_argument_name(param), record[1]))  # its help and [required], without "<str>"
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def friendly(fn: Callable) -> Callable:
    """Turn CamkdError (and Ctrl-C) into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from camkd import dist

        try:
            return fn(*args, **kwargs)
        except CamkdError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; finished work is kept: rerun the same command to continue "
                       "(train-teacher/distill: add --resume once an epoch has finished)", err=True)
            raise typer.Exit(code=130) from None
        finally:
            dist.close()

    return wrapper


def choices(name: str, values: list[str]) -> type[Enum]:
    """A str Enum built from a registry or a module's list, so the parser validates and --help lists the names."""
    return Enum(name, {v.replace("-", "_"): v for v in values}, type=str)


DatasetChoice = choices("Dataset", dataset_names())
MethodChoice = choices("Method", list_methods())
DtypeChoice = choices("Dtype", list(DTYPES))
DeviceChoice = choices("Device", list(DEVICES))
PrecisionChoice = choices("Precision", list(PRECISIONS))

DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder with the dataset files (torchvision's layout).")]
DeviceOpt = Annotated[DeviceChoice, typer.Option("--device", help="auto picks cuda when available.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", metavar="PREFIX", help="Also write PREFIX.json, PREFIX.md and "
                                                "PREFIX.png (a .json, .md or .png given is taken off); without it "
                                                "nothing is written.")]


def as_str(p: Path | None) -> str | None:
    return str(p) if p is not None else None


def out_prefix(out: Path | None) -> Path | None:
    """--out PREFIX of a benchmark or report, checked before any work or output (a given .json/.md/.png is dropped)."""
    return output_prefix(out) if out is not None else None


def show(r: dict, to_markdown: Callable[[dict], str], plot: Callable, prefix: Path | None) -> None:
    """Print a benchmark's or report's table; with --out also write PREFIX.json, .md and .png and name them."""
    table = to_markdown(r)
    typer.echo(table)
    if prefix is not None:
        typer.echo(f"\n-> {', '.join(write_result(r, prefix, table, plot(r)))}")
