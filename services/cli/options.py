"""Command-line options from the configuration models.

`load_run` reads a `--config` run YAML and turns a refused config into a usage error (exit
code 2, one line per problem, no traceback); `open_run_reader` does the same for a `--run`
that names no run, or no `--run` where several share the Redis, and `redis_client` for a Redis
that refuses this client (a wrong password, TLS). `model_options` gives a command one
`--field-name` option per field of a settings model, with the field's type, default and
description, so that no option is declared twice; `build_model` validates what was given
and names the offending flag when a value is refused. `server_command` is the whole
`rlad serve-*` command of a server: its options, `--config`, the registration options
and the wiring.
"""

from __future__ import annotations

import enum
import functools
import importlib
import inspect
import logging
import socket
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import redis
import redis.asyncio
import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from services.config.base import ConfigError
from services.config.run import RunConfig, load_run_config
from services.config.servers import LOOPBACK_HOSTS, ServerConfig
from services.queue.access import RedisAccessError
from services.queue.connection import NoSuchRun, connect, connect_async, pick_run
from services.queue.queues import QueueReader
from services.queue.registry import DEFAULT_POOL, REGISTRY, AsyncServerRegistry, Registration

M = TypeVar("M", bound=BaseModel)
S = TypeVar("S", bound=ServerConfig)
SETTINGS = "settings"  # the parameter that receives the generated options' values
PLAIN_TYPES = (str, int, float, bool, Path)


REDIS_HINT = "--redis-url / REDIS_URL"


def redis_client(url: str | None) -> redis.Redis:
    """`connect`, with a refusal that a setting fixes a usage error naming it (exit code 2)."""
    try:
        return connect(url)
    except RedisAccessError as exc:
        raise typer.BadParameter(str(exc), param_hint=REDIS_HINT) from None


def async_redis_client(url: str | None) -> redis.asyncio.Redis:
    try:
        return connect_async(url)
    except RedisAccessError as exc:
        raise typer.BadParameter(str(exc), param_hint=REDIS_HINT) from None


def open_run_reader(client: redis.Redis, run: str | None) -> QueueReader:
    """A reader of `run`, or of the only run on the Redis; a usage error when it cannot be
    told which, or Redis does not answer."""
    try:
        return QueueReader(client, pick_run(client, run))
    except (NoSuchRun, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--run") from None
    except redis.RedisError as exc:
        raise typer.BadParameter(f"cannot read Redis: {exc}", param_hint=REDIS_HINT) from None


# The registration options of `rlad serve-teacher` and `rlad serve-rollout`.
REGISTER = typer.Option(
    None,
    "--register",
    envvar="RLAD_REGISTER",
    help="Redis URL of the run: announce this server there (heartbeat every 2 s) so that "
    "clients started with `--teacher-url registry` / `--rollout-url registry` find it.",
)
REGISTER_RUN = typer.Option(
    None,
    "--run",
    envvar="RLAD_RUN",
    help="Run name the registration belongs to (default: the --config run's, else `run`).",
)
ADVERTISE_URL = typer.Option(
    None,
    "--advertise-url",
    help="URL clients reach this server at (default: http://<this host's address>:<port>).",
)
POOL = typer.Option(DEFAULT_POOL, "--pool", help="Pool of servers this one belongs to.")


def registry_given(urls: list[str], option: str) -> bool:
    """Whether the server URLs given say `registry` (follow the run's registry)."""
    if REGISTRY not in urls:
        return False
    if len(urls) > 1:
        message = f"`{REGISTRY}` replaces the URLs: give it alone"
        raise typer.BadParameter(message, param_hint=option)
    return True


def advertised_url(server: ServerConfig) -> str:
    """Where other hosts reach `server`: its bound address, or this host's address when it
    is bound to every interface."""
    host = server.host
    if host in ("0.0.0.0", "", "::"):
        host = socket.gethostbyname(socket.gethostname())
    elif host in LOOPBACK_HOSTS:
        host = "127.0.0.1"
    return f"http://{host}:{server.port}"


def registration(
    register: str | None,
    run: str | None,
    advertise_url: str | None,
    pool: str,
    server: ServerConfig,
) -> Registration | None:
    """The registration the `--register` options ask for, or None without `--register`."""
    if register is None:
        return None
    if advertise_url is None and server.port == 0:
        raise typer.BadParameter("--port 0 needs --advertise-url", param_hint="--register")
    try:
        registry = AsyncServerRegistry(async_redis_client(register), run or "run")
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--run / --register") from None
    return Registration(registry, advertise_url or advertised_url(server), pool)


def server_command(
    model: type[S],
    *,
    role: str,
    serves: str,
    block: Callable[[RunConfig], S | None],
    app_module: str,
    summary: str,
) -> Callable[..., None]:
    """The `rlad serve-<role>` command: one option per field of `model`, `--config` (a run
    YAML: its `block`, serving its `serves` model), the registration options, and the
    wiring from the resolved config to the app of `app_module`'s `create_app`, served by
    uvicorn and announced where asked. `app_module` is imported only when the command runs,
    so that `rlad --help` stays instant; `summary` is the command's help."""

    def command(
        config: Path | None = typer.Option(
            None,
            "--config",
            exists=True,
            dir_okay=False,
            help=f"Run YAML: serve its {role}_server block (the model is its {serves}).",
        ),
        register: str | None = REGISTER,
        run: str | None = REGISTER_RUN,
        advertise_url: str | None = ADVERTISE_URL,
        pool: str = POOL,
        *,
        settings: dict[str, Any],
    ) -> None:
        from services.common.http_transport import serve
        from services.common.runtime import configure_logging

        base = None
        if config is not None:
            loaded = load_run(config)
            base, run = block(loaded), run or loaded.name
            if base is None:
                raise typer.BadParameter(f"{config} names no `{serves}`", param_hint="--config")
        server = build_model(model, settings, base)
        announcer = registration(register, run, advertise_url, pool, server)
        configure_logging(role)
        logging.getLogger(__name__).info("config: %s", server.model_dump_json())
        serve(importlib.import_module(app_module).create_app(server), server, announcer)

    command.__doc__ = summary
    return model_options(model)(command)


def load_run(path: Path, overrides: dict[str, object] | None = None) -> RunConfig:
    """The run config at `path`; a refused one is a usage error that says what to change."""
    try:
        return load_run_config(path, overrides)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from None


def flag(name: str) -> str:
    """The option of field `name`: `max_model_len` is `--max-model-len`."""
    return "--" + name.replace("_", "-")


def _option_type(name: str, annotation: Any) -> Any:
    """The type typer parses the option as: the field's own, or an enum of its literals."""
    members = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (Union, types.UnionType) and len(members) == 1:
        annotation = members[0]  # `X | None`: the option is optional anyway
    literals = typing.get_args(annotation) if typing.get_origin(annotation) is Literal else ()
    if literals and all(isinstance(value, str) for value in literals):
        return enum.Enum(name.title().replace("_", ""), {v: v for v in literals}, type=str)
    if annotation not in PLAIN_TYPES:
        raise TypeError(f"no command-line option for field {name!r} of type {annotation!r}")
    return annotation


def _shown_default(name: str, field: FieldInfo) -> str | bool:
    if field.is_required() or field.default is None:
        return False
    if isinstance(field.default, bool):
        return flag(name) if field.default else flag(f"no_{name}")
    return str(field.default)


def _parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    # A bool field can be set either way, whatever its default: `--x/--no-x`.
    decl = f"{flag(name)}/{flag(f'no_{name}')}" if field.annotation is bool else flag(name)
    option = typer.Option(
        None, decl, help=field.description, show_default=_shown_default(name, field)
    )
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=option,
        annotation=_option_type(name, field.annotation),
    )


def model_options(model: type[BaseModel]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Add one option per field of `model` to a typer command.

    The command declares a keyword-only `settings: dict[str, Any]` parameter and receives
    there the fields given on the command line, and only those: fields left out keep
    whatever the command falls back to (a run config, the environment, the defaults).
    Every option defaults to None, so it can only hold a value that was given.
    """

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = inspect.signature(command, eval_str=True)
        if SETTINGS not in own.parameters:
            raise TypeError(f"{command.__qualname__} takes no `{SETTINGS}` for the options")
        kept = [p for p in own.parameters.values() if p.name != SETTINGS]
        clash = {p.name for p in kept} & set(model.model_fields)
        if clash:
            raise TypeError(f"{command.__qualname__} declares {clash}, fields of {model.__name__}")
        generated = [_parameter(name, field) for name, field in model.model_fields.items()]

        @functools.wraps(command)
        def wrapper(**values: Any) -> None:
            given = {name: values.pop(name) for name in model.model_fields}
            settings = {
                name: value.value if isinstance(value, enum.Enum) else value
                for name, value in given.items()
                if value is not None
            }
            command(**values, **{SETTINGS: settings})

        parameters = [*kept, *generated]
        wrapper.__signature__ = own.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


def build_model(model: type[M], settings: Mapping[str, Any], base: BaseModel | None = None) -> M:
    """`model` from the given options over `base` (e.g. a run config's block); a refused
    value is a usage error naming its flag."""
    try:
        return model(**{**(base.model_dump() if base is not None else {}), **settings})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = f"{flag(str(error['loc'][0]))}: " if error["loc"] else ""
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(where + ("required" if error["type"] == "missing" else message))
        raise typer.BadParameter("; ".join(problems)) from None
