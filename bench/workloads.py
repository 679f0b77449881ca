"""Workload generators and the pure metrics of bench.routing (no processes, no network).

Two workloads, built from random words (text: the router and SGLang's gateway route on text):

- `shared_prefix`: SGLang's "generated shared prefix" shape: G groups x P prompts, each group's
  prompts share one long prefix (a system prompt / document) plus a short question of their own;
  Poisson arrivals, groups interleaved at random. bench.routing tunes `--kv-overlap-weight` on it.
- `multi_turn`: chats over S distinct system prompts. Each conversation picks one system prompt and
  runs T turns; turn k's prompt is turn k-1's prompt + the reply the model gave to it + a new user
  message (`next_prompt`), so prompts grow by the model's own output and a turn can only be sent
  once the previous reply is in. Conversations start as a Poisson process; between a reply and the
  next turn the user "thinks" for an exponential time. bench.routing reports on it (held out).

`request_ms` and `offered_rate` turn the mock's step-time model into an arrival rate for a target
load, so a faster or slower timing profile keeps the same load instead of a fixed req/s.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# (rng, about how many tokens) -> text; bench.routing passes the model's tokenizer, tests a fake one
TextFn = Callable[[random.Random, int], str]

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "do", "zu", "ra", "fe", "gi", "ho", "wa")


def words_to_tokens(encode: Callable[[str], list[int]]) -> TextFn:
    """A TextFn of random two-syllable words, trimmed to at most `num_tokens` tokens of `encode`."""

    def text(rng: random.Random, num_tokens: int) -> str:
        words: list[str] = []
        while len(encode(" ".join(words))) < num_tokens:
            words += [f"{rng.choice(SYLLABLES)}{rng.choice(SYLLABLES)}" for _ in range(16)]
        while len(encode(" ".join(words))) > num_tokens:
            words.pop()
        return " ".join(words)

    return text


@dataclass(slots=True, frozen=True)
class Request:
    """One prompt of the shared-prefix workload."""

    group: int
    prompt: str
    at: float  # seconds after the start


def shared_prefix(
    text: TextFn,
    groups: int,
    per_group: int,
    rate: float,
    seed: int,
    prefix_tokens: int = 1024,
    question_tokens: int = 64,
) -> list[Request]:
    rng = random.Random(seed)
    prefixes = [text(rng, prefix_tokens) for _ in range(groups)]
    order = [g for g in range(groups) for _ in range(per_group)]
    rng.shuffle(order)
    t, out = 0.0, []
    for g in order:
        t += rng.expovariate(rate)
        out.append(Request(g, prefixes[g] + "\n\nQuestion: " + text(rng, question_tokens), t))
    return out


@dataclass(slots=True, frozen=True)
class Turn:
    user: str  # the new user message
    think_s: float  # the pause between the previous reply and this turn (0 for the first turn)


@dataclass(slots=True, frozen=True)
class Chat:
    conversation: int
    system: int  # index into the workload's system prompts
    at: float  # when the first turn is sent, seconds after the start
    turns: tuple[Turn, ...]


@dataclass(slots=True, frozen=True)
class ChatWorkload:
    systems: tuple[str, ...]
    chats: tuple[Chat, ...]

    @property
    def num_requests(self) -> int:
        return sum(len(c.turns) for c in self.chats)


def multi_turn(
    text: TextFn,
    systems: int,
    conversations: int,
    turns: int,
    rate: float,
    seed: int,
    system_tokens: tuple[int, int] = (512, 1536),
    user_tokens: tuple[int, int] = (32, 128),
    think_s: float = 2.0,
) -> ChatWorkload:
    """`conversations` chats of `turns` turns over `systems` system prompts (lengths uniform in
    `system_tokens`); each chat's system prompt is drawn at random, so several chats share each one.
    User messages are uniform in `user_tokens`; think times exponential with mean `think_s`;
    conversations start at `rate` per second (Poisson)."""
    rng = random.Random(seed)
    prompts = tuple(text(rng, rng.randint(*system_tokens)) for _ in range(systems))
    t, chats = 0.0, []
    for c in range(conversations):
        t += rng.expovariate(rate)
        msgs = tuple(
            Turn(text(rng, rng.randint(*user_tokens)), rng.expovariate(1 / think_s) if k else 0.0)
            for k in range(turns)
        )
        chats.append(Chat(c, rng.randrange(systems), t, msgs))
    return ChatWorkload(prompts, tuple(chats))


def first_prompt(system: str, user: str) -> str:
    return f"{system}\n\nUser: {user}\n\nAssistant:"


def next_prompt(previous_prompt: str, previous_reply: str, user: str) -> str:
    """Turn k's prompt: turn k-1's prompt, the reply to it, and the new user message."""
    return f"{previous_prompt}{previous_reply}\n\nUser: {user}\n\nAssistant:"


def request_ms(
    timing: Sequence[float],
    prompt_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
    decode_batch: int = 4,
    chunk: int = 512,
) -> float:
    """A request's share of one worker's modelled time (ms) under the mock's step-time model
    a,b,c,d,e,f: its uncached prompt in `chunk`-token prefill chunks (a + b*n + c*n^2 each), then
    `output_tokens` decode steps shared by `decode_batch` sequences (d / batch + e + f * context
    per token). An estimate for setting the arrival rate, not a prediction of latency."""
    a, b, c, d, e, f = timing
    todo, ms = max(0, prompt_tokens - cached_tokens), 0.0
    while todo > 0:
        n = min(chunk, todo)
        ms += a + b * n + c * n * n
        todo -= n
    for i in range(output_tokens):
        ms += d / decode_batch + e + f * (prompt_tokens + i + 1)
    return ms


def offered_rate(load: float, workers: int, mean_request_ms: float) -> float:
    """Requests per second that keep `workers` busy `load` of the time at `mean_request_ms` each."""
    return load * workers * 1000.0 / mean_request_ms


def chat_prompt_tokens(workload: ChatWorkload, count: Callable[[str], int], reply_tokens: int) -> list[int]:
    """Each turn's prompt length (tokens), assuming every reply adds `reply_tokens` tokens."""
    out = []
    for chat in workload.chats:
        tokens = count(workload.systems[chat.system]) + 8
        for k, turn in enumerate(chat.turns):
            tokens += count(turn.user) + 8 + (reply_tokens if k else 0)
            out.append(tokens)
    return out


@dataclass(slots=True)
class Result:
    key: int  # the group (shared prefix) or conversation (multi-turn)
    turn: int  # 0 for the shared-prefix workload
    worker: str
    ttft: float  # seconds, measured by the client
    e2e: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int


def pct(values: Sequence[float], q: float) -> float:
    """The same percentile as bench.common.pct (inclusive quantiles), without its imports."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, round(q) - 1))]


def summarize(name: str, results: Sequence[Result], num_workers: int, time_scale: float = 1.0) -> dict:
    """Per policy: prefix hit rate, TTFT/e2e (x `time_scale`: wall -> modelled time), balance,
    how many workers each group/conversation touched, and (multi-turn) how often a turn went to
    the worker that served the previous turn of its conversation."""
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    counts = Counter(r.worker for r in results if r.worker)
    fair = len(results) / num_workers
    spread: dict[int, set[str]] = {}
    for r in results:
        if r.worker:
            spread.setdefault(r.key, set()).add(r.worker)
    by_turn = {(r.key, r.turn): r.worker for r in results}
    later = [r for r in results if r.turn > 0 and r.worker]
    same = sum(1 for r in later if by_turn.get((r.key, r.turn - 1)) == r.worker)
    scale = 1e3 * time_scale
    return {
        "policy": name,
        "requests": len(results),
        "hit_rate": cached / prompt if prompt else 0.0,
        "ttft_p50_ms": pct([r.ttft for r in results], 50) * scale,
        "ttft_p99_ms": pct([r.ttft for r in results], 99) * scale,
        "e2e_p50_ms": pct([r.e2e for r in results], 50) * scale,
        "max_share": max(counts.values()) / fair if counts else math.nan,
        "workers_used": len(counts),
        "workers_per_key": sum(map(len, spread.values())) / len(spread) if spread else math.nan,
        "same_worker": same / len(later) if later else math.nan,
    }


def pick_weight(rows: Sequence[dict], default: float) -> float:
    """The overlap weight with the lowest TTFT p50 on the tuning workload; a tie (within 1%)
    goes to `default`, then to the smaller weight."""
    best = min(r["ttft_p50_ms"] for r in rows)
    near = [r["weight"] for r in rows if r["ttft_p50_ms"] <= best * 1.01]
    return default if default in near else min(near)


def start_rate(workload: ChatWorkload, rate: float) -> ChatWorkload:
    """The same chats with start times for `rate` conversations/s, from a workload generated at 1/s
    (exponential gaps scale exactly: Expo(rate) = Expo(1) / rate, drawn from the same numbers)."""
    chats = tuple(Chat(c.conversation, c.system, c.at / rate, c.turns) for c in workload.chats)
    return ChatWorkload(workload.systems, chats)
