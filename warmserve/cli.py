"""The ``warmserve`` command.

Subcommands are imported only when they run, so ``warmserve trace ...`` does not pay for importing
vLLM and ``warmserve --help`` stays fast. Each entry names ``module:attribute`` of a click command.
"""

from __future__ import annotations

import importlib

import click

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("warmserve.launcher", "Start the embedded cluster and the front door on this machine."),
    "frontdoor": ("warmserve.frontdoor.cli", "Serve the OpenAI API in front of a running cluster."),
    "models": ("warmserve.models.cli", "Generate local model families (random Llama weights)."),
    "trace": ("warmserve.traces.cli", "Convert, synthesize and describe Parquet traces."),
    "forecast": ("warmserve.evaluation.cli", "Evaluate load forecasters on real traces."),
    "simulate": ("warmserve.sim.cli", "Replay a workload against a simulated cluster."),
    "report": ("warmserve.report.cli", "TTFT/TPOT tables and plots from result Parquet files."),
    "replay": ("warmserve.replay", "Replay a Parquet workload against a front door over HTTP."),
    "status": ("warmserve.status", "Show devices, models and load of a running cluster."),
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(COMMANDS[cmd_name][0])
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="warmserve")
def main() -> None:
    """WarmServe: serve many LLMs on a shared device pool, prewarming ahead of bursts."""


if __name__ == "__main__":
    main()
