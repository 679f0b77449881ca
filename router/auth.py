"""API keys of the public front ends (HTTP `/v1/*` and the gRPC Inference service).

Keys come from `--api-key` (repeatable), `PDROUTER_API_KEY` (comma-separated) and
`--api-key-file` (one key per line; blank lines and `#` comments skipped). With none, the API
is open. A request carries `Authorization: Bearer <key>` (gRPC: `authorization` metadata).
Checked in constant time: the SHA-256 of what came is compared with every key's SHA-256,
all of them, whatever matched first.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac

from router.errors import ApiError

MISSING_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
INVALID_MESSAGE = "Incorrect API key provided."


def add_api_key_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--api-key / --api-key-file, the same on every command that serves the OpenAI API."""
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help=f"{what} requires 'Authorization: Bearer KEY' (repeatable; env PDROUTER_API_KEY: k1,k2)",
    )
    p.add_argument("--api-key-file", default="", metavar="PATH", help="more API keys, one per line")


class ApiKeys:
    def __init__(self, keys: list[str] | tuple[str, ...] = ()) -> None:
        self._digests = [_digest(k) for k in dict.fromkeys(keys)]

    @classmethod
    def load(cls, keys: list[str] | None, key_file: str = "") -> ApiKeys:
        """From the flags; a key file that cannot be read, or keys with spaces, stop start-up."""
        found = [k.strip() for k in keys or ()]
        if key_file:
            try:
                with open(key_file, encoding="utf-8") as fh:
                    lines = [line.strip() for line in fh]
            except OSError as exc:
                raise SystemExit(f"--api-key-file {key_file}: {exc.strerror or exc}") from None
            from_file = [line for line in lines if line and not line.startswith("#")]
            if not from_file:
                raise SystemExit(f"--api-key-file {key_file}: no key in it")
            found += from_file
        if any(not k or any(c.isspace() for c in k) for k in found):
            raise SystemExit("--api-key: a key must be non-empty and without spaces")
        return cls(found)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise the 401 OpenAI sends unless `authorization` is `Bearer <one of the keys>`."""
        if not self._digests:
            return
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, MISSING_MESSAGE, None, "invalid_api_key")
        given = _digest(token)
        ok = False
        for digest in self._digests:
            ok |= hmac.compare_digest(digest, given)  # NOTE: no early exit: every key is compared
        if not ok:
            raise ApiError(401, INVALID_MESSAGE, None, "invalid_api_key")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
