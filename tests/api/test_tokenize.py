"""vLLM's POST /tokenize and POST /detokenize: exactly the prompts the generation routes build, and back."""

from __future__ import annotations

import httpx
import pytest

from tests.api.adapter_helpers import chat_prompt_ids
from tests.api.conftest import TINY_MAX_MODEL_LEN
from tests.api.live_server import LiveServer

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def _post(server: LiveServer, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + route, json=body, timeout=30)


def test_a_prompt_is_tokenized_as_completions_reads_it(server: LiveServer) -> None:
    body = _post(server, "/tokenize", {"model": "tiny", "prompt": PROMPT}).json()
    usage = server.client().completions.create(model="tiny", prompt=PROMPT, max_tokens=1).usage
    assert body == {
        "count": usage.prompt_tokens,
        "max_model_len": TINY_MAX_MODEL_LEN,
        "tokens": server.engine.tokenizer.encode(PROMPT),
        "token_strs": None,
    }


def test_messages_are_tokenized_as_chat_reads_them(server: LiveServer) -> None:
    tokenizer = server.engine.tokenizer
    body = _post(server, "/tokenize", {"messages": MESSAGES}).json()
    usage = server.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1).usage
    assert body["tokens"] == chat_prompt_ids(tokenizer, MESSAGES) and body["count"] == usage.prompt_tokens
    bare = _post(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()["tokens"]
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=False, tokenize=False)
    assert bare == tokenizer.encode(text, add_special_tokens=False) and len(bare) < body["count"]


def test_continue_final_message_leaves_the_reply_open(server: LiveServer) -> None:
    started = [*MESSAGES, {"role": "assistant", "content": "General Kenobi"}]
    tokens = _post(server, "/tokenize", {"messages": started, "continue_final_message": True}).json()["tokens"]
    assert server.engine.tokenizer.decode(tokens).endswith("General Kenobi")


def test_token_strs_and_detokenize_round_trip(server: LiveServer) -> None:
    body = _post(server, "/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()
    assert body["token_strs"] == server.engine.tokenizer.convert_ids_to_tokens(body["tokens"])
    assert _post(server, "/detokenize", {"model": "tiny", "tokens": body["tokens"]}).json() == {"prompt": PROMPT}
    chat = _post(server, "/tokenize", {"messages": MESSAGES}).json()["tokens"]
    assert "<|im_start|>" in _post(server, "/detokenize", {"tokens": chat}).json()["prompt"]  # special tokens kept, as in vLLM


@pytest.mark.parametrize(
    ("route", "body", "status", "param"),
    [
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [49152]}, 400, "tokens"),
        ("/detokenize", {"tokens": [10**12]}, 400, "tokens"),
        ("/tokenize", {}, 400, "prompt"),
        ("/tokenize", {"prompt": PROMPT, "messages": MESSAGES}, 400, "prompt"),
        ("/tokenize", {"prompt": PROMPT, "add_generation_prompt": False}, 400, "add_generation_prompt"),
        ("/tokenize", {"prompt": PROMPT, "continue_final_message": True}, 400, "continue_final_message"),
        ("/tokenize", {"messages": MESSAGES, "continue_final_message": True, "add_generation_prompt": True}, 400, "continue_final_message"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"prompt": "word " * (40 * TINY_MAX_MODEL_LEN)}, 400, "prompt"),
        ("/tokenize", {"prompt": PROMPT, "chat_template": "x"}, 400, "chat_template"),
        ("/tokenize", {"model": "nope", "prompt": PROMPT}, 404, "model"),
        ("/detokenize", {"model": "tiny:nope", "tokens": [1]}, 404, "model"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_requests(server: LiveServer, route: str, body: dict, status: int, param: str) -> None:
    resp = _post(server, route, body)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param
