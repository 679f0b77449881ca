"""The torch runner: one engine step = plan attention -> forward all tokens -> logits of samplers -> sample.

Owns the model weights, the KV pool and the sampler. The pool is ONE contiguous tensor
[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], block-major so that
`kv_pool[block_id]` is one slab holding that block for every layer (what KV transfer copies);
the model attends through strided per-layer K and V views of it.

Weights and pool are created by the thread that runs the first step (the engine loop), not by
the constructor: on CPU, libgomp throttles its spin-wait as soon as two threads own OpenMP
teams on a machine with few cores, and every step then runs ~1.5x slower (30 -> 45 ms per
SmolLM2 decode step on 2 cores, measured). So the engine thread is the only one doing torch work.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

from kvtransfer.device_pool import DevicePool
from kvtransfer.layout import KvLayout
from kvtransfer.pool import KvPool
from workers.engine.attention import GROUP_COST_BLOCKS, plan_step
from workers.engine.host_memory import keep_freed_memory
from workers.engine.linear import Gemm, check_gemm
from workers.engine.llama import LlamaModel
from workers.engine.runner import ModelSpec, spec_from_model_dir
from workers.engine.sampler import Sampler
from workers.engine.sequence import SampledToken, ScheduledSeq

log = logging.getLogger("pdrouter.engine")

CPU_KV_CACHE_BYTES = 512 * 1024 * 1024  # at least; and room for CPU_MAX_LEN_SEQS full-context sequences
CPU_MAX_LEN_SEQS = 2
CUDA_KV_CACHE_FRACTION = 0.5  # of the memory still free once the weights are loaded


class ModelRunner:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        device: str = "cpu",
        dtype: str | None = None,
        kv_cache_bytes: int | None = None,
        threads: int | None = None,
        shared_kv: bool = False,
        gemm: Gemm = "auto",
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype: torch.dtype = getattr(torch, dtype)
        self.threads = threads
        check_gemm(gemm, self.device)  # NOTE: now, so a bad choice fails at start, not at the first step
        self.gemm = gemm
        self.shared_kv = shared_kv and self.device.type == "cpu"
        self.transfer_pool: KvPool | DevicePool | None = None  # the pool's bytes as kvtransfer sees them
        # NOTE: shared with the mock runner so both engines describe a directory identically.
        self.spec: ModelSpec = spec_from_model_dir(self.model_dir, block_size, dtype)
        if num_blocks is None:
            num_blocks = max(1, (kv_cache_bytes or self._default_kv_bytes()) // self.spec.layout.block_bytes)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sampler = Sampler()
        self.decode_group_cost = (
            GROUP_COST_BLOCKS  # see attention.group_decodes; bench.decode_groups varies it
        )
        self._model: LlamaModel | None = None
        self._kv_pool: torch.Tensor | None = None
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._load_lock = threading.Lock()

    def _default_kv_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            weights = sum(f.stat().st_size for f in self.model_dir.glob("*.safetensors"))
            return int(max(0, free - weights) * CUDA_KV_CACHE_FRACTION)
        # NOTE: a pool smaller than one full-context request would refuse prompts the model accepts
        max_len_blocks = -(-self.spec.max_model_len // self.spec.layout.block_size)
        return max(CPU_KV_CACHE_BYTES, CPU_MAX_LEN_SEQS * max_len_blocks * self.spec.layout.block_bytes)

    def load(self) -> None:
        """Weights and KV pool, on the calling thread (see the module note); idempotent."""
        with self._load_lock:
            if self._model is None:
                self._load()

    def _load(self) -> None:
        if self.device.type == "cpu":
            keep_freed_memory()
            if self.threads:
                torch.set_num_threads(self.threads)
        layout = self.spec.layout
        model = LlamaModel.load(self.model_dir, self.device, self.dtype, self.gemm)
        shape = (self.num_blocks, layout.num_layers, 2, self.block_size, layout.num_kv_heads, layout.head_dim)
        # NOTE: zeroed (fresh mappings are): padded decode gathers read unwritten slots, 0 * NaN leaks.
        if self.device.type == "cpu":
            self.transfer_pool = KvPool.create(layout, self.num_blocks, shared=self._can_share(layout))
            pool = torch.frombuffer(self.transfer_pool.buffer, dtype=torch.uint8).view(self.dtype).view(shape)
        else:
            pool = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.transfer_pool = DevicePool(layout, pool)
        self.kv_caches = [(pool[:, i, 0], pool[:, i, 1]) for i in range(layout.num_layers)]
        self._kv_pool = pool
        self._model = model

    def _can_share(self, layout: KvLayout) -> bool:
        """Shared memory only when /dev/shm can hold the pool: a full tmpfs would SIGBUS on write."""
        if not self.shared_kv:
            return False
        try:
            st = os.statvfs("/dev/shm")
        except OSError:
            return False
        need = self.num_blocks * layout.block_bytes
        if st.f_bavail * st.f_frsize < need * 1.1:
            log.warning("/dev/shm is too small for a %d MiB KV pool; same-host pulls use tcp", need >> 20)
            return False
        return True

    @property
    def kv_pool(self) -> torch.Tensor:
        self.load()
        assert self._kv_pool is not None
        return self._kv_pool

    @property
    def model(self) -> LlamaModel:
        self.load()
        assert self._model is not None
        return self._model

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> list[SampledToken | None]:
        if not batch:
            return []
        model = self.model
        # NOTE: single-token entries first, longest context first, so decodes of similar length
        # share a padded attention call (attention.group_decodes).
        order = sorted(range(len(batch)), key=lambda i: (batch[i].num_tokens != 1, -batch[i].start))
        items = [batch[i] for i in order]
        token_ids: list[int] = []
        last_token: list[int] = []
        for it in items:
            token_ids.extend(it.seq.token_ids[it.start : it.start + it.num_tokens])
            last_token.append(len(token_ids) - 1)
        step = plan_step(
            [(it.start, it.num_tokens, it.seq.block_table) for it in items],
            self.block_size,
            self.device,
            self.decode_group_cost,
        )
        input_ids = torch.tensor(token_ids, dtype=torch.long).to(self.device)
        hidden = model.forward(input_ids, step.positions, step, self.kv_caches)

        sampling = [j for j, it in enumerate(items) if it.sample]
        out: list[SampledToken | None] = [None] * len(batch)
        if not sampling:
            return out
        rows = torch.tensor([last_token[j] for j in sampling], device=self.device)
        logits = model.logits(hidden[rows])
        seqs = [items[j].seq for j in sampling]
        tokens = self.sampler.sample(logits, [s.request_id for s in seqs], [s.params for s in seqs])
        for j, tok in zip(sampling, tokens, strict=True):
            out[order[j]] = tok
        return out

    def free(self, request_id: str) -> None:
        self.sampler.free(request_id)

    def close(self) -> None:
        if self.transfer_pool is not None:
            self.transfer_pool.close()
