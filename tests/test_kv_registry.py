"""kvtransfer.registry: every backend by name, what a worker builds on a host pool, and which
backend a decode worker picks for a handle (auto order, the operator's override, and why a
handle cannot be pulled at all). In-process only: no peers, no pulls."""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvtransfer.host import host_id
from kvtransfer.layout import KvLayout
from kvtransfer.nixl import nixl_module
from kvtransfer.pool import KvPool
from kvtransfer.registry import AUTO_ORDER, BACKENDS, CHOICES, Setup, Transports, build, load
from kvtransfer.shm import ShmTransport
from kvtransfer.tcp import TcpTransport
from kvtransfer.transport import HandleRef, NixlSource, OneSidedTransport, Transport

pytestmark = pytest.mark.unit

LAYOUT = KvLayout(dtype="float16", num_layers=2, num_kv_heads=2, head_dim=8, block_size=4)
NUM_BLOCKS = 8
HAS_NIXL = nixl_module() is not None
needs_nixl = pytest.mark.skipif(not HAS_NIXL, reason="the nixl package is not installed")
SHM = Path("/dev/shm")
FAR = "elsewhere/00000000-0000-0000-0000-000000000000"  # another host's id
SOURCE = NixlSource(agent="prefill-1-abcd", metadata=b"opaque", base_addr=4096, mem_type="DRAM")


def _our_segments() -> set[str]:
    prefix = f"pdrouter-kv-{os.getpid()}-"
    return {p.name for p in SHM.glob(prefix + "*")} if SHM.exists() else set()


@pytest.fixture(autouse=True)
def no_leaked_segments():
    """Every shared-memory segment a test creates is unlinked by its end."""
    before = _our_segments()
    yield
    assert not _our_segments() - before, "leaked shared memory"


@pytest.fixture
def pool():
    with KvPool.create(LAYOUT, NUM_BLOCKS, shared=True) as p:
        yield p


@pytest.fixture
async def transports(pool: KvPool) -> AsyncIterator[Transports]:
    """Every backend that can run on a host pool, as a worker builds them."""
    built = build(Setup(pool, compat_hash="c0ffee", name="registry-test"))
    try:
        yield built
    finally:
        await built.close()


def ref(**kw) -> HandleRef:
    """A handle as a prefill worker publishes it; by default from this host, in shared memory."""
    fields = {
        "handle_id": "r1",
        "token": bytes(range(16)),
        "endpoint": "127.0.0.1:9",
        "layout": LAYOUT,
        "num_blocks": NUM_BLOCKS,
        "host_id": host_id(),
        "shm_name": "pdrouter-kv-prefill",
    }
    return HandleRef(**{**fields, **kw})


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BACKENDS))
def test_every_name_loads_its_transport(name: str) -> None:
    cls = load(name)
    assert isinstance(cls, type) and issubclass(cls, Transport)
    assert cls.backend == name
    assert f"{cls.__module__}:{cls.__qualname__}" == BACKENDS[name]


def test_auto_order_and_choices() -> None:
    assert tuple(BACKENDS) == AUTO_ORDER
    assert ("auto", *BACKENDS) == CHOICES
    # NOTE: same node before same host before another host; the plain stream last
    assert AUTO_ORDER.index("cuda_ipc") < AUTO_ORDER.index("shm") < AUTO_ORDER.index("nixl")
    assert AUTO_ORDER[-1] == "tcp"


def test_unknown_name_is_a_value_error_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown KV transfer backend 'bogus'") as info:
        load("bogus")
    for choice in CHOICES:
        assert choice in str(info.value)


# -- build ----------------------------------------------------------------------------------


async def test_build_on_a_host_pool(pool: KvPool, transports: Transports) -> None:
    expected = [n for n in AUTO_ORDER if n in {"shm", "nixl", "tcp"} and (n != "nixl" or HAS_NIXL)]
    assert list(transports.by_name) == expected  # in auto's order
    for name, t in transports.by_name.items():
        assert t.backend == name and t.dst_pool is pool and t.compat_hash == "c0ffee"
        if isinstance(t, OneSidedTransport):
            assert t.control is transports.control  # one-sided backends claim over tcp
    assert transports.control is transports.by_name["tcp"]
    assert isinstance(transports.control, TcpTransport)
    assert set(transports.missing) == {"cuda_ipc", "staged"} | (set() if HAS_NIXL else {"nixl"})
    assert "CUDA device" in transports.missing["cuda_ipc"]
    assert "device" in transports.missing["staged"] and "tcp" in transports.missing["staged"]
    offer = transports.offer()
    assert offer["shm_name"] == pool.name
    assert set(offer) == ({"shm_name", "nixl"} if HAS_NIXL else {"shm_name"})
    published = HandleRef(handle_id="r1", token=bytes(16), endpoint="127.0.0.1:9", layout=LAYOUT, **offer)
    assert published.shm_name == pool.name  # every offered field is a HandleRef field


@needs_nixl
async def test_build_makes_a_nixl_transport_that_offers_its_pool(
    pool: KvPool, transports: Transports
) -> None:
    nixl = transports.by_name["nixl"]
    source = nixl.offer()["nixl"]
    assert isinstance(source, NixlSource)
    assert source.agent.startswith("registry-test-") and source.agent == nixl.name  # type: ignore[attr-defined]
    assert source.base_addr == pool.address and source.mem_type == "DRAM" and source.device_id == 0
    assert isinstance(source.metadata, bytes) and source.metadata
    assert transports.offer()["nixl"] == source


async def test_build_on_a_private_pool_offers_no_shared_memory() -> None:
    with KvPool.create(LAYOUT, NUM_BLOCKS) as private:
        built = build(Setup(private), names=("shm", "tcp"))
        try:
            assert list(built.by_name) == ["shm", "tcp"] and built.missing == {}
            assert built.offer() == {}  # shm can pull into it, but peers cannot map it
        finally:
            await built.close()


class Exploding(OneSidedTransport):
    backend = "nixl"

    @classmethod
    def create(cls, setup, control):
        raise RuntimeError("no UCX here")

    async def _pull(self, handle, src_block_ids, dst_block_ids) -> None:
        raise AssertionError("never built")


async def test_a_backend_that_fails_to_start_is_left_out(pool: KvPool, monkeypatch) -> None:
    monkeypatch.setitem(BACKENDS, "nixl", f"{__name__}:Exploding")
    built = build(Setup(pool), names=("shm", "nixl", "tcp"))
    try:
        assert list(built.by_name) == ["shm", "tcp"]
        assert built.missing == {"nixl": "RuntimeError: no UCX here"}
        t, note = built.choose(ref(host_id=FAR, nixl=SOURCE), "nixl")
        assert t.backend == "tcp" and "--kv-transfer nixl" in note and "no UCX here" in note
    finally:
        await built.close()


async def test_build_only_the_names_asked_for(pool: KvPool) -> None:
    built = build(Setup(pool), names=("tcp",))
    try:
        assert list(built.by_name) == ["tcp"] and built.missing == {}
        assert built.by_name["tcp"] is built.control
    finally:
        await built.close()
    with pytest.raises(ValueError, match="unknown KV transfer backend 'rdma'"):
        build(Setup(pool), names=("shm", "rdma"))


@pytest.mark.skipif(nixl_module() is None, reason="NIXL is not installed (make setup installs nixl-cu12)")
async def test_mutual_tls_leaves_nixl_out_saying_why(pool: KvPool) -> None:
    """UCX does not encrypt: with TLS the KV leaves a host only through tcp (or staged)."""
    built = build(Setup(pool, tls=ssl.create_default_context()))
    try:
        assert "nixl" not in built.by_name and "shm" in built.by_name and "tcp" in built.by_name
        assert "mutual TLS" in built.missing["nixl"]
    finally:
        await built.close()


# -- choose ---------------------------------------------------------------------------------


async def test_choose_shm_for_a_same_host_handle_in_shared_memory(transports: Transports) -> None:
    t, note = transports.choose(ref())
    assert isinstance(t, ShmTransport) and note == ""
    t, note = transports.choose(ref(nixl=SOURCE))  # shm before nixl on one host
    assert t.backend == "shm" and note == ""
    assert transports.choose(ref(), "auto") == (t, "")


@needs_nixl
async def test_choose_nixl_for_another_host_offering_it(transports: Transports) -> None:
    t, note = transports.choose(ref(host_id=FAR, nixl=SOURCE))
    assert (t.backend, note) == ("nixl", "")
    assert transports.choose(ref(shm_name="", nixl=SOURCE))[0].backend == "nixl"  # same host, no shm


async def test_choose_tcp_for_another_host_without_nixl(transports: Transports) -> None:
    for far in (ref(host_id=FAR), ref(host_id=""), ref(shm_name="")):
        t, note = transports.choose(far)  # "" : an unknown host is never assumed to share memory
        assert (t.backend, note) == ("tcp", ""), far


async def test_override_is_honoured_when_it_can_reach(transports: Transports) -> None:
    assert transports.choose(ref(), "tcp") == (transports.by_name["tcp"], "")  # over shm, which auto picks
    if HAS_NIXL:
        t, note = transports.choose(ref(nixl=SOURCE), "nixl")
        assert (t.backend, note) == ("nixl", "")


@pytest.mark.parametrize(
    ("override", "handle", "why"),
    [
        pytest.param("shm", ref(host_id=FAR), "another host", id="shm-other-host"),
        pytest.param("shm", ref(shm_name=""), "not in shared memory", id="shm-private-pool"),
        pytest.param("nixl", ref(host_id=FAR), "NIXL source" if HAS_NIXL else "not installed", id="nixl"),
        pytest.param("cuda_ipc", ref(host_id=FAR), "needs a pool on a CUDA device", id="cuda_ipc"),
        pytest.param("staged", ref(host_id=FAR), "pools on a device", id="staged"),
        pytest.param("rdma", ref(host_id=FAR), "not built in this worker", id="unknown"),
    ],
)
async def test_override_that_cannot_reach_falls_back_with_a_note(
    transports: Transports, override: str, handle: HandleRef, why: str
) -> None:
    t, note = transports.choose(handle, override)
    assert t.backend == "tcp"  # what auto picks for these handles
    assert note.startswith(f"--kv-transfer {override} cannot pull this handle (")
    assert why in note and note.endswith("chose automatically")


async def test_a_handle_nothing_can_reach_is_a_value_error_with_every_reason(
    transports: Transports,
) -> None:
    unreachable = ref(endpoint="", shm_name="", host_id=FAR)
    for override in (None, "tcp", "shm"):
        with pytest.raises(ValueError, match="no KV transfer backend here can reach this handle") as info:
            transports.choose(unreachable, override)
        text = str(info.value)
        assert "shm: the prefill pool is not in shared memory" in text
        assert "tcp: the handle names no transfer listener" in text
        assert ("nixl: the prefill worker offers no NIXL source" in text) == HAS_NIXL
        reasons = text[text.index("(") + 1 : text.rindex(")")].split("; ")
        assert [r.split(":")[0] for r in reasons] == list(transports.by_name)  # one per backend built
