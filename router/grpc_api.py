"""The public gRPC Inference service: same validation and orchestration as the HTTP API.

Per call: API key (`authorization` metadata) -> admission (draining, --max-in-flight) ->
validate -> route -> stream chunks, then one Complete per choice. Errors are gRPC status codes
with the same messages the HTTP API puts in its error JSON; a cancelled call, or one whose
deadline passed, cancels the worker calls with it (the workers free its KV blocks).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc

from pdrouter_proto import inference_pb2 as pb
from pdrouter_proto import inference_pb2_grpc as pb_grpc
from router import timeline
from router.errors import GRPC_CODES, ApiError, invalid
from router.http_api import RouterState
from router.requests import MAX_TOP_LOGPROBS, GenerationRequest, finish_request, new_request_id
from workers.telemetry import metadata_dict


class InferenceService(pb_grpc.InferenceServicer):
    def __init__(self, state: RouterState) -> None:
        self.state = state

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        await self._authorize(metadata_dict(context.invocation_metadata()), context)
        lim = self.state.limits
        model = pb.Model(
            id=lim.model_name,
            owned_by="pdrouter",
            created=self.state.started,
            max_model_len=lim.max_model_len,
        )
        return pb.ListModelsResponse(models=[model])

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        meta = metadata_dict(context.invocation_metadata())
        await self._authorize(meta, context)
        tl = timeline.start(meta.get("x-request-id") or uuid.uuid4().hex, meta, "generate")
        tl.mark("parsed")
        status = 200
        try:
            await self.state.admission.acquire()
        except ApiError as exc:
            await _abort(context, exc)
        try:
            gen = await self._build(request)
            tl.mark("tokenized")
            route = self.state.orchestrator.route(gen, meta.get("x-session-id") or gen.session_id)
            tl.mark("routed")
            tl.mode, tl.route = route[0].mode, self.state.orchestrator.route_header(route)
            tl.aliases.append(gen.request_id)
            await context.send_initial_metadata(
                (
                    ("x-request-id", gen.request_id),
                    ("x-pdrouter-route", self.state.orchestrator.route_header(route)),
                )
            )
            usage_prompt = sum(len(p) for p in gen.prompts)
            if gen.echo:
                for i in range(gen.num_choices):
                    prompt = gen.prompts[i // gen.n]
                    text = self.state.tokenizer.decode(prompt, skip_special_tokens=False)
                    echo = pb.Chunk(index=i, text=text, token_ids=prompt, echo=True)
                    yield pb.GenerateResponse(request_id=gen.request_id, chunk=echo)
            token_text = self.state.token_text
            async for d in self.state.orchestrator.run(gen, route):
                if d.text or d.token_ids:
                    chunk = pb.Chunk(index=d.index, text=d.text, token_ids=d.token_ids)
                    for lp in d.logprobs or ():
                        chunk.logprobs.add(
                            token_id=lp.token_id,
                            logprob=lp.logprob,
                            top_token_ids=[t for t, _ in lp.top],
                            top_logprobs=[v for _, v in lp.top],
                            token=token_text(lp.token_id),
                            top_tokens=[token_text(t) for t, _ in lp.top],
                        )
                    yield pb.GenerateResponse(request_id=gen.request_id, chunk=chunk)
                    if d.text:
                        tl.mark("first_sent")
                if d.finish_reason is not None:
                    usage = pb.Usage(
                        prompt_tokens=usage_prompt,
                        completion_tokens=d.completion_tokens,
                        total_tokens=usage_prompt + d.completion_tokens,
                        cached_tokens=d.cached_tokens,
                    )
                    yield pb.GenerateResponse(
                        request_id=gen.request_id,
                        complete=pb.Complete(index=d.index, finish_reason=d.finish_reason, usage=usage),
                    )
        except ApiError as exc:
            status = exc.status
            await _abort(context, exc)
        except asyncio.CancelledError:
            status = 499
            raise
        finally:
            self.state.admission.release()
            tl.finish(status, self.state.trace_every_nth_token)
            self.state.timelines.add(tl)

    async def _authorize(self, meta: dict[str, str], context: grpc.aio.ServicerContext) -> None:
        try:
            self.state.api_keys.check(meta.get("authorization"))
        except ApiError as exc:
            await _abort(context, exc)

    async def _build(self, r: pb.GenerateRequest) -> GenerationRequest:
        state = self.state
        model = state.limits.check_model(r.model or "default")
        kind = r.WhichOneof("input")
        if kind == "chat":
            if not r.chat.messages:
                raise invalid("'messages' must contain at least one message", "messages", "empty_array")
            messages = [{"role": m.role, "content": m.content} for m in r.chat.messages]
            prompt = await state.encode_chat(messages)
        elif kind == "prompt":
            prompt = await state.encode_text(r.prompt)
        elif kind == "tokens":
            prompt = list(r.tokens.token_ids)
        else:
            raise invalid("one of 'chat', 'prompt' or 'tokens' is required", "input")
        gen = GenerationRequest(
            r.request_id or new_request_id("gen"), model, [prompt], 0, chat=kind == "chat"
        )
        if r.HasField("temperature"):
            if not 0.0 <= r.temperature <= 2.0:
                raise invalid(f"'temperature' must be in [0.0, 2.0]; got {r.temperature}", "temperature")
            gen.temperature = r.temperature
        if r.HasField("top_p"):
            if not 0.0 < r.top_p <= 1.0:
                raise invalid(f"'top_p' must be in (0.0, 1.0]; got {r.top_p}", "top_p")
            gen.top_p = r.top_p
        if r.HasField("top_k"):
            if r.top_k < -1:
                raise invalid(
                    f"'top_k' must be -1 (off), 0 (off) or a positive integer; got {r.top_k}", "top_k"
                )
            gen.top_k = max(0, r.top_k)
        for name in ("presence_penalty", "frequency_penalty"):
            if r.HasField(name) and getattr(r, name):
                raise invalid(f"'{name}' is not supported by this server; omit it or send 0", name)
        if r.n > 16:
            raise invalid(f"'n' must be between 1 and 16; got {r.n}", "n")
        gen.n = max(1, r.n)
        if len(r.stop) > 4 or any(not s for s in r.stop):
            raise invalid("'stop' accepts at most 4 non-empty strings", "stop")
        gen.stop = list(r.stop)
        gen.seed = r.seed if r.HasField("seed") else None
        if r.HasField("logprobs") and r.logprobs > MAX_TOP_LOGPROBS:
            limit = f"between 0 and {MAX_TOP_LOGPROBS}"
            raise invalid(f"'logprobs' must be {limit}; got {r.logprobs}", "logprobs")
        gen.logprobs = r.logprobs if r.HasField("logprobs") else None
        if r.echo and kind == "chat":
            raise invalid("'echo' is for 'prompt' or 'tokens' input, not 'chat'", "echo")
        gen.echo = r.echo
        gen.ignore_eos = r.ignore_eos
        gen.session_id = r.session_id
        default_max = None if gen.chat else 16
        finish_request(
            gen,
            r.max_tokens if r.HasField("max_tokens") else default_max,
            "max_tokens",
            "messages" if gen.chat else "prompt",
            state.limits,
        )
        return gen


async def _abort(context: grpc.aio.ServicerContext, exc: ApiError) -> None:
    """End the call with the status code matching the HTTP status, and the same message."""
    await context.abort(grpc.StatusCode[GRPC_CODES.get(exc.status, "INTERNAL")], exc.message)
