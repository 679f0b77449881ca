"""Schemathesis hooks for `bench.fuzz_openapi`, loaded by schemathesis (SCHEMATHESIS_HOOKS) in its own
virtualenv (bench/.venvs/schemathesis); the project never imports this file."""

import atexit
import os

import schemathesis

_checked = 0


@atexit.register
def _report() -> None:
    """How many responses went through the check: the bench refuses a run where it never ran."""
    path = os.environ.get("PDROUTER_FUZZ_COUNT_FILE")
    if path:
        with open(path, "w") as fh:
            fh.write(str(_checked))


@schemathesis.check
def no_server_error(ctx, response, case) -> None:
    """No 5xx, except the 504 a request gets when its own `x-request-timeout` passes (documented)."""
    global _checked
    _checked += 1
    status = response.status_code
    if status < 500:
        return
    if status == 504 and any(k.lower() == "x-request-timeout" for k in case.headers or {}):
        return
    raise AssertionError(f"Server error {status}: {response.text[:800]}")
