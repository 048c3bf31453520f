"""``warmserve models``: generate local model families."""

from __future__ import annotations

import click


@click.group()
def command() -> None:
    """Generate local model families (random Llama weights, locally trained tokenizers)."""


@command.command("make")
@click.option("--family", required=True, help="Family name; models are named FAMILY-0, FAMILY-1…")
@click.option("--replicas", default=2, show_default=True, help="Models in the family.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the models and registry.yaml [default: warmserve.models-dir].",
)
@click.option(
    "--size",
    type=click.Choice(["tiny", "mini", "small", "8b"]),
    default="tiny",
    show_default=True,
    help="tiny/mini: MBs, for tests; small: hundreds of MB; 8b: Llama-3-8B's shape (16 GB bf16).",
)
@click.option("--seed", default=0, show_default=True, help="Replica i gets seed SEED+i.")
def make(family: str, replicas: int, out: str | None, size: str, seed: int) -> None:
    """Make (or complete) a family of models and merge it into OUT/registry.yaml."""
    from warmserve import config
    from warmserve.models.make import make_family

    out = out or config.get("models-dir")
    registry = make_family(family, size, replicas, out, seed)
    for spec in registry.values():
        click.echo(f"{spec.name}\t{spec.nbytes / 2**20:.1f} MiB\t{spec.path}")


@command.command("defaults")
@click.option("--out", type=click.Path(file_okay=False), default=None)
def defaults(out: str | None) -> None:
    """Make the default families the embedded cluster serves (tiny x4, mini x3)."""
    from warmserve import config
    from warmserve.models.make import ensure_default_models

    registry = ensure_default_models(out or config.get("models-dir"))
    for spec in registry.values():
        click.echo(f"{spec.name}\t{spec.family}\t{spec.nbytes / 2**20:.1f} MiB")
