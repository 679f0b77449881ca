"""TLS end to end: the router serves HTTPS and gRPC over TLS; router <-> worker gRPC and the
KV transfer listeners are mutual TLS. A disaggregated request works over all of it (KV pulled
over TLS), and a client without a certificate from the deployment's CA is refused on every
internal port: each worker's gRPC port and KV transfer listener."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.error
import urllib.request

import grpc
import pytest

from kvtransfer.errors import TransferError, TransferRefused
from kvtransfer.layout import KvLayout
from kvtransfer.pool import KvPool
from kvtransfer.tcp import TcpTransport
from kvtransfer.tls import client_context
from kvtransfer.transport import HandleRef
from pdrouter_proto import inference_pb2 as ipb
from pdrouter_proto import inference_pb2_grpc as ipb_grpc
from pdrouter_proto import worker_pb2 as wpb
from pdrouter_proto import worker_pb2_grpc as wpb_grpc
from tests.certs import Cert, make_ca, make_cert
from tests.kv_helpers import route_workers, wait_for
from tests.procs import Proc, free_port, pdrouter

pytestmark = pytest.mark.integration


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Cert]:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = make_ca(d, "ca"), make_ca(d, "rogue-ca")
    names = ("prefill", "decode", "router", "public")
    return {"ca": ca, **{n: make_cert(d, ca, n) for n in names}, "rogue": make_cert(d, rogue_ca, "rogue")}


class TlsStack:
    """A router over a prefill and a decode mock worker, everything on TLS; KV moves over TCP."""

    def __init__(self, tmp_path, model_dir, pki: dict[str, Cert]) -> None:
        ca = pki["ca"].cert
        self.procs: list[Proc] = []
        self.workers = {}
        for role in ("prefill", "decode"):
            port = free_port()
            self.workers[role] = f"127.0.0.1:{port}"
            self.procs.append(Proc(
                pdrouter("worker", "--engine", "mock", "--model", str(model_dir), "--role", role,
                         "--port", str(port), "--mock-token-delay-ms", "1", "--kv-transfer", "tcp",
                         "--tls-cert", pki[role].cert, "--tls-key", pki[role].key, "--tls-client-ca", ca),
                tmp_path / f"{role}.log",
            ))  # fmt: skip
        hport, self.grpc_port = free_port(), free_port()
        self.router = Proc(
            pdrouter("router", "--port", str(hport), "--grpc-port", str(self.grpc_port),
                     "--model", str(model_dir), "--local-prefill-max-tokens", "16",
                     "--worker", self.workers["prefill"], "--worker", self.workers["decode"],
                     "--tls-cert", pki["public"].cert, "--tls-key", pki["public"].key,
                     "--worker-tls-ca", ca, "--worker-tls-cert", pki["router"].cert,
                     "--worker-tls-key", pki["router"].key),
            tmp_path / "router.log",
        )  # fmt: skip
        self.procs.append(self.router)
        self.base = f"https://127.0.0.1:{hport}"
        self.https = ssl.create_default_context(cafile=ca)
        try:
            deadline = time.monotonic() + 60
            while self.status("/ready") != 200:
                assert self.router.alive(), self.router.log()
                assert time.monotonic() < deadline, self.router.log()
                time.sleep(0.1)  # readiness poll
            for address in self.workers.values():
                wait_for(lambda a=address: f"worker {a} is healthy" in self.router.log(), 30, address)
        except BaseException:
            self.stop()
            raise

    def status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5, context=self.https) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def chat(self, content: str, max_tokens: int = 6) -> tuple[dict, dict[str, str]]:
        body = {
            "model": "default",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
        }
        req = urllib.request.Request(
            self.base + "/v1/chat/completions",
            json.dumps(body).encode(),
            {"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60, context=self.https) as r:
            return json.loads(r.read()), route_workers(r.headers["x-pdrouter-route"])

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_model_dir, pki):
    s = TlsStack(tmp_path_factory.mktemp("tls"), default_model_dir, pki)
    yield s
    s.stop()


def _channel(address: str, pki: dict[str, Cert], who: str | None, ca: str = "ca") -> grpc.Channel:
    if who is None:
        return grpc.insecure_channel(address)
    if who == "anonymous":
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(_read(pki[ca].cert)))
    creds = grpc.ssl_channel_credentials(_read(pki[ca].cert), _read(pki[who].key), _read(pki[who].cert))
    return grpc.secure_channel(address, creds)


def _info(address: str, pki, who: str | None) -> wpb.InfoResponse:
    with _channel(address, pki, who) as ch:
        return wpb_grpc.WorkerStub(ch).Info(wpb.InfoRequest(), timeout=5)


def test_disaggregated_request_over_tls_end_to_end(stack, pki) -> None:
    reply, route = stack.chat("tls " + "w " * 120)
    assert route["mode"] == "disaggregated"
    assert (route["prefill"], route["decode"]) == (stack.workers["prefill"], stack.workers["decode"])
    assert reply["usage"]["completion_tokens"] == 6 and reply["choices"][0]["finish_reason"] == "length"

    def decode_pulls() -> wpb.KvTransferStats:
        with _channel(stack.workers["decode"], pki, "router") as ch:
            stream = wpb_grpc.WorkerStub(ch).Subscribe(wpb.SubscribeRequest(subscriber_id="test"), timeout=10)
            try:
                return next(stream).snapshot.load.kv_transfer
            finally:
                stream.cancel()

    wait_for(lambda: decode_pulls().pulls >= 1, what="a KV pull over TLS")
    assert decode_pulls().pull_failures == 0  # pulled over TLS, not recomputed


def test_public_grpc_over_tls(stack, pki) -> None:
    with _channel(f"127.0.0.1:{stack.grpc_port}", pki, "anonymous") as ch:  # no client certificate needed
        stub = ipb_grpc.InferenceStub(ch)
        assert stub.ListModels(ipb.ListModelsRequest(), timeout=10).models[0].id
        request = ipb.GenerateRequest(model="default", prompt="hello over tls", max_tokens=3, ignore_eos=True)
        replies = list(stub.Generate(request, timeout=30))
    assert replies[-1].complete.usage.completion_tokens == 3
    with grpc.insecure_channel(f"127.0.0.1:{stack.grpc_port}") as ch, pytest.raises(grpc.RpcError):
        ipb_grpc.InferenceStub(ch).ListModels(ipb.ListModelsRequest(), timeout=5)


def test_plain_http_is_not_served(stack) -> None:
    with pytest.raises(OSError):
        urllib.request.urlopen(stack.base.replace("https", "http") + "/health", timeout=5).close()


async def _kv_claim(endpoint: str, tls: ssl.SSLContext | None) -> BaseException:
    layout = KvLayout(dtype="float32", num_layers=1, num_kv_heads=1, head_dim=8, block_size=16)
    with KvPool.create(layout, 1) as pool:
        tcp = TcpTransport(pool, tls=tls, timeout_s=5)
        ref = HandleRef(handle_id="nobody", token=bytes(16), endpoint=endpoint, layout=layout)
        try:
            await tcp.claim(ref)
        except TransferError as exc:
            return exc
        finally:
            await tcp.close()
    raise AssertionError("an unknown handle was claimed")


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_internal_ports_refuse_clients_without_a_ca_certificate(stack, pki, role) -> None:
    address = stack.workers[role]
    endpoint = _info(address, pki, "router").transfer_endpoint  # with the router's certificate: fine
    assert endpoint
    for who in (None, "anonymous", "rogue"):  # plain, TLS without a certificate, another CA's
        with pytest.raises(grpc.RpcError) as refused:
            _info(address, pki, who)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, who
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(pki["ca"].cert)
    no_cert.check_hostname = False
    rogue = client_context(pki["ca"].cert, pki["rogue"].cert, pki["rogue"].key)
    for what, tls in (("plain", None), ("no certificate", no_cert), ("another CA", rogue)):
        exc = asyncio.run(_kv_claim(endpoint, tls))
        assert not isinstance(exc, TransferRefused), what  # the protocol never answered
    good = client_context(pki["ca"].cert, pki["decode"].cert, pki["decode"].key)
    exc = asyncio.run(_kv_claim(endpoint, good))
    assert isinstance(exc, TransferRefused) and "unknown handle" in exc.reason  # it did answer


@pytest.mark.unit
def test_tls_flags_come_all_or_none() -> None:
    from argparse import Namespace

    from workers.tls import all_or_none

    assert all_or_none(Namespace(tls_cert="", tls_key=""), "tls_cert", "tls_key") is False
    assert all_or_none(Namespace(tls_cert="c", tls_key="k"), "tls_cert", "tls_key") is True
    with pytest.raises(SystemExit, match="--tls-cert also needs --tls-key, --tls-client-ca"):
        all_or_none(
            Namespace(tls_cert="c", tls_key="", tls_client_ca=""), "tls_cert", "tls_key", "tls_client_ca"
        )
