"""`/v1/chat/completions`: the instruct format in, answers out, streamed or whole; tools and
`tool_choice`, the calls parsed into OpenAI's shape."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi.responses import Response

from mistral_nemo.engine import CompletionOutput
from mistral_nemo.sampling import TokenLogprob
from mistral_nemo.server.async_engine import RequestStream
from mistral_nemo.server.errors import APIError
from mistral_nemo.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    NamedToolChoice,
    ToolCall,
    TopLogprob,
    Usage,
)
from mistral_nemo.server.serving import OpenAIServing
from mistral_nemo.structured import Guidance, tool_calls_guidance
from mistral_nemo.tokenizer.text_tools import TOOL_CALL_OPEN, parse_text_tool_calls, to_text_tools
from mistral_nemo.tokenizer.tool_calls import (
    AssistantOutput,
    calls_tools,
    tool_call_answer,
    tool_calls_id,
)

ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatServing(OpenAIServing):
    async def create(self, body: ChatCompletionRequest) -> Response:
        self.check_model(body.model)
        tools = body.tools or None
        choice = body.tool_choice or "auto"
        if choice == "any":
            choice = "required"
        if tools is None and choice not in ("auto", "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        uses_tools = tools is not None or any(
            m.get("role") == "tool" or m.get("tool_calls") for m in body.messages
        )
        if self.native_tools or not uses_tools:
            prompt = self.tokenizer.encode_chat(body.messages, tools)
        else:  # the generic format: tools in the system prompt, calls as text
            shown = tools if choice != "none" else None
            conversation = to_text_tools({"tools": shown, "messages": body.messages})
            prompt = self.tokenizer.encode_chat(conversation["messages"])
        banned, guided = self._tool_choice(tools, choice, body.parallel_tool_calls is not False)
        if (asked := self.guidance(body)) is not None:
            if guided is not None and choice != "auto":
                raise APIError(
                    400,
                    "a structured output cannot be asked with tool_choice " + str(choice),
                    param="response_format",
                )
            guided = asked  # with tool_choice auto: answer in the format, not with a call
        params = self.sampling_params(
            body,
            len(prompt),
            body.max_completion_tokens or body.max_tokens,
            (body.top_logprobs or 0) if body.logprobs else None,
            banned_token_ids=banned,
            guided=guided,
        )
        stream = await self.engine.submit(prompt, params)
        rid = self.new_request_id("chatcmpl")
        with_tools = tools is not None and choice != "none"
        if body.stream:
            return self.sse(self._chunks(rid, stream, params.n, with_tools, body))
        final = await self.final_output(stream)
        return self.json_response(
            ChatCompletion(
                id=rid,
                created=int(time.time()),
                model=self.model_name,
                choices=[self._choice(o, with_tools, body.logprobs) for o in final.outputs],
                usage=Usage(**final.usage),
            )
        )

    @property
    def native_tools(self) -> bool:
        """Whether the chat format has tool calls of its own (NeMo's [TOOL_CALLS]); other
        models get the generic text format (`tokenizer.text_tools`)."""
        return tool_calls_id(self.tokenizer) is not None

    def _tool_choice(
        self, tools: list[dict[str, Any]] | None, choice: ToolChoice, parallel: bool
    ) -> tuple[list[int], Guidance | None]:
        """tool_choice as constraints on the completion, (banned ids, guidance): "none" bans
        [TOOL_CALLS] (the generic format shows no tools then); "required" and a named
        function allow only calls valid under the tools' schemas; "auto" lets the model
        answer in text but holds a call it starts to the same schemas."""
        if not tools:
            return [], None
        marker = tool_calls_id(self.tokenizer)
        if choice == "none":
            return ([marker] if marker is not None else []), None
        name = choice.function.name if isinstance(choice, NamedToolChoice) else None
        if name is not None and name not in {t["function"]["name"] for t in tools}:
            raise APIError(
                400,
                f"tool_choice names {name!r}, which is not among the tools",
                param="tool_choice",
            )
        chat_format = "mistral" if marker is not None else "text"
        return [], tool_calls_guidance(tools, name, parallel, choice == "auto", chat_format)

    def _answer(self, o: CompletionOutput) -> AssistantOutput | None:
        """A finished completion's text and tool calls, if it made valid calls."""
        if self.native_tools:
            return tool_call_answer(self.tokenizer, o.token_ids)
        answer = parse_text_tool_calls(o.text)
        return answer if answer.tool_calls else None

    def _in_call(self, o: CompletionOutput) -> bool:
        """Whether a completion has started calling tools (its text is then held back)."""
        if self.native_tools:
            return calls_tools(self.tokenizer, o.token_ids)
        return TOOL_CALL_OPEN in o.text

    def _choice(self, o: CompletionOutput, with_tools: bool, logprobs: bool) -> ChatChoice:
        answer = self._answer(o) if with_tools else None
        if answer is None:
            message, finish = ChatMessage(content=o.text), o.finish_reason
        else:
            calls = _tool_calls(answer.tool_calls)
            message, finish = (
                ChatMessage(content=answer.content or None, tool_calls=calls),
                "tool_calls",
            )
        return ChatChoice(
            index=o.index,
            message=message,
            finish_reason=finish,
            logprobs=self._logprobs(o.logprobs) if logprobs else None,
        )

    async def _chunks(
        self,
        rid: str,
        stream: RequestStream,
        n: int,
        with_tools: bool,
        body: ChatCompletionRequest,
    ) -> AsyncIterator[ChatCompletionChunk]:
        created = int(time.time())

        def chunk(
            choices: list[ChatChunkChoice], usage: Usage | None = None
        ) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=rid, created=created, model=self.model_name, choices=choices, usage=usage
            )

        for i in range(n):
            yield chunk(
                [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))]
            )
        sent_text = [0] * n  # characters of each choice's text streamed so far
        sent_logprobs = [0] * n
        final = None
        async for out in stream:
            final = out
            for o in out.outputs:
                # Once a choice calls tools, its text is the calls' JSON: hold it back until
                # they can be parsed whole, at the end.
                in_call = with_tools and self._in_call(o)
                delta = DeltaMessage(content=None if in_call else o.delta or None)
                finish = o.finish_reason
                if finish is not None and in_call:
                    answer = self._answer(o)
                    if answer is None:  # not valid calls: the held-back text, as it is
                        delta.content = o.text[sent_text[o.index] :]
                    else:
                        delta.tool_calls = [
                            DeltaToolCall(index=k, **c.model_dump())
                            for k, c in enumerate(_tool_calls(answer.tool_calls))
                        ]
                        finish = "tool_calls"
                if not (delta.content or delta.tool_calls or finish):
                    continue
                choice = ChatChunkChoice(index=o.index, delta=delta, finish_reason=finish)
                if body.logprobs and o.logprobs is not None:
                    choice.logprobs = self._logprobs(o.logprobs[sent_logprobs[o.index] :])
                    sent_logprobs[o.index] = len(o.logprobs)
                sent_text[o.index] += len(delta.content or "")
                yield chunk([choice])
        if body.include_usage and final is not None:
            yield chunk([], Usage(**final.usage))

    def _logprobs(self, lps: list[TokenLogprob] | None) -> ChatLogprobs | None:
        if lps is None:
            return None

        def top(token: int, logprob: float) -> TopLogprob:
            piece = self.tokenizer.token_bytes(token)
            return TopLogprob(
                token=self.tokenizer.id_to_piece(token), logprob=logprob, bytes=list(piece)
            )

        return ChatLogprobs(
            content=[
                ChatTokenLogprob(
                    **top(x.token_id, x.logprob).model_dump(),
                    top_logprobs=[top(t, v) for t, v in x.top.items()],
                )
                for x in lps
            ]
        )


def _tool_calls(calls: list[dict[str, str]]) -> list[ToolCall]:
    """Parsed calls ({"id", "name", "arguments"}) in OpenAI's shape."""
    return [
        ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
        for c in calls
    ]
