"""Flags the preloads and ``warmserve frontdoor`` share, checked and resolved as they are parsed.

``dask scheduler`` and ``dask worker`` parse a preload's flags (``validate_preload_argv``) before
they start a server, but once a server runs, Dask only logs a preload that raises and runs on
without it (``warmserve status`` then asks for the preload the operator gave). So what can make
a preload fail is checked here, in click callbacks: a missing or broken registry, an unreadable
config file, a bad value in the configuration. The command then ends before any server starts,
with one ``Error: ...`` line and exit status 1.

Paths are made absolute here, where they are read: flags against the working directory of the
command they were given to, paths inside a config file against that file's folder. Later
readers (a worker process, a registry reload) then read what the operator named.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click
import dask.config
import yaml

from warmserve import config
from warmserve.registry import REGISTRY_FILE, Registry, RegistryError

F = TypeVar("F", bound=Callable[..., Any])

# Keys of ``warmserve.*`` that name paths: resolved against the folder of the file that sets them.
PATH_KEYS = ("models-dir", "scheduler.history-dir")


class OptionError(click.ClickException):
    """A flag that cannot work. A ClickException rather than a UsageError: click prints the one
    ``Error:`` line without the usage text of ``dask_setup``, which the operator never typed."""


def registry_file(path: str | None) -> str:
    """The registry YAML, absolute: ``path``, else ``<warmserve.models-dir>/registry.yaml``."""
    return os.path.abspath(path or os.path.join(config.get("models-dir"), REGISTRY_FILE))


def load_config_file(path: str) -> None:
    """Merge a YAML file of ``warmserve.*`` keys (with or without the top key) into dask.config,
    its relative paths (:data:`PATH_KEYS`) resolved against the file's folder."""
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise ValueError("expected a mapping of warmserve.* keys")
    section = doc.get("warmserve", doc)
    if not isinstance(section, dict):
        raise ValueError("expected a mapping under 'warmserve'")
    section = dask.config.expand_environment_variables(section)
    base = os.path.dirname(os.path.abspath(path))
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = section
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = os.path.join(base, os.path.expanduser(node[leaf]))
    dask.config.update(dask.config.config, {"warmserve": section})


def config_option(flag: str, check: Callable[[], None] | None = None) -> Callable[[F], F]:
    """``flag`` names a config YAML merged into dask.config as it is parsed (before the other
    flags, whose defaults may come from it); a ``warmserve.*`` key that is no setting, the
    file's or the environment's, then fails (:func:`warmserve.config.check_keys`), and
    ``check`` validates the values (ValueError, TypeError or KeyError: what is wrong)."""

    def merge(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None:
            path = os.path.abspath(value)
            try:
                load_config_file(path)
            except (OSError, yaml.YAMLError, ValueError) as e:
                raise OptionError(f"{flag} {path}: {' '.join(str(e).split())}") from None
        try:
            config.check_keys()
            if check is not None:
                check()
        except (ValueError, TypeError, KeyError) as e:
            where = f"{flag} {os.path.abspath(value)}" if value else "warmserve configuration"
            raise OptionError(f"{where}: {e}") from None
        return value

    return click.option(
        flag,
        default=None,
        is_eager=True,
        expose_value=False,
        callback=merge,
        help="YAML of warmserve.* keys (relative paths in it: against its folder).",
    )


def registry_option(flag: str) -> Callable[[F], F]:
    """``flag`` names the registry YAML; the callback gives its absolute path once it reads."""

    def resolve(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
        path = registry_file(value)
        try:
            Registry.from_yaml(path)
        except RegistryError as e:
            raise OptionError(f"{flag}: {e}") from None
        return path

    return click.option(
        flag,
        default=None,
        callback=resolve,
        help="Model registry YAML [default: <warmserve.models-dir>/registry.yaml].",
    )


def api_key_option() -> Callable[[F], F]:
    """``--api-key`` (or ``WARMSERVE_API_KEY``): the key the front door asks for, set as
    ``warmserve.frontdoor.api-key`` as it is parsed, so the front door and the demo read it
    where every other front door setting is read."""

    def keep(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value:
            dask.config.set({"warmserve.frontdoor.api-key": value})
        return value

    return click.option(
        "--api-key",
        envvar="WARMSERVE_API_KEY",
        default=None,
        callback=keep,
        expose_value=False,
        help="Require 'Authorization: Bearer KEY' on /v1/* (env WARMSERVE_API_KEY).",
    )


# ``warmserve frontdoor``'s and ``warmserve status``'s TLS flags, named as ``dask scheduler`` and
# ``dask worker`` name theirs, and the ``distributed.comm.tls.*`` key each sets.
TLS_FLAGS = {
    "--tls-ca-file": ("ca-file", "CA certificate (PEM) that signed the cluster's certificates."),
    "--tls-cert": ("client.cert", "This process's certificate (PEM), signed by that CA."),
    "--tls-key": ("client.key", "Its private key (PEM), unless the certificate file holds it."),
}


def tls_options() -> Callable[[F], F]:
    """The TLS flags: this process's certificate as a Dask client, set in
    ``distributed.comm.tls.*`` once all three are parsed, so every comm it opens (its Dask
    client, the front door's streams from workers, ``warmserve status``'s probe) uses it, and
    ``distributed.comm.require-encryption`` so none goes out in the clear. A CA without a
    certificate, or the reverse, ends the command with one ``Error:`` line."""

    def keep(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
        given = ctx.meta.setdefault("warmserve.tls", {})
        given[param.opts[0]] = value and os.path.abspath(value)
        if len(given) < len(TLS_FLAGS) or not any(given.values()):
            return
        if not (given["--tls-ca-file"] and given["--tls-cert"]):
            raise OptionError("--tls-ca-file and --tls-cert come together (and --tls-key)")
        settings = {f"distributed.comm.tls.{TLS_FLAGS[f][0]}": path for f, path in given.items()}
        dask.config.set({**settings, "distributed.comm.require-encryption": True})

    def decorate(command: F) -> F:
        for flag, (_, text) in reversed(TLS_FLAGS.items()):
            command = click.option(
                flag,
                type=click.Path(exists=True, dir_okay=False),
                default=None,
                expose_value=False,
                callback=keep,
                help=text,
            )(command)
        return command

    return decorate


def public_dashboard_option(flag: str) -> Callable[[F], F]:
    """``flag`` lets this process's HTTP server (dashboard, /metrics) listen where Dask's
    ``--dashboard-address`` says, every interface included, by setting
    ``warmserve.public-dashboard`` (see :mod:`warmserve.loopback`)."""

    def keep(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            dask.config.set({"warmserve.public-dashboard": True})

    return click.option(
        flag,
        is_flag=True,
        expose_value=False,
        callback=keep,
        help="Let the dashboard and /metrics listen on every interface when "
        "--dashboard-address says so (default: moved to 127.0.0.1, same port).",
    )
