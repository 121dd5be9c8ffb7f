"""TLS for the fleet's HTTP API: the server's `ssl.SSLContext`, and the uvicorn configuration that serves with it.

Workflow: `server_context(settings)` (None when TLS is off) loads the server certificate and key; with
`tls_client_ca_file` it asks every client for a certificate issued by that CA (mutual TLS) and with `tls_crl_file`
it also refuses client certificates that CRL revokes (`VERIFY_CRL_CHECK_LEAF`: the CRL must be signed by the same
CA and still current, else every client is refused). TLS 1.2 is the oldest version spoken. `uvicorn_config(app,
settings, ...)` gives a `uvicorn.Config` that serves with that context (uvicorn's own ssl_* options cannot load a
CRL). `client_context(...)` is the matching client side, for scripts and tests. The CRL is read when the server
starts; `reload_crl(ctx, path)` adds a newly published one to the running server (OpenSSL then checks against
the CRL with the latest issue time; `slmops fleet serve` does this on SIGHUP).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.errors import ConfigError, clip

if TYPE_CHECKING:
    import uvicorn

    from .settings import Settings


def server_context(settings: Settings) -> ssl.SSLContext | None:
    """The HTTP server's TLS context from the settings, or None when no certificate is configured."""
    if settings.tls_cert_file is None:
        return None
    return build_server_context(
        settings.tls_cert_file, settings.tls_key_file,  # type: ignore[arg-type]  (the settings require both)
        client_ca_file=settings.tls_client_ca_file, crl_file=settings.tls_crl_file,
    )


def build_server_context(
    cert_file: Path, key_file: Path, *, client_ca_file: Path | None = None, crl_file: Path | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ server context; with `client_ca_file`, a client certificate from that CA is required."""
    if crl_file is not None and client_ca_file is None:
        raise ConfigError("a CRL file only applies with a client CA file (mutual TLS); set tls_client_ca_file too")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx.load_cert_chain, "server certificate or key", cert_file, keyfile=str(key_file))
    if client_ca_file is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        _load(ctx.load_verify_locations, "client CA file", client_ca_file)
        if crl_file is not None:
            _load(ctx.load_verify_locations, "CRL file", crl_file)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return ctx


def reload_crl(ctx: ssl.SSLContext, crl_file: Path) -> None:
    """Add a newly published CRL to a running server's context; new handshakes check against the newest CRL of the
    CA (by its last-update time, so publish at most one per second). A file that cannot be read changes nothing."""
    _load(ctx.load_verify_locations, "CRL file", crl_file)


def client_context(ca_file: Path, *, cert_file: Path | None = None, key_file: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.2+ client context that trusts only `ca_file` and checks the host name; with a certificate to present
    when the server asks (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx.load_verify_locations, "CA file", ca_file)
    if cert_file is not None:
        _load(ctx.load_cert_chain, "client certificate or key", cert_file, keyfile=str(key_file) if key_file else None)
    return ctx


def uvicorn_config(app: Any, settings: Settings, **kwargs: Any) -> uvicorn.Config:
    """A `uvicorn.Config` for `app` on settings.host/port that serves TLS with `server_context(settings)` when on."""
    import uvicorn

    context = server_context(settings)  # built here, so a bad file stops the command before anything listens

    class _Config(uvicorn.Config):
        tls_context = context  # the context the server uses, for reload_crl

        def load(self) -> None:
            super().load()
            self.ssl = context  # after load(): uvicorn builds its own context only from ssl_* options, never a CRL

    return _Config(app, host=settings.host, port=settings.port, **kwargs)


def _load(fn: Any, what: str, path: Path, **kwargs: Any) -> None:
    try:
        fn(str(path), **kwargs)
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} {clip(str(path), 200)} does not exist; make it with 'slmops ca'") from exc
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"cannot use {what} {clip(str(path), 200)}: {clip(str(exc), 120)}") from exc
