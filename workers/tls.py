"""TLS from flags: gRPC credentials (the router's public gRPC; router <-> worker mutual TLS) and
the KV transfer listener's contexts. Internal traffic is mutual TLS or plain, never half: a
worker given a certificate also requires its peers' (router and decode workers) to come from
`--tls-client-ca`, on its gRPC port and on its KV transfer listener.

Lives in workers/ so router and workers share it; it imports neither torch nor the router.
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvtransfer.tls import client_context, server_context


def all_or_none(args: argparse.Namespace, *dests: str) -> bool:
    """True when every one of these flags is given, False when none is; otherwise a clear exit."""
    given = [d for d in dests if getattr(args, d)]
    if given and len(given) != len(dests):
        missing = ", ".join("--" + d.replace("_", "-") for d in dests if d not in given)
        named = ", ".join("--" + d.replace("_", "-") for d in given)
        raise SystemExit(f"{named} also need{'s' if len(given) == 1 else ''} {missing}")
    return bool(given)


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"cannot read {path}: {exc.strerror}") from None


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """A gRPC server's certificate; with `client_ca`, clients must present one it signed."""
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))],
        root_certificates=_read(client_ca) if client_ca else None,
        require_client_auth=bool(client_ca),
    )


@dataclass(frozen=True)
class ChannelTls:
    """How the router dials workers: its client certificate, the CA the workers' come from."""

    credentials: grpc.ChannelCredentials
    options: tuple[tuple[str, str], ...] = ()


def channel_tls(ca: str, cert: str, key: str, server_name: str = "") -> ChannelTls:
    credentials = grpc.ssl_channel_credentials(_read(ca), _read(key), _read(cert))
    # NOTE: a worker dialled by a pod IP may carry a service name in its certificate instead
    options = (("grpc.ssl_target_name_override", server_name),) if server_name else ()
    return ChannelTls(credentials, options)


def kv_contexts(cert: str, key: str, ca: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(listener, puller) contexts of a worker's KV transfer: the same certificate both ways."""
    return server_context(cert, key, ca), client_context(ca, cert, key)
