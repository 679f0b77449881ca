"""Test certificates made with the `openssl` CLI (the `cryptography` package is not a dependency):
a CA, and certificates it signs for 127.0.0.1, each usable as server and as client."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Cert:
    cert: str
    key: str


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(directory: Path, name: str = "ca") -> Cert:
    directory.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN=pdrouter test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory,
    )  # fmt: skip
    return Cert(str(directory / f"{name}.crt"), str(directory / f"{name}.key"))


def make_cert(directory: Path, ca: Cert, name: str) -> Cert:
    """A leaf for 127.0.0.1 / localhost, serverAuth and clientAuth, signed by `ca`."""
    ext = directory / f"{name}.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=directory)  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name, cwd=directory,
    )  # fmt: skip
    return Cert(str(directory / f"{name}.crt"), str(directory / f"{name}.key"))
