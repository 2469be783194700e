"""``stepline ui``: serve the web dashboard. Imports nothing heavy until the command runs."""

from __future__ import annotations

import click


@click.command()
@click.option(
    "--host",
    default=None,
    help="Address to bind. Env: STEPLINE_UI__HOST (default 127.0.0.1: this machine only).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Port to serve on (0: any free one). Env: STEPLINE_UI__PORT (default 8080).",
)
@click.option(
    "--read-only",
    is_flag=True,
    default=None,
    help="Hide every action and refuse action requests. Env: STEPLINE_UI__READ_ONLY.",
)
def ui(host: str | None, port: int | None, read_only: bool | None) -> None:
    """Serve the web dashboard: overview, instances, dead letters, schedules.

    Binds 127.0.0.1:8080 unless told otherwise. With STEPLINE_UI__TOKEN set,
    every request needs the token (a login form asks for it once). Reads
    STEPLINE_DATABASE_URL and STEPLINE_AMQP_URL, or STEPLINE_EMBEDDED.
    """
    import socket

    import uvicorn  # here, not at the top: `stepline --help` must not pay for the web stack

    from stepline.producer.dashboard import create_app
    from stepline.shared.errors import ConfigError
    from stepline.shared.settings import load_settings

    try:
        settings = load_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    bind_host = host or settings.ui.host
    bind_port = settings.ui.port if port is None else port
    app = create_app(settings, read_only=read_only, host=bind_host)
    if bind_host not in ("127.0.0.1", "localhost", "::1") and settings.ui.token is None:
        click.echo(
            f"stepline ui: warning: listening on {bind_host} with no STEPLINE_UI__TOKEN: "
            "anyone who reaches this port can act on instances",
            err=True,
        )
    # Bound here, so that the address printed is the real one (port 0: the one the OS chose).
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((bind_host, bind_port))
    except OSError as exc:
        listener.close()
        raise click.ClickException(f"cannot listen on {bind_host}:{bind_port}: {exc.strerror}") from None
    listener.listen(128)
    port_bound = listener.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    click.echo(f"stepline ui: http://{_shown(bind_host)}:{port_bound}/ (Ctrl-C stops it)")
    uvicorn.Server(config).run(sockets=[listener])


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host else host


__all__ = ["ui"]
