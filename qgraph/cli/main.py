"""The ``qgraph`` command line.

Exit status: 0 on success, 2 on a user error (one line naming the problem, no traceback), 1 on an internal failure
(the traceback is printed for the bug report).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path

import click

from qgraph import __version__
from qgraph.errors import QGraphError

logger = logging.getLogger("qgraph.cli")


class _Commands(click.Group):
    """A click group that turns qgraph's user errors into exit status 2 and bugs into exit status 1.

    ``optimize`` is imported when it is looked up: it reads its defaults and choices from qgraph's option objects,
    whose modules import onnx, onnxruntime and the pass library, which ``qgraph --version`` need not wait for.
    """

    #: Command name -> the module that defines it (as a function of the same name).
    lazy_commands = {"optimize": "qgraph.cli.optimize"}

    def list_commands(self, context: click.Context) -> list[str]:
        return sorted({*super().list_commands(context), *self.lazy_commands})

    def get_command(self, context: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands and name not in self.commands:
            import importlib

            self.add_command(getattr(importlib.import_module(self.lazy_commands[name]), name))
        return super().get_command(context, name)

    def invoke(self, context: click.Context):
        try:
            return super().invoke(context)
        except QGraphError as error:
            click.echo(f"qgraph: error: {error}", err=True)
            context.exit(2)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("qgraph: interrupted", err=True)
            context.exit(130)
        except BrokenPipeError:
            # The reader went away (`qgraph passes | head`): not an error of ours. Point stdout at /dev/null so the
            # interpreter's final flush does not fail again, and exit as a process killed by SIGPIPE would.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            context.exit(141)
        except Exception as error:  # a bug in qgraph: keep the traceback for the report
            traceback.print_exc(file=sys.stderr)
            click.echo(f"qgraph: internal error: {type(error).__name__}: {error}", err=True)
            context.exit(1)


def _configure_logging(verbose: int, quiet: bool) -> None:
    """Root logging at the flags' level, written to stderr. Importing onnxruntime-training 1.19.2 calls
    ``logging.basicConfig`` itself (onnxruntime/tools/logger.py), and click resolves the subcommand, importing it,
    before this runs: a plain stderr handler found on the root logger is replaced (another kind, such as a test's
    capture handler, stays), and the level is set whatever handlers there are."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    root = logging.getLogger()
    for handler in [handler for handler in root.handlers if type(handler) is logging.StreamHandler]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="qgraph")
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def cli(verbose: int, quiet: bool) -> None:
    """qgraph makes ONNX models integer: fast, small and still accurate.

    \b
    Typical use:
      qgraph inspect model.onnx                 what is in the model
      qgraph optimize model.onnx -o out.onnx    canonicalize (fold BatchNorm, constants, dead code)
      qgraph passes                             the passes qgraph can run
    """
    _configure_logging(verbose, quiet)


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(model: Path, as_json: bool) -> None:
    """Describe MODEL: versions, inputs and outputs, operators, parameters and size.

    The model is shown as written (no opset conversion); external data is located but never read.
    """
    import dataclasses

    from qgraph.ir import load_model
    from qgraph.summary import human_bytes, human_count, summarize

    summary = summarize(load_model(model, normalize=False, infer_shapes=True))
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(summary), indent=2))
        return
    opsets = ", ".join(f"{domain} {version}" for domain, version in summary.opsets.items())
    click.echo(f"model      {model}")
    click.echo(f"IR         {summary.ir_version}    opsets: {opsets}")
    if summary.producer:
        click.echo(f"producer   {summary.producer}")
    for title, signatures in (("inputs", summary.inputs), ("outputs", summary.outputs)):
        click.echo(f"{title}")
        for signature in signatures:
            click.echo(f"  {signature.describe()}")
    external = (
        f" ({human_bytes(summary.external_parameter_bytes)} external)" if summary.external_parameter_bytes else ""
    )
    click.echo(
        f"parameters {human_count(summary.parameter_count)} ({human_bytes(summary.parameter_bytes)}){external}"
    )
    extra = []
    if summary.subgraph_count:
        extra.append(f"{summary.subgraph_count} subgraphs")
    if summary.function_count:
        extra.append(f"{summary.function_count} functions")
    click.echo(f"nodes      {summary.node_count}" + (f" ({', '.join(extra)})" if extra else ""))
    width = max((len(name) for name in summary.operator_counts), default=0)
    for name, count in summary.operator_counts.items():
        click.echo(f"  {name:<{width}}  {count}")


@cli.command("passes")
def list_passes() -> None:
    """List the passes qgraph can run, by phase, with one line each."""
    from qgraph.passes.infrastructure import available_passes
    from qgraph.pipeline import CANONICAL_PASSES

    passes = available_passes()
    width = max((len(name) for name in passes), default=0)
    current_phase = None
    for name, pass_class in passes.items():
        if pass_class.phase != current_phase:
            current_phase = pass_class.phase
            click.echo(f"{current_phase.label}:")
        marker = "*" if name in CANONICAL_PASSES else " "
        click.echo(f" {marker}{name:<{width}}  {pass_class.describe()}")
    click.echo("(* = in the default canonical pipeline)")


def main() -> None:
    cli(prog_name="qgraph")


if __name__ == "__main__":
    main()
