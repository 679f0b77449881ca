"""Turn an OpenAI (HTTP) or Inference (gRPC) request into one validated GenerationRequest.

Both front ends go through `finish_request`, so limits and messages are identical.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from pdrouter_proto import worker_pb2 as pb
from router.errors import ApiError, invalid
from router.openai_schema import ChatCompletionRequest, CompletionRequest

MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
CHAT_ROLES = {"system", "user", "assistant", "developer", "tool"}


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    model: str
    prompts: list[list[int]]  # one per prompt; choices = prompts x n
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus top-k
    echo: bool = False
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False
    session_id: str = ""
    chat: bool = False
    arrival: float = field(default_factory=time.perf_counter)

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def sampling(self, choice: int) -> pb.SamplingParams:
        p = pb.SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=self.max_tokens,
            ignore_eos=self.ignore_eos,
        )
        if self.seed is not None:
            p.seed = (self.seed + choice % self.n) & ((1 << 64) - 1)
        if self.logprobs is not None:
            p.logprobs = self.logprobs
        return p


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Limits:
    """What the served model accepts; refreshed from workers' Info."""

    def __init__(self, model_name: str, max_model_len: int, vocab_size: int) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.aliases = {model_name, "default"}

    def check_model(self, model: str) -> str:
        if model not in self.aliases:
            raise ApiError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                "model",
                "model_not_found",
            )
        return self.model_name


def _check_range(name: str, value: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise invalid(f"'{name}' must be in {left}{lo}, {hi}]; got {value}", name)


def _common(req: ChatCompletionRequest | CompletionRequest, gen: GenerationRequest) -> None:
    _check_range("temperature", req.temperature, 0.0, 2.0)
    _check_range("top_p", req.top_p, 0.0, 1.0, lo_open=True)
    if req.top_k is not None and req.top_k < -1:
        raise invalid(f"'top_k' must be -1 (off), 0 (off) or a positive integer; got {req.top_k}", "top_k")
    if req.n is not None and not 1 <= req.n <= MAX_N:
        raise invalid(f"'n' must be between 1 and {MAX_N}; got {req.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value:
            raise invalid(f"'{name}' is not supported by this server; omit it or send 0 (got {value})", name)
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise invalid(f"'stop' accepts at most {MAX_STOP} strings; got {len(stop)}", "stop")
    if any(not s for s in stop):
        raise invalid("'stop' strings must not be empty", "stop")
    gen.temperature = 1.0 if req.temperature is None else req.temperature
    gen.top_p = 1.0 if req.top_p is None else req.top_p
    gen.top_k = max(0, req.top_k or 0)
    gen.seed = req.seed
    gen.n = req.n or 1
    gen.stop = stop
    gen.ignore_eos = bool(req.ignore_eos)
    gen.stream = bool(req.stream)
    gen.include_usage = bool(req.stream_options and req.stream_options.include_usage)


def _message_text(i: int, msg) -> str:
    content = msg.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind != "text" or not isinstance(part.get("text", ""), str):
            raise invalid(
                f"messages[{i}].content[{j}] has type '{kind}'; only 'text' parts are supported",
                f"messages[{i}].content[{j}].type",
            )
        parts.append(part.get("text", ""))
    return "".join(parts)


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, str]]:
    if not req.messages:
        raise invalid("'messages' must contain at least one message", "messages", "empty_array")
    out = []
    for i, msg in enumerate(req.messages):
        if msg.role not in CHAT_ROLES:
            raise invalid(
                f"messages[{i}].role '{msg.role}' is not one of {sorted(CHAT_ROLES)}", f"messages[{i}].role"
            )
        role = "system" if msg.role == "developer" else msg.role
        out.append({"role": role, "content": _message_text(i, msg)})
    return out


def chat_request(req: ChatCompletionRequest, prompt: list[int], limits: Limits) -> GenerationRequest:
    gen = GenerationRequest(new_request_id("chatcmpl"), limits.check_model(req.model), [prompt], 0, chat=True)
    _common(req, gen)
    if req.top_logprobs is not None:
        if not req.logprobs:
            raise invalid("'top_logprobs' requires 'logprobs': true", "top_logprobs")
        if not 0 <= req.top_logprobs <= MAX_TOP_LOGPROBS:
            raise invalid(f"'top_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}", "top_logprobs")
    gen.logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    finish_request(gen, max_tokens, name, "messages", limits)
    return gen


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise invalid("'prompt' must not be empty", "prompt", "empty_array")
    if all(isinstance(x, int) for x in p):
        return [list(p)]  # type: ignore[arg-type]
    if all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
        return list(p)  # type: ignore[arg-type]
    raise invalid("'prompt' must be a string, a list of strings, or token ids", "prompt")


def completion_request(req: CompletionRequest, prompts: list[list[int]], limits: Limits) -> GenerationRequest:
    gen = GenerationRequest(new_request_id("cmpl"), limits.check_model(req.model), prompts, 0)
    _common(req, gen)
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise invalid(f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}; got {req.logprobs}", "logprobs")
    gen.logprobs = req.logprobs
    gen.echo = bool(req.echo)
    finish_request(gen, req.max_tokens if req.max_tokens is not None else 16, "max_tokens", "prompt", limits)
    return gen


def finish_request(
    gen: GenerationRequest, max_tokens: int | None, max_name: str, prompt_name: str, limits: Limits
) -> None:
    """Check prompt ids and length against the context; settle max_tokens."""
    ctx = limits.max_model_len
    for prompt in gen.prompts:
        if not prompt:
            raise invalid(f"'{prompt_name}' must not be empty", prompt_name, "empty_prompt")
        bad = next((t for t in prompt if not 0 <= t < limits.vocab_size), None)
        if bad is not None:
            raise invalid(
                f"token id {bad} in '{prompt_name}' is outside the vocabulary [0, {limits.vocab_size})",
                prompt_name,
            )
    longest = max(len(p) for p in gen.prompts)
    if max_tokens is not None and max_tokens < 1:
        raise invalid(f"'{max_name}' must be at least 1; got {max_tokens}", max_name)
    if max_tokens is None:
        max_tokens = ctx - longest
    if longest + max_tokens > ctx or longest >= ctx:
        where = "messages" if prompt_name == "messages" else "prompt"
        raise ApiError(
            400,
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the {where}, {max_tokens} in the completion). "
            f"Please reduce the length of the {where} or completion.",
            prompt_name,
            "context_length_exceeded",
        )
    gen.max_tokens = max_tokens
