"""Turn one OpenAI request into engine requests and engine outputs into OpenAI JSON.

Data path: the HTTP layer hands a validated request here; `prepare_*` tokenizes it
and builds one `Choice` per returned choice (prompts x n, seeds seed+i); `merge`
runs those engine streams side by side and yields `(index, RequestOutput)`; the
`*_body` / `*_chunks` functions render OpenAI JSON. Closing the merged stream (a
client disconnect cancels it) closes every engine generator, which aborts the
engine request and frees its cache at once. A chat with tools renders them into the
prompt, guides generation and parses calls out of the answer through `tools`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, AsyncIterator

from hybridserve import protocol as P
from hybridserve.errors import ContextLengthExceededError, InvalidRequestError
from hybridserve.gateway.governor import ANSWER_BUDGET_TOKENS
from hybridserve.worker import tools as T

logger = logging.getLogger(__name__)

_END = object()


@dataclass
class Choice:
    """One engine request: one returned choice."""

    index: int
    request_id: str
    prompt_ids: list[int]
    params: Any  # SamplingParams
    prompt_index: int = 0
    logprobs: list[Any] = field(default_factory=list)
    final: Any = None  # the last RequestOutput


class RequestPlan:
    """Everything the worker needs to serve one OpenAI request."""

    def __init__(self, request_id: str, model: str, choices: list[Choice], num_logprobs: int | None,
                 include_usage: bool, chat: bool, tool_names: frozenset[str] | None = None):
        self.request_id = request_id
        self.model = model
        self.choices = choices
        self.num_logprobs = num_logprobs
        self.include_usage = include_usage
        self.chat = chat
        self.tool_names = tool_names   # None: answers are text; else tool calls are parsed from them
        self.created = int(time.time())


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE_OF = _byte_level_alphabet()


class Renderer:
    """Tokenizer-aware helpers: prompt encoding, token strings and bytes for logprobs."""

    def __init__(self, tokenizer: Any, max_context: int):
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.token_str = lru_cache(maxsize=65536)(self._token_str)
        self.token_bytes = lru_cache(maxsize=65536)(self._token_bytes)
        self.think_start_id = self._special_id("<think>")
        self.think_end_id = self._special_id("</think>")
        # duck-typed tokenizers without the attribute render chats themselves
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", True))
        self.template_reads_tools = T.template_reads_tools(tokenizer)

    def _special_id(self, token: str) -> int | None:
        """The id of an added token such as <think>, or None when the vocabulary lacks it."""
        try:
            tid = self.tokenizer.convert_tokens_to_ids(token)
        except (KeyError, ValueError, TypeError, AttributeError):
            return None
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return tid if isinstance(tid, int) and tid >= 0 and tid != unk else None

    def thinking_fields(self, prompt_ids: list[int], budget: int | None) -> dict[str, Any]:
        """Budget-forcing fields of SamplingParams for a thinking budget (none when no budget,
        or when the model has no `</think>` to force: `thinking_cap` caps those instead)."""
        if budget is None or self.think_end_id is None:
            return {}
        start, end = self.think_start_id, self.think_end_id
        last_open = max((i for i, t in enumerate(prompt_ids) if t == start), default=-1)
        last_close = max((i for i, t in enumerate(prompt_ids) if t == end), default=-1)
        return {"max_thinking_tokens": budget, "think_start_id": start,
                "think_end_ids": [end] if end is not None else [],
                "starts_in_thinking": start is not None and last_open > last_close}

    def thinking_cap(self, budget: int | None) -> int | None:
        """max_tokens cap for a thinking budget the engine cannot force (no `</think>` token):
        the budget plus an answer allowance, as the gateway caps non-native engines."""
        if budget is None or self.think_end_id is not None:
            return None
        return budget + ANSWER_BUDGET_TOKENS

    def count_thinking(self, prompt_ids: list[int], token_ids: list[int]) -> int:
        """Generated tokens inside <think>…</think> (markers excluded)."""
        start, end = self.think_start_id, self.think_end_id
        if start is None or end is None:
            return 0
        inside = self.thinking_fields(prompt_ids, 0)["starts_in_thinking"]
        n = 0
        for t in token_ids:
            if t == start:
                inside = True
            elif t == end:
                inside = False
            elif inside:
                n += 1
        return n

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _token_bytes(self, token_id: int) -> list[int]:
        """The token's own bytes: exact for byte-level BPE, where one token may be part of a
        UTF-8 character (its decoded string alone is then U+FFFD)."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and piece and all(c in _BYTE_OF for c in piece):
            return [_BYTE_OF[c] for c in piece]
        return list(self._token_str(token_id).encode())

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def render_chat(self, messages: list[P.ChatMessage], tools: list[P.Tool] | None = None) -> str:
        """The prompt text of a chat (tools as `tools.chat_messages` renders them)."""
        if not self.has_chat_template:
            raise InvalidRequestError(
                "this model has no chat template, so chat messages cannot be turned into a prompt; "
                "send the text as `prompt` to /v1/completions instead", param="messages",
                code="no_chat_template")
        msgs, extra = T.chat_messages(messages, tools, native=self.template_reads_tools)
        return self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, **extra)

    def encode_chat(self, messages: list[P.ChatMessage], tools: list[P.Tool] | None = None) -> list[int]:
        text = self.render_chat(messages, tools)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def check_fits(self, num_prompt: int, max_tokens: int | None) -> int:
        """Return the effective max_tokens, or raise when the request cannot fit the context."""
        if num_prompt == 0:
            raise InvalidRequestError("prompt is empty", param="prompt")
        room = self.max_context - num_prompt
        if room <= 0:
            raise ContextLengthExceededError(
                f"prompt has {num_prompt} tokens; this model's context is {self.max_context} "
                "tokens and at least one must remain for the completion")
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise ContextLengthExceededError(
                f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) exceeds this model's "
                f"context of {self.max_context} tokens; lower max_tokens to at most {room}",
                param="max_tokens")
        return max_tokens


def cache_salt_of(req: P._SamplingFields) -> str | None:
    """vLLM's `cache_salt`: requests share cached prefixes only with requests of the same salt."""
    salt = (req.model_extra or {}).get("cache_salt")
    P.check_cache_salt(salt)
    return salt


def priority_of(req: P._SamplingFields) -> str:
    """`hybridserve_priority`: interactive (the default) or batch (runs behind interactive work)."""
    return P.check_priority((req.model_extra or {}).get("hybridserve_priority"))


def build_choices(request_id: str, prompts: list[list[int]], req: P._SamplingFields,
                  renderer: Renderer, params_cls: Any, num_logprobs: int | None,
                  tool_plan: T.ToolPlan | None = None) -> list[Choice]:
    """One Choice per prompt x n. A guided request (`tool_plan.guided`) gets no thinking budget:
    its grammar applies from the first token."""
    choices = []
    guided = tool_plan.guided if tool_plan else None
    cap = None if guided else renderer.thinking_cap(req.max_thinking_tokens)
    stop = req.stop_list() + list(tool_plan.stop if tool_plan else ())
    salt = cache_salt_of(req)
    priority = priority_of(req)
    for p_idx, ids in enumerate(prompts):
        max_tokens = renderer.check_fits(len(ids), req.requested_max_tokens())
        if cap is not None and cap < max_tokens:
            logger.debug("%s: no </think> token; thinking budget %d caps max_tokens at %d",
                         request_id, req.max_thinking_tokens, cap)
            max_tokens = cap
        extra = {"guided": guided} if guided else renderer.thinking_fields(ids, req.max_thinking_tokens)
        for j in range(req.n):
            seed = None if req.seed is None else req.seed + j
            params = params_cls(
                max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=max(req.top_k or 0, 0), seed=seed, stop=list(stop),
                stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                logprobs=num_logprobs, cache_salt=salt, priority=priority, **extra)
            idx = p_idx * req.n + j
            choices.append(Choice(idx, f"{request_id}-{idx}", ids, params, p_idx))
    return choices


async def merge(engine: Any, choices: list[Choice]) -> AsyncIterator[tuple[Choice, Any]]:
    """Run the choices' engine streams together; yield (choice, output) as they come."""
    if len(choices) == 1:  # the usual case: the engine's stream as it is, no task or queue between
        choice = choices[0]
        gen = engine.generate(choice.request_id, choice.prompt_ids, choice.params)
        try:
            async for out in gen:
                yield choice, out
        finally:
            await gen.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        gen = engine.generate(choice.request_id, choice.prompt_ids, choice.params)
        try:
            async for out in gen:
                queue.put_nowait((choice, out))
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # handed to the consumer, raised there
            queue.put_nowait((choice, err))
        finally:
            await gen.aclose()
            queue.put_nowait((choice, _END))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(tasks)
        while remaining:
            choice, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield choice, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ------------------------------------------------------------------ rendering


def _completion_logprobs(renderer: Renderer, entries: list[Any], offset0: int) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    offset = offset0
    for e in entries:
        s = renderer.token_str(e.token_id)
        tokens.append(s)
        lps.append(e.logprob)
        tops.append({renderer.token_str(t): lp for t, lp in e.top} if e.top else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(renderer: Renderer, entries: list[Any]) -> dict[str, Any]:
    content = []
    for e in entries:
        top = [{"token": renderer.token_str(t), "logprob": lp, "bytes": renderer.token_bytes(t)}
               for t, lp in e.top]
        content.append({"token": renderer.token_str(e.token_id), "logprob": e.logprob,
                        "bytes": renderer.token_bytes(e.token_id), "top_logprobs": top})
    return {"content": content}


def usage_of(plan: RequestPlan, renderer: Renderer | None = None) -> dict[str, Any]:
    prompt = {c.prompt_index: len(c.prompt_ids) for c in plan.choices}
    cached: dict[int, int] = {}  # per prompt, as prompt_tokens counts each prompt once
    completion = thinking = 0
    device = 0.0
    ttft = queue = e2e = None
    for c in plan.choices:
        if c.final is None:
            continue
        completion += len(c.final.token_ids)
        if renderer is not None:
            thinking += renderer.count_thinking(c.prompt_ids, c.final.token_ids)
        m = getattr(c.final, "metrics", None)
        if m is not None:
            cached[c.prompt_index] = max(cached.get(c.prompt_index, 0), getattr(m, "cached_tokens", 0) or 0)
            device += m.device_seconds or 0.0
            ttft = m.ttft_s if ttft is None else ttft
            queue = m.queue_s if queue is None else queue
            e2e = m.e2e_s if e2e is None or (m.e2e_s or 0) > e2e else e2e
    usage = P.usage_dict(sum(prompt.values()), completion, device_seconds=round(device, 6),
                         ttft_s=ttft, queue_s=queue, e2e_s=e2e, thinking_tokens=thinking or None)
    usage["prompt_tokens_details"] = {"cached_tokens": sum(cached.values())}
    return usage


def full_body(plan: RequestPlan, renderer: Renderer) -> dict[str, Any]:
    """The non-streaming response once every choice has finished."""
    choices = []
    for c in plan.choices:
        out = c.final
        lp = None
        if plan.num_logprobs is not None:
            lp = (_chat_logprobs(renderer, c.logprobs) if plan.chat
                  else _completion_logprobs(renderer, c.logprobs, 0))
        if plan.chat:
            message, reason = chat_message(plan, out)
            choices.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": reason})
        else:
            choices.append({"index": c.index, "text": out.text, "logprobs": lp,
                            "finish_reason": out.finish_reason})
    rid = P.new_id("chatcmpl" if plan.chat else "cmpl", plan.request_id)
    build = P.chat_response if plan.chat else P.completion_response
    return build(rid, plan.model, choices, usage_of(plan, renderer))


def chat_message(plan: RequestPlan, out: Any) -> tuple[dict[str, Any], Any]:
    """A finished choice's assistant message and finish_reason ("tool_calls" once it made a call)."""
    if plan.tool_names is None:
        return {"role": "assistant", "content": out.text}, out.finish_reason
    parser = T.ToolCallParser(plan.tool_names)
    parser.feed(out.text)
    parser.finish()
    content, calls = parser.message()
    if not calls:
        return {"role": "assistant", "content": content}, out.finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


class ChunkRenderer:
    """Builds the SSE chunks of a streaming response, one per engine output."""

    def __init__(self, plan: RequestPlan, renderer: Renderer):
        self.plan = plan
        self.renderer = renderer
        self.rid = P.new_id("chatcmpl" if plan.chat else "cmpl", plan.request_id)
        self.build = P.chat_chunk if plan.chat else P.completion_chunk
        self.text_len = {c.index: 0 for c in plan.choices}
        self.parsers = ({} if plan.tool_names is None else
                        {c.index: T.ToolCallParser(plan.tool_names) for c in plan.choices})

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> bytes:
        return P.sse(self.build(self.rid, self.plan.model, self.plan.created, choices, usage,
                                self.plan.include_usage))

    def opening(self) -> list[bytes]:
        if not self.plan.chat:
            return []
        return [self._chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
                for c in self.plan.choices]

    def delta(self, choice: Choice, out: Any) -> bytes | None:
        """The chunks (none, one, or several SSE events in one piece) for one engine output."""
        want_lp = self.plan.num_logprobs is not None
        if not out.delta_text and not out.finished and not (want_lp and out.delta_token_ids):
            return None
        lp = None
        if want_lp:
            entries = list(out.delta_logprobs or [])
            lp = (_chat_logprobs(self.renderer, entries) if self.plan.chat else
                  _completion_logprobs(self.renderer, entries, self.text_len[choice.index]))
        self.text_len[choice.index] += len(out.delta_text)
        reason = out.finish_reason if out.finished else None
        if not self.plan.chat:
            return self._chunk([{"index": choice.index, "text": out.delta_text, "logprobs": lp,
                                 "finish_reason": reason}])
        deltas = self._chat_deltas(choice, out)
        if not deltas and lp is None and reason is None:   # all of it held back (a possible call)
            return None
        parser = self.parsers.get(choice.index)
        if reason is not None and parser is not None and parser.calls:
            reason = "tool_calls"
        bodies = [{"index": choice.index, "delta": d, "logprobs": None, "finish_reason": None}
                  for d in deltas or [{}]]
        bodies[0]["logprobs"], bodies[-1]["finish_reason"] = lp, reason
        return b"".join(self._chunk([body]) for body in bodies)

    def _chat_deltas(self, choice: Choice, out: Any) -> list[dict[str, Any]]:
        parser = self.parsers.get(choice.index)
        if parser is None:
            return [{"content": out.delta_text}] if out.delta_text else []
        events = parser.feed(out.delta_text)
        if out.finished:
            events += parser.finish()
        return T.stream_deltas(events)

    def closing(self) -> list[bytes]:
        tail = []
        if self.plan.include_usage:
            tail.append(self._chunk([], usage_of(self.plan, self.renderer)))
        tail.append(P.SSE_DONE)
        return tail
