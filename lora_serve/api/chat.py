"""POST /v1/chat/completions: the tokenizer's chat template turns messages into a prompt."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from lora_serve.api.auth import principal_of
from lora_serve.api.errors import invalid_param
from lora_serve.api.exchange import Completion, Exchange, RequestFields
from lora_serve.api.generation import respond
from lora_serve.api.logprobs import chat_logprobs
from lora_serve.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    UsageInfo,
)
from lora_serve.api.state import ServerState, get_state
from lora_serve.engine.outputs import RequestOutput, TokenLogprob

router = APIRouter()


def chat_prompt_ids(
    tokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
) -> list[int]:
    """The prompt the model reads for `messages`: the tokenizer's chat template, then its text encoded
    (by default without special tokens: the rendered template already holds BOS where the model wants it).
    Blocking. The generation routes use the defaults; /tokenize may ask for others (tokenize.py)."""
    try:
        text = tokenizer.apply_chat_template(
            [m.for_template() for m in messages],
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
        )
    except (TemplateError, ValueError) as exc:  # e.g. templates that demand alternating user/assistant turns
        raise invalid_param("messages", f"the model's chat template rejected the messages: {exc}") from exc
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


class ChatExchange(Exchange[ChatCompletionResponse]):
    req: ChatCompletionRequest

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

    def prompt_token_ids(self) -> list[int]:
        return chat_prompt_ids(self.state.engine.tokenizer, self.req.messages)

    def _logprobs(self, logprobs: list[TokenLogprob]) -> ChatLogprobs | None:
        if not self.req.logprobs:
            return None
        return chat_logprobs(self.state.token_text, logprobs, self.req.top_logprobs or 0)

    def response(self, done: Completion) -> ChatCompletionResponse:
        message = AssistantMessage(content=done.text)
        choice = ChatChoice(message=message, logprobs=self._logprobs(done.logprobs), finish_reason=done.finish_reason)
        usage = UsageInfo.of(done.num_prompt_tokens, done.num_output_tokens, done.num_cached_tokens)
        return ChatCompletionResponse(id=self.prep.request_id, model=self.prep.model, choices=[choice], usage=usage)

    def make_chunk(self, choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.prep.request_id, model=self.prep.model, choices=choices, usage=usage)

    def first_chunks(self) -> list[ChatCompletionChunk]:
        return [self.make_chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def delta_chunk(self, out: RequestOutput) -> ChatCompletionChunk:
        delta = ChatDelta(content=out.new_text)
        logprobs = self._logprobs(out.new_logprobs)
        return self.make_chunk([ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=out.finish_reason)])


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(
    req: ChatCompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> ChatCompletionResponse | StreamingResponse:
    return await respond(request, await ChatExchange.open(state, req, principal_of(request)))
