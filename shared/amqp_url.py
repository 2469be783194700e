"""Parse ``STEPLINE_AMQP_URL``: one RabbitMQ node, or several nodes of one cluster in the libpq way.

``amqp://user:password@h1:5672,h2:5672,h3/vhost?heartbeat=30`` names three
nodes. The host part is a comma-separated list of ``host[:port]`` (an IPv6
address in brackets, ``[::1]:5672``); a node without a port gets the scheme's
default, 5672 for ``amqp://`` and 5671 for ``amqps://``. The user, password,
vhost (the path) and query are shared by every node. A password holding ``@``,
``:``, ``/``, ``,`` or ``%`` is percent-encoded, as in any URL.

``load_balance_hosts`` (libpq's name) says in which order a process tries the
nodes: ``random`` (the default: each process shuffles the list once, so a fleet
spreads over the cluster) or ``disable`` (in the order written). A process that
loses its node goes on to the next one in its order, wrapping around.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, urlencode

from stepline.shared.redaction import mask_url, scrub_password

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
LOAD_BALANCE_PARAMETER = "load_balance_hosts"
LoadBalance = Literal["random", "disable"]


@dataclass(frozen=True, slots=True)
class AmqpNode:
    """One node: its host (brackets kept for IPv6) and port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AmqpTarget:
    """What an AMQP URL names: the nodes and what they share."""

    scheme: str
    # "user:password" as written (percent-encoded), or "" for none; kept out of the repr.
    userinfo: str = field(repr=False)
    nodes: tuple[AmqpNode, ...]
    path: str  # "/vhost" as written, or ""
    query: str  # without load_balance_hosts
    load_balance: LoadBalance

    def node_url(self, node: AmqpNode) -> str:
        """A one-node URL for ``node`` (what aio-pika takes), password included."""
        return self._url(self.userinfo, f"{node}")

    def node_urls(self, rng: random.Random | None = None) -> list[str]:
        """One URL per node, in the order this process tries them (shuffled for ``random``)."""
        nodes = list(self.nodes)
        if self.load_balance == "random":
            (rng or random.Random()).shuffle(nodes)
        return [self.node_url(node) for node in nodes]

    def masked(self) -> str:
        """The URL with its password replaced by ``***``: safe for logs and errors."""
        return mask_url(self._url(self.userinfo, ",".join(str(node) for node in self.nodes)))

    def _url(self, userinfo: str, hosts: str) -> str:
        at = f"{userinfo}@" if userinfo else ""
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{at}{hosts}{self.path}{query}"


def parse_amqp_url(url: str) -> AmqpTarget:
    """The nodes and shared parts of an ``amqp://`` or ``amqps://`` URL naming one node or several.

    Raises:
        ValueError: the URL is malformed; the text never holds the password.
    """
    try:
        return _parse(url)
    except ValueError as exc:
        raise ValueError(scrub_password(str(exc), url)) from None


def _parse(url: str) -> AmqpTarget:
    """``parse_amqp_url`` without the scrubbing of its errors."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in DEFAULT_PORTS:
        raise ValueError("must start with amqp:// or amqps:// (e.g. amqp://guest:guest@host:5672/vhost)")
    rest, _, query = rest.partition("?")
    rest, _, _fragment = rest.partition("#")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", netloc
    try:
        nodes = tuple(_node(part, DEFAULT_PORTS[scheme]) for part in hosts.split(","))
    except ValueError:
        if not at and "@" in url:
            # The host list may be the front of a password with a raw '/', '?' or '#': quote nothing.
            raise ValueError(
                "malformed host list; a password holding '/', '?' or '#' must be percent-encoded "
                "(%2F, %3F, %23)"
            ) from None
        raise
    pairs = parse_qsl(query, keep_blank_values=True)
    load_balance = "random"
    kept = []
    for key, value in pairs:
        if key == LOAD_BALANCE_PARAMETER:
            if value not in ("random", "disable"):
                raise ValueError(f"{LOAD_BALANCE_PARAMETER} must be 'random' or 'disable', not {value!r}")
            load_balance = value
        else:
            kept.append((key, value))
    return AmqpTarget(
        scheme=scheme,
        userinfo=userinfo,
        nodes=nodes,
        path=f"{slash}{path}",
        query=urlencode(kept),
        load_balance="disable" if load_balance == "disable" else "random",
    )


def _node(text: str, default_port: int) -> AmqpNode:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port``."""
    if text.startswith("["):
        host, bracket, tail = text.partition("]")
        host += bracket
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"malformed IPv6 host {text!r}: write [address] or [address]:port")
        port_text = tail[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host or host == "[]":
        raise ValueError(f"empty host in the host list (at {text!r}): write h1:5672,h2:5672")
    if not port_text:
        return AmqpNode(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port {port_text!r} for host {host!r}: a number from 1 to 65535")
    return AmqpNode(host, int(port_text))
