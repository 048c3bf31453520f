"""``warmserve trace``: convert real traces, synthesize workloads, sample ServeGen, show stats.

Bad input (an unknown format, a malformed file, options that do not fit) exits with status 2 and
a message naming the file, row and column; the output file is then not created, since every
writer goes through a temporary file.
"""

from __future__ import annotations

import shlex

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from warmserve.registry import RegistryError
from warmserve.traces.schema import TraceError


class InputError(click.ClickException):
    """Bad input to a trace command: exit status 2, as for a usage error."""

    exit_code = 2


def _command_line(ctx: click.Context) -> str:
    """A canonical command line that remakes this output (parameters that differ from defaults)."""
    words = ["warmserve", "trace", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or value == () or value is False:
            continue
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif value is True:
            words.append(param.opts[0])
        else:
            for v in value if isinstance(value, tuple) else (value,):
                words += [param.opts[0], str(v)]
    return shlex.join(words)


@click.group()
def command() -> None:
    """Convert real traces to Parquet workloads, synthesize multi-model workloads, show stats."""


@command.command("convert")
@click.argument("src", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["azure", "burstgpt", "mooncake", "servegen"]),
    help="Format of SRC [default: detected from its first line].",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Parquet file.")
@click.option(
    "--model",
    default=None,
    help="Model name (azure: from the file name, azure-conv/azure-code; mooncake: "
    "mooncake-STEM; burstgpt: replaces the Model column).",
)
@click.option(
    "--drop-failures",
    is_flag=True,
    help="burstgpt: drop failed requests (Response tokens = 0); kept by default.",
)
@click.option("--category", default=None, help="servegen: keep only this category (language…).")
@click.option(
    "--aggregate",
    is_flag=True,
    help="servegen: write the per-model sum over clients (client_id -1).",
)
@click.option(
    "--top-clients",
    type=click.IntRange(min=1),
    default=None,
    help="servegen: keep each model's K clients with the largest total rate "
    "(with --aggregate: the sum rows and these clients).",
)
def convert(src, fmt, out, model, drop_failures, category, aggregate, top_clients) -> None:
    """Convert the raw trace SRC to a Parquet workload (or a ServeGen rate series)."""
    from warmserve.traces import convert as conv
    from warmserve.traces import servegen
    from warmserve.traces.schema import provenance, write_workload

    ctx = click.get_current_context()
    try:
        fmt = fmt or conv.detect_format(src)
        servegen_only = category or aggregate or top_clients
        if fmt != "servegen" and servegen_only:
            raise InputError("--category, --aggregate and --top-clients apply to servegen only")
        if fmt == "servegen" and (model or drop_failures):
            raise InputError("--model and --drop-failures do not apply to servegen")
        if drop_failures and fmt != "burstgpt":
            raise InputError("--drop-failures applies to burstgpt only")
        meta = provenance(src, _command_line(ctx), conv.LICENSES[fmt])
        meta["format"] = fmt
        if fmt == "servegen":
            table = servegen.convert_servegen(src)
            if category:
                table = table.filter(pc.field("category") == category)
                if table.num_rows == 0:
                    raise InputError(f"{src}: no rows of category {category!r}")
            parts = [servegen.aggregate(table)] if aggregate else []
            if top_clients:
                parts.append(servegen.top_clients(table, top_clients))
            table = pa.concat_tables(parts) if parts else table
            servegen.write_rates(table, out, meta)
            click.echo(f"{table.num_rows} windows -> {out}")
            return
        if fmt == "azure":
            table, extra = conv.convert_azure(src, model)
        elif fmt == "burstgpt":
            table, extra = conv.convert_burstgpt(src, model, drop_failures)
        else:
            table, extra = conv.convert_mooncake(src, model)
        write_workload(table, out, {**meta, **extra})
    except (TraceError, OSError) as e:
        raise InputError(str(e)) from None
    click.echo(f"{table.num_rows} requests -> {out}")


def _model_names(models: int | None, names: str | None, registry: str | None) -> list[str]:
    """Names from --model-names, else the registry's first N, else model-0..N-1."""
    from warmserve.registry import Registry

    if names and registry:
        raise InputError("give --model-names or --registry, not both")
    if names:
        listed = [n.strip() for n in names.split(",") if n.strip()]
    elif registry:
        listed = list(Registry.from_yaml(registry))
        if models is not None:
            if models > len(listed):
                raise InputError(f"--models {models} but {registry} lists {len(listed)} models")
            listed = listed[:models]
    elif models is None:
        raise InputError("give --models, --model-names or --registry")
    else:
        listed = [f"model-{i}" for i in range(models)]
    if models is not None and len(listed) != models:
        raise InputError(f"--models {models} but {len(listed)} names were given")
    return listed


@command.command("synth")
@click.option("--models", type=click.IntRange(min=1), default=None, help="How many models.")
@click.option("--alpha", type=float, required=True, help="Popularity of model i ~ (i+1)^-alpha.")
@click.option("--rps", type=float, required=True, help="Total requests per second (replay time).")
@click.option("--duration", type=float, required=True, help="Seconds of replay time.")
@click.option(
    "--cv", type=float, default=None, help="Gamma inter-arrival CV (burstiness) [default: Poisson]."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--compress",
    type=float,
    default=1.0,
    show_default=True,
    help="Trace seconds per replay second (288: a day in 5 minutes).",
)
@click.option(
    "--source",
    "sources",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Rate-curve source: a workload or ServeGen rate-series Parquet (repeatable) "
    "[default: traces/burstgpt.parquet].",
)
@click.option(
    "--tokens",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Workload to draw token counts from [default: traces/azure_conv.parquet].",
)
@click.option("--model-names", default=None, help="Comma-separated names, most popular first.")
@click.option(
    "--registry",
    type=click.Path(dir_okay=False),
    default=None,
    help="Registry YAML whose models (in order) name the workload's models.",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def synth(
    models, alpha, rps, duration, cv, seed, compress, sources, tokens, model_names, registry, out
) -> None:
    """Synthesize a multi-model workload from real rate curves and real token counts."""
    from warmserve.traces.schema import COMMAND, write_workload
    from warmserve.traces.synth import synthesize

    ctx = click.get_current_context()
    try:
        names = _model_names(models, model_names, registry)
        table = synthesize(
            names,
            alpha,
            rps,
            duration,
            cv=cv,
            seed=seed,
            compress=compress,
            sources=sources or None,
            tokens=tokens,
        )
        write_workload(table, out, {COMMAND: _command_line(ctx)})
    except (TraceError, RegistryError, ValueError, OSError) as e:
        raise InputError(str(e)) from None
    click.echo(f"{table.num_rows} requests of {len(names)} models -> {out}")


@command.command("sample")
@click.argument("rates", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", required=True, help="ServeGen model, e.g. m-large.")
@click.option("--client", type=int, default=None, help="One client [default: all of them].")
@click.option("--start", type=float, default=0.0, show_default=True, help="Trace seconds.")
@click.option("--end", type=float, required=True, help="Trace seconds.")
@click.option(
    "--compress",
    type=float,
    default=1.0,
    show_default=True,
    help="Trace seconds per replay second.",
)
@click.option(
    "--tokens",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Workload to draw token counts from [default: traces/azure_conv.parquet].",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def sample(rates, model, client, start, end, compress, tokens, seed, out) -> None:
    """Draw a per-request workload from a ServeGen rate series (fitted Gamma/Weibull gaps)."""
    from warmserve.traces.convert import model_column
    from warmserve.traces.schema import SCHEMA, provenance, write_workload
    from warmserve.traces.servegen import read_rates, sample_arrivals
    from warmserve.traces.synth import DEFAULT_TOKENS, draw_tokens, license_of

    ctx = click.get_current_context()
    if not end > start or compress <= 0:
        raise InputError("need --end > --start and a positive --compress")
    try:
        rng = np.random.default_rng(seed)
        times = sample_arrivals(read_rates(rates), model, client, start, end, rng)
        inp, outp = draw_tokens(tokens or DEFAULT_TOKENS, len(times), rng)
        name = model if client is None else f"{model}/{client}"
        codes = np.zeros(len(times), np.int32)
        table = pa.Table.from_arrays(
            [
                pa.array((times - start) / compress),
                model_column(codes, [name]),
                pa.array(inp),
                pa.array(outp),
            ],
            schema=SCHEMA,
        )
        meta = provenance(rates, _command_line(ctx), license_of(rates))
        write_workload(table, out, meta)
    except (TraceError, ValueError, OSError) as e:
        raise InputError(str(e)) from None
    click.echo(f"{table.num_rows} requests -> {out}")


@command.command("stats")
@click.argument("workload", type=click.Path(exists=True, dir_okay=False))
@click.option("--window", type=float, default=300.0, show_default=True, help="Seconds.")
@click.option("--png", type=click.Path(dir_okay=False), default=None, help="Write a plot here.")
@click.option(
    "--prefill-tps",
    type=float,
    default=None,
    help="Prompt tokens/s for the duration estimate [default: 5000].",
)
@click.option(
    "--tpot",
    type=float,
    default=None,
    help="Seconds per output token for the duration estimate [default: 0.03].",
)
def stats(workload, window, png, prefill_tps, tpot) -> None:
    """Per-model counts and average/peak concurrency per window of WORKLOAD.

    A request is taken to be in flight from its arrival for input_tokens/prefill_tps +
    output_tokens*tpot seconds (one uncontended request; queueing would add to it).
    """
    from warmserve.traces import stats as st
    from warmserve.traces.schema import read_workload

    if window <= 0:
        raise InputError("--window must be positive")
    try:
        table = read_workload(workload)
        loads = st.window_load(table, window, prefill_tps or st.PREFILL_TPS, tpot or st.TPOT)
    except (TraceError, ValueError) as e:
        raise InputError(str(e)) from None
    rows = st.summary(table, loads)
    span = float(table["arrival"].to_numpy().max())
    click.echo(f"{workload}: {table.num_rows} requests, {len(rows)} models, {span:.0f} s")
    click.echo(
        f"{'model':<28}{'requests':>10}{'share':>8}{'rps':>9}{'in':>8}{'out':>7}"
        f"{'avg load':>10}{'peak':>7}"
    )
    for r in rows:
        click.echo(
            f"{r['model']:<28}{r['requests']:>10}{r['share']:>8.3f}{r['rps']:>9.3f}"
            f"{r['input_tokens']:>8.0f}{r['output_tokens']:>7.0f}"
            f"{r['avg_load']:>10.2f}{r['peak_load']:>7.0f}"
        )
    if png:
        st.plot(loads, window, png, title=workload)
        click.echo(f"plot -> {png}")
