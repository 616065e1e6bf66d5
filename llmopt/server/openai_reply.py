"""OpenAI response objects of one chat or completions request: the whole reply, or its stream
of chunks (OpenAI's shapes, which the ``openai`` SDK's stream helpers accumulate).

A stream carries what the whole reply carries: each chunk holds the log-probabilities of the
tokens whose text it sends (tokens still held back go with a later chunk, the rest with the
choice's last chunk), and a tool call streams as OpenAI streams one: ``delta.tool_calls`` with
the call's id and name first, then its arguments piece by piece, and ``finish_reason``
``tool_calls``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from llmopt.runtime.sequence import GenerationResult, TokenLogprob
from llmopt.runtime.tool_calls import (
    ArgumentsDelta,
    CallStarted,
    ContentDelta,
    StreamEvent,
    ToolCallStream,
    parse_tool_calls,
)
from llmopt.server.models import Decoder
from llmopt.server.openai_params import GenerateRequest

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length",
          "cancelled": "stop"}


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class Reply:
    """Builds one request's response objects, chat or completions shape."""

    def __init__(self, spec: GenerateRequest, model: Decoder) -> None:
        self.spec = spec
        self.chat = spec.chat
        self.model = model
        self.id = ("chatcmpl-" if spec.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if spec.chat else "text_completion"

    def head(self, chunk: bool) -> dict[str, Any]:
        name = self.object + (".chunk" if chunk and self.chat else "")
        head = {"id": self.id, "object": name, "created": self.created, "model": self.spec.model}
        if chunk and self.spec.include_usage:
            head["usage"] = None
        return head

    def whole(self, results: list[GenerationResult]) -> dict[str, Any]:
        choices = []
        for index, result in enumerate(results):
            choice: dict[str, Any] = {"index": index,
                                      "finish_reason": FINISH[result.finish_reason]}
            calls = parse_tool_calls(result.text) if self.spec.tool_calls else None
            if calls:
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id(), "type": "function", "function": call} for call in calls]}
                choice["finish_reason"] = "tool_calls"
            elif self.chat:
                choice["message"] = {"role": "assistant", "content": result.text}
            else:
                choice["text"] = result.text
            choice["logprobs"] = self.logprobs(result.logprobs)
            choices.append(choice)
        return {**self.head(False), "choices": choices, "usage": self._usage(results)}

    def first_chunk(self) -> dict[str, Any]:
        if not self.chat:
            return {**self.head(True), "choices": []}
        # with tools offered the answer may be calls: content stays unset until text comes,
        # so an accumulated call's message has content None, as the whole reply's has
        role = {"role": "assistant", "content": None if self.spec.tool_calls else ""}
        return {**self.head(True), "choices": [
            {"index": i, "delta": dict(role), "logprobs": None, "finish_reason": None}
            for i in range(len(self.spec.prompts) * self.spec.n)]}

    def choice_stream(self, index: int, logprobs: Sequence[TokenLogprob] | None
                      ) -> ChoiceStream:
        return ChoiceStream(self, index, logprobs)

    def usage_chunk(self, results: list[GenerationResult]) -> dict[str, Any]:
        return {**self.head(True), "choices": [], "usage": self._usage(results)}

    def _usage(self, results: list[GenerationResult]) -> dict[str, Any]:
        # each prompt is counted once however many choices it has, as OpenAI counts it
        firsts = results[::self.spec.n]
        prompt = sum(r.stats.prompt_tokens for r in firsts)
        completion = sum(r.stats.generated_tokens for r in results)
        cached = sum(r.stats.cached_prompt_tokens for r in firsts)  # the prefix cache's share
        usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion,
                                 "prompt_tokens_details": {"cached_tokens": cached}}
        # a prediction's or prompt lookup's drafts, as OpenAI counts a prediction's: where the
        # request asked for them, or the model's own prompt_lookup drafted for it
        accepted = sum(r.stats.accepted_draft_tokens for r in results)
        rejected = sum(r.stats.rejected_draft_tokens for r in results)
        if self.spec.params.drafts or accepted or rejected:
            usage["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                                  "rejected_prediction_tokens": rejected}
        return usage

    def logprobs(self, logprobs: Sequence[TokenLogprob] | None, offset: int = 0) -> Any:
        """OpenAI's ``logprobs`` of these tokens (completions: ``text_offset`` counted from
        ``offset``, the length of the text before them)."""
        if logprobs is None:
            return None
        text: Callable[[int], str] = self._token_text
        if self.chat:
            def entry(token: int, value: float) -> dict[str, Any]:
                piece = text(token)
                return {"token": piece, "logprob": value, "bytes": list(piece.encode())}

            return {"content": [{**entry(lp.token_id, lp.logprob),
                                 "top_logprobs": [entry(t, v) for t, v in lp.top]}
                                for lp in logprobs]}
        tokens = [text(lp.token_id) for lp in logprobs]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [{text(t): v for t, v in lp.top} for lp in logprobs],
                "text_offset": list(_offsets(tokens, offset))}

    def _token_text(self, token: int) -> str:
        tokenizer = self.model.tokenizer
        return str(token) if tokenizer is None else str(tokenizer.decode([token]))


class ChoiceStream:
    """The chunks of one streamed choice. ``logprobs`` is the engine's list for the request
    (filled as tokens are generated; None when not asked for)."""

    def __init__(self, reply: Reply, index: int,
                 logprobs: Sequence[TokenLogprob] | None) -> None:
        self.reply = reply
        self.index = index
        self.source = logprobs
        self.sent_tokens = 0  # tokens whose logprobs went out
        self.text_offset = 0  # completions: characters of the tokens' text sent
        self.calls = ToolCallStream(reply.spec.tool_names) if reply.spec.tool_calls else None

    def delta(self, text: str, tokens: int) -> Iterator[dict[str, Any]]:
        """Chunks for new ``text``, produced by the first ``tokens`` generated tokens."""
        events: list[StreamEvent] = list(self.calls.push(text)) if self.calls \
            else [ContentDelta(text)]
        if events:
            yield self._chunk(events, self._logprobs_until(tokens), None)

    def final(self, result: GenerationResult) -> Iterator[dict[str, Any]]:
        """The held-back rest, then the choice's last chunk with its ``finish_reason``."""
        events = list(self.calls.finish()) if self.calls else []
        finish = FINISH[result.finish_reason]
        if self.calls and parse_tool_calls(result.text):  # as the whole reply decides
            finish = "tool_calls"
        rest = self._logprobs_until(len(result.token_ids), result.logprobs)
        if events:
            yield self._chunk(events, rest, None)
            rest = None
        yield self._chunk([], rest, finish)

    def _logprobs_until(self, tokens: int, source: Sequence[TokenLogprob] | None = None
                        ) -> list[TokenLogprob] | None:
        source = self.source if source is None else source
        if source is None:
            return None
        taken = list(source[self.sent_tokens:tokens])
        self.sent_tokens = max(self.sent_tokens, tokens)
        return taken

    def _chunk(self, events: list[StreamEvent], logprobs: list[TokenLogprob] | None,
               finish: str | None) -> dict[str, Any]:
        reply = self.reply
        choice: dict[str, Any] = {"index": self.index, "finish_reason": finish}
        text = "".join(e.text for e in events if isinstance(e, ContentDelta))
        if reply.chat:
            delta: dict[str, Any] = {"content": text} if text else {}
            calls = self._call_deltas(events)
            if calls:
                delta["tool_calls"] = calls
            choice["delta"] = delta
        else:
            choice["text"] = text
        choice["logprobs"] = None if logprobs is None else reply.logprobs(logprobs,
                                                                          self.text_offset)
        if not reply.chat and logprobs:  # offsets run on over the tokens' text, as whole()'s
            self.text_offset += sum(len(token) for token in choice["logprobs"]["tokens"])
        return {**reply.head(True), "choices": [choice]}

    def _call_deltas(self, events: list[StreamEvent]) -> list[dict[str, Any]]:
        """OpenAI's ``delta.tool_calls``: a call's id, type and name once, then its arguments;
        pieces of one call in a row are joined."""
        deltas: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, CallStarted):
                deltas.append({"index": event.index, "id": call_id(), "type": "function",
                               "function": {"name": event.name, "arguments": ""}})
            elif isinstance(event, ArgumentsDelta):
                if deltas and deltas[-1]["index"] == event.index:
                    deltas[-1]["function"]["arguments"] += event.text
                else:
                    deltas.append({"index": event.index,
                                   "function": {"arguments": event.text}})
        return deltas


def _offsets(tokens: list[str], start: int = 0) -> Iterator[int]:
    offset = start
    for token in tokens:
        yield offset
        offset += len(token)
