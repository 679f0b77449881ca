"""One request inside the engine: its tokens, how many have KV in the pool, its blocks."""

from __future__ import annotations

import enum

import msgspec


class SamplingParams(msgspec.Struct, kw_only=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; 0: chosen token only; k: plus top-k

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


class SequenceStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


class Sequence:
    """Token ids are prompt + output; the first `num_computed_tokens` have KV in `block_table`."""

    __slots__ = (
        "arrival_time",
        "block_hashes",
        "block_table",
        "finish_reason",
        "first_scheduled_time",
        "kv_import",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_prompt_tokens",
        "num_user_prompt_tokens",
        "params",
        "pin_on_finish",
        "request_id",
        "status",
        "token_ids",
    )

    def __init__(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival_time: float = 0.0
    ) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        # NOTE: a decode leg or a migrated stream arrives as prompt + tokens generated elsewhere
        self.num_user_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # sequence hashes of full blocks, in order
        self.params = params
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.arrival_time = arrival_time
        self.first_scheduled_time = 0.0  # when it first got blocks (queue wait = this - arrival)
        self.pin_on_finish = False  # prefill leg: keep the blocks until the decode side pulls them
        self.kv_import: KvImport | None = None  # decode leg: prompt KV comes from another worker

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


class KvImport:
    """Where a decode-leg sequence's prompt KV lives: `src_block_ids` on the prefill worker cover
    the first `num_tokens` tokens; `pull(src_ids, dst_ids)` (async, run on the event loop) copies
    some of them into this worker's pool."""

    __slots__ = ("num_pulled_blocks", "num_tokens", "ok", "pull", "released", "seconds", "src_block_ids")

    def __init__(self, src_block_ids: list[int], num_tokens: int, pull) -> None:
        self.src_block_ids = src_block_ids
        self.num_tokens = num_tokens
        self.pull = pull  # called once per import, with no ids when the local cache holds them all
        self.ok: bool | None = None
        self.released = False  # the pull has ended and given the handle back (or tried to)
        self.num_pulled_blocks = 0
        self.seconds = 0.0  # the pull's duration (0 when nothing was pulled)


class ScheduledSeq(msgspec.Struct, gc=False):
    """Compute KV for seq.token_ids[start : start + num_tokens]; sample the next token if `sample`.

    `start` equals seq.num_computed_tokens when the batch is built; the runner writes the new
    K/V into the slots given by seq.block_table (slot = block_table[pos // bs] * bs + pos % bs)
    and attends over positions [0, start + num_tokens).
    """

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool


class SampledToken(msgspec.Struct, array_like=True, gc=False):
    token_id: int
    logprob: float | None = None  # log-probability of token_id (when params.logprobs is not None)
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, logprob), best first
