"""POST /v1/chat/completions: the tokenizer's chat template turns messages (and tools) into a prompt."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from lora_serve.api.auth import principal_of
from lora_serve.api.errors import invalid_param
from lora_serve.api.exchange import Completion, Exchange
from lora_serve.api.generation import respond
from lora_serve.api.logprobs import chat_logprobs
from lora_serve.api.prepared_request import RequestFields
from lora_serve.api.protocol import ChatCompletionRequest, ChatMessage
from lora_serve.api.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    UsageInfo,
)
from lora_serve.api.state import ServerState, get_state
from lora_serve.api.tool_calls import ReplyStream, assistant_reply
from lora_serve.api.tool_prompt import builtin_rendering, renders_tools, tool_specs
from lora_serve.api.tools import FunctionDefinition, ToolMode
from lora_serve.engine.grammar import GrammarSpec
from lora_serve.engine.outputs import RequestOutput, TokenLogprob

router = APIRouter()


def chat_prompt_ids(
    tokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
    tools: Sequence[FunctionDefinition] = (),
) -> list[int]:
    """The prompt the model reads for `messages` and `tools`: the tokenizer's chat template (tools, tool calls
    and results as tool_prompt.py renders them), then its text encoded (by default without special tokens:
    the rendered template already holds BOS where the model wants it). Blocking. The generation routes use
    the defaults; /tokenize may ask for others (tokenize.py)."""
    template_messages = [m.for_template() for m in messages]
    extra = {}
    if not renders_tools(tokenizer):
        template_messages = builtin_rendering(template_messages, tools)
    elif tools:
        extra["tools"] = tool_specs(tools)
    try:
        text = tokenizer.apply_chat_template(
            template_messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **extra,
        )
    except (TemplateError, ValueError) as exc:  # e.g. templates that demand alternating user/assistant turns
        raise invalid_param("messages", f"the model's chat template rejected the messages: {exc}") from exc
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


class ChatExchange(Exchange[ChatCompletionResponse]):
    req: ChatCompletionRequest

    @cached_property
    def tool_mode(self) -> ToolMode:
        return self.req.tool_mode()

    @cached_property
    def reply_streams(self) -> dict[int, ReplyStream]:
        """Streamed with tools: what of each choice's reply may be sent yet (tool_calls.py), by choice index."""
        return {c.index: ReplyStream(self.tool_mode) for c in self.prep.choices}

    def grammar_spec(self) -> tuple[GrammarSpec, str] | None:
        """A forced tool_choice constrains the output to its calls (tools.py), so nothing else may constrain it."""
        free, forced = super().grammar_spec(), self.tool_mode.grammar_spec()
        if forced is None:
            return free
        if free is not None:
            raise invalid_param(free[1], f"tool_choice {self.tool_mode.kind} constrains the output, so {free[1]} cannot")
        return forced, "tools"

    def fields(self) -> RequestFields:
        max_tokens, max_tokens_param = self.req.max_tokens_param
        return RequestFields(
            id_prefix="chatcmpl",
            prompt_param="messages",
            max_tokens=max_tokens,
            max_tokens_param=max_tokens_param,
            logprobs=self.req.logprobs,
            top_logprobs=self.req.top_logprobs or 0,
        )

    def prompt_size(self) -> tuple[int, int]:
        return sum(m.num_chars for m in self.req.messages), len(self.req.messages)

    def prompts_token_ids(self) -> list[list[int]]:
        tools = self.tool_mode.tools if self.tool_mode.kind != "none" else ()
        return [chat_prompt_ids(self.state.engine.tokenizer, self.req.messages, tools=tools)]

    def _logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.req.logprobs:
            return None
        return chat_logprobs(self.state.token_text, logprobs, self.req.top_logprobs or 0)

    def choice(self, index: int, done: Completion) -> ChatChoice:
        message, finish_reason = assistant_reply(done.text, done.finish_reason, self.tool_mode)
        return ChatChoice(index=index, message=message, logprobs=self._logprobs(done.logprobs), finish_reason=finish_reason)

    def response(self, dones: list[Completion]) -> ChatCompletionResponse:
        response = super().response(dones)
        response.prompt_logprobs = self.prompt_logprobs(0, dones[0].prompt_logprobs)  # every choice shares the prompt
        return response

    def make_response(self, choices: list[ChatChoice], usage: UsageInfo) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=self.prep.request_id, model=self.prep.model, choices=choices, usage=usage)

    def make_chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.prep.request_id, model=self.prep.model, choices=choices, usage=usage)

    def first_chunks(self) -> list[ChatCompletionChunk]:
        """Each choice's role, in a chunk of its own."""
        role = ChatDelta(role="assistant", content="")
        return [self.make_chunk([ChatChunkChoice(index=c.index, delta=role)]) for c in self.prep.choices]

    def delta_chunk(self, index: int, out: RequestOutput) -> ChatCompletionChunk | None:
        if self.tool_mode.kind == "none":
            delta, finish_reason, token_logprobs = ChatDelta(content=out.new_text), out.finish_reason, out.new_logprobs
        elif (sent := self.reply_streams[index].push(out)) is not None:
            delta, finish_reason, token_logprobs = sent
        else:
            return None
        logprobs = self._logprobs(token_logprobs)
        return self.make_chunk([ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)])


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(
    req: ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> ChatCompletionResponse | StreamingResponse:
    return await respond(request, await ChatExchange.open(state, req, principal_of(request)))
