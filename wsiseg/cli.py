"""The ``wsiseg`` command line: parse, call the library, print.

Errors a user can cause are :class:`~wsiseg.errors.WsisegError`; they are
printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import sys

import click

from wsiseg import __version__
from wsiseg.errors import WsisegError


class WsisegGroup(click.Group):
    """Turns library errors into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except WsisegError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=WsisegGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wsiseg")
def main() -> None:
    """Two-stage segmentation of whole-slide and other very large images.

    A cheap Model 1 segments a downsampled view; a Model 2 re-segments at
    full resolution only the tiles where Model 1 is uncertain.
    """


def _not_yet(command: str) -> None:
    raise WsisegError(f"'wsiseg {command}' is not available yet in wsiseg {__version__}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def segment(args: tuple[str, ...]) -> None:
    """Segment slides with a two-stage model bundle (not available yet)."""
    _not_yet("segment")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train(args: tuple[str, ...]) -> None:
    """Train a two-stage pair on a data set (not available yet)."""
    _not_yet("train")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def evaluate(args: tuple[str, ...]) -> None:
    """Compare two-stage and full-resolution inference (not available yet)."""
    _not_yet("evaluate")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def info(args: tuple[str, ...]) -> None:
    """Describe a slide: levels, sizes, pixel size (not available yet)."""
    _not_yet("info")


@main.command()
def models() -> None:
    """List the architectures and backbones wsiseg can build."""
    from wsiseg.models import available_backbones, available_models

    click.echo("architectures: " + ", ".join(available_models()))
    click.echo("backbones:     " + ", ".join(available_backbones()))


if __name__ == "__main__":  # pragma: no cover
    main()
