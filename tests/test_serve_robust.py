"""`lccc-sft serve` under what real clients and operators do: hang-ups, odd seeds and fields, big bodies, queues,
SIGTERM (issue 24). Run against a server on the smoke model (`tiny_server`), plus in-process checks of the app."""

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import running_server

from sft.serving.server import open_to_others

MESSAGE = "我终于学会了煎荷包蛋。"


def post(server, body, timeout=120, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}", **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=timeout, **kwargs)


def chat(server, messages=None, timeout=120, **settings) -> httpx.Response:
    messages = messages or [{"role": "user", "content": MESSAGE}]
    return post(server, {"model": server.tuned, "messages": messages, **settings}, timeout=timeout)


def reply_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def open_stream(server, body):
    headers = {"Authorization": f"Bearer {server.api_key}"}
    return httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, headers=headers, timeout=300
    )


def log_lines(server, pattern: str, count: int = 1, timeout: float = 300) -> list[re.Match]:
    """Wait (bounded) until the server's log holds `count` lines matching `pattern`; the matches."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in (re.search(pattern, line) for line in server.log.read_text().splitlines()) if m]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"no {count} log lines match {pattern!r}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_plain_request_whose_client_hung_up_stops_generating(tiny_server):
    # 397 tokens asked for, and no end-of-turn before them: only the hang-up can end it early.
    with pytest.raises(httpx.ReadTimeout):
        chat(tiny_server, max_tokens=397, min_tokens=397, timeout=0.5)
    (started,) = log_lines(tiny_server, r"(chatcmpl-\w+): tiny-llama, \d+ prompt tokens, at most 397 new")
    (ended,) = log_lines(tiny_server, rf"{started[1]}: (\d+) tokens(.*)$")
    assert int(ended[1]) < 397 and "cancelled by the client" in ended[2]
    assert chat(tiny_server, max_tokens=2).json()["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_any_int64_seed_and_minus_one_answer(tiny_server):
    for seed in (2**63 - 1, -(2**63), -1, 2**40):
        assert chat(tiny_server, max_tokens=3, seed=seed).status_code == 200
    same = [reply_of(chat(tiny_server, max_tokens=8, seed=2**62, temperature=1.0)) for _ in range(2)]
    assert same[0] == same[1]
    body = {"model": tiny_server.tuned, "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 3}
    with open_stream(tiny_server, {**body, "seed": 2**63 - 1}) as response:
        assert [line for line in response.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
    too_big = chat(tiny_server, max_tokens=3, seed=2**64)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "seed"


UNSUPPORTED = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "required",
    "functions": [{"name": "f"}],
    "response_format": {"type": "json_object"},
    "logprobs": True,
    "top_logprobs": 3,
    "logit_bias": {"5": 10},
    "n": 2,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_an_unsupported_field_is_a_400_naming_it(tiny_server, name):
    response = chat(tiny_server, max_tokens=2, **{name: UNSUPPORTED[name]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == name and name in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.slow
def test_fields_asking_for_nothing_unsupported_are_accepted(tiny_server):
    harmless = {"response_format": {"type": "text"}, "logprobs": False, "n": 1, "tools": [], "user": "x"}
    assert chat(tiny_server, max_tokens=2, **harmless).status_code == 200


@pytest.mark.slow
def test_cheap_sampling_fields_take_effect(tiny_server):
    long = {"max_tokens": 24, "min_tokens": 24}
    greedy = chat(tiny_server, temperature=0, **long).json()
    assert greedy["usage"]["completion_tokens"] == 24 and greedy["choices"][0]["finish_reason"] == "length"
    greedy = greedy["choices"][0]["message"]["content"]
    assert reply_of(chat(tiny_server, temperature=1e-7, **long)) == greedy  # below 1e-5: greedy, no 500
    assert reply_of(chat(tiny_server, temperature=1.5, top_k=1, seed=3, **long)) == greedy
    assert reply_of(chat(tiny_server, temperature=1.5, seed=3, **long)) != greedy
    # negative OpenAI penalties reward the reply's own tokens: the greedy reply, without repeats, changes
    for penalty in ({"presence_penalty": -2.0}, {"frequency_penalty": -2.0}, {"repetition_penalty": 3.0}):
        assert reply_of(chat(tiny_server, temperature=0, **penalty, **long)) != greedy, penalty
    short = chat(tiny_server, max_completion_tokens=3, min_tokens=3).json()
    assert short["usage"]["completion_tokens"] == 3


@pytest.mark.slow
def test_text_parts_developer_and_null_assistant_content(tiny_server):
    greedy = {"temperature": 0, "max_tokens": 8}
    plain = [{"role": "system", "content": "你好"}, {"role": "user", "content": "在吗\n早"}]
    expected = reply_of(chat(tiny_server, plain, **greedy))
    parts = [
        {"role": "developer", "content": [{"type": "text", "text": "你好"}]},
        {"role": "user", "content": [{"type": "text", "text": "在吗"}, {"type": "text", "text": "早"}]},
    ]
    assert reply_of(chat(tiny_server, parts, **greedy)) == expected
    api = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=tiny_server.api_key, max_retries=0, timeout=120)
    sdk = api.chat.completions.create(model=tiny_server.tuned, messages=parts, **greedy)
    assert sdk.choices[0].message.content == expected
    turns = [
        {"role": "user", "content": "早"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "在"},
    ]
    assert chat(tiny_server, turns, max_tokens=2).status_code == 200
    surrogate = {"model": tiny_server.tuned, "messages": [{"role": "user", "content": "a\ud800b"}], "max_tokens": 2}
    content = json.dumps(surrogate).encode()  # JSON's escape of a lone surrogate: valid JSON, not valid Unicode
    assert post(tiny_server, None, content=content, headers={"Content-Type": "application/json"}).status_code == 200
    refused = {
        "messages[0].content": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
        "messages[1].tool_calls": [turns[0], {"role": "assistant", "content": None, "tool_calls": [{}]}, turns[2]],
    }
    for param, messages in refused.items():
        response = chat(tiny_server, messages, max_tokens=2)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    with pytest.raises(openai.BadRequestError, match="tools"):
        api.chat.completions.create(
            model=tiny_server.tuned, messages=parts, tools=[{"type": "function", "function": {"name": "f"}}]
        )


@pytest.mark.slow
def test_a_huge_body_is_refused_before_it_is_read_and_others_are_answered(tiny_server):
    huge = json.dumps({"model": tiny_server.tuned, "messages": [{"role": "user", "content": "你" * 20_000_000}]})
    headers = {"Authorization": f"Bearer {tiny_server.api_key}", "Content-Type": "application/json"}
    url = f"{tiny_server.url}/v1/chat/completions"
    with ThreadPoolExecutor(2) as pool:
        big = pool.submit(post_refused, url, huge.encode(), headers)
        small = pool.submit(lambda: chat(tiny_server, max_tokens=2))
        assert small.result(timeout=300).status_code == 200
        assert big.result(timeout=300) == 413
    chunks = (huge[i : i + 1_000_000].encode() for i in range(0, len(huge), 1_000_000))  # no Content-Length
    assert post_refused(url, chunks, headers) == 413
    assert chat(tiny_server, max_tokens=2).status_code == 200


def post_refused(url, content, headers) -> int:
    """The status of a request the server may answer before reading all of its body."""
    try:
        response = httpx.post(url, content=content, headers=headers, timeout=120)
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        return -1  # the server closed the connection before the client finished sending
    assert response.json()["error"]["message"].startswith("the request body is larger")
    return response.status_code


@pytest.mark.slow
def test_a_queued_stream_sends_its_first_chunk_when_it_starts(tiny_server):
    body = {"model": tiny_server.tuned, "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 120}
    events = []

    def queued():
        with open_stream(tiny_server, {**body, "max_tokens": 2}) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            events.append(("queued: first chunk", json.loads(first[6:])))

    with open_stream(tiny_server, {**body, "min_tokens": 120}) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines)
        thread = threading.Thread(target=queued)
        thread.start()
        log_lines(tiny_server, r"at most 2 new")  # the second request has arrived and waits
        for line in lines:
            if '"finish_reason": "length"' in line:
                events.append(("running: last chunk", None))
    thread.join(timeout=300)
    assert [name for name, _ in events] == ["running: last chunk", "queued: first chunk"]
    assert events[1][1]["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.slow
def test_health_and_one_model(tiny_server):
    assert httpx.get(f"{tiny_server.url}/health", timeout=30).json() == {"status": "ok"}
    headers = {"Authorization": f"Bearer {tiny_server.api_key}"}
    card = httpx.get(f"{tiny_server.url}/v1/models/{tiny_server.tuned}", headers=headers, timeout=30).json()
    assert card["id"] == tiny_server.tuned and card["object"] == "model"
    api = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=tiny_server.api_key, max_retries=0)
    assert api.models.retrieve(tiny_server.tuned).id == tiny_server.tuned
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-17")


@pytest.mark.slow
def test_sigterm_finishes_the_running_reply_refuses_the_queue_and_exits(tiny_model, tmp_path):
    bound = 60
    with running_server(tiny_model, tmp_path / "serve.log", "--shutdown_timeout", str(bound)) as server:
        body = {"model": server.tuned, "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 60}
        with ThreadPoolExecutor(3) as pool, open_stream(server, {**body, "min_tokens": 60}) as running:
            lines = (line for line in running.iter_lines() if line.startswith("data: "))
            next(lines)
            queued = [pool.submit(post, server, {**body, "max_tokens": 5}) for _ in range(3)]
            log_lines(server, r"at most 5 new", count=3)
            server.process.send_signal(signal.SIGTERM)
            rest = [json.loads(line[6:]) for line in lines if line != "data: [DONE]"]
            for future in queued:
                response = future.result(timeout=bound)
                assert response.status_code == 503 and response.json()["error"]["code"] == "service_unavailable"
        assert rest[-1]["choices"][0]["finish_reason"] == "length"
        assert server.process.wait(timeout=bound + 30) in (0, -signal.SIGTERM)


def test_a_failure_mid_stream_ends_with_an_error_event_and_done():
    import fastapi.testclient
    from helpers import TINY_MODEL
    from transformers import AutoTokenizer

    from sft.common.generation import GenerationArguments
    from sft.serving.server import Service, build_app

    class FailingGenerator:
        async def stream(self, ids, decoding, **kwargs):
            yield ""
            yield "半句"
            raise RuntimeError("the device fell over")

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    service = Service(FailingGenerator(), tokenizer, "m", None, "root", 1024, 16, GenerationArguments())
    client = fastapi.testclient.TestClient(build_app(service))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert json.loads(events[1])["choices"][0]["delta"]["content"] == "半句"
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    with pytest.raises(openai.APIError, match="failed to finish"):
        list(api.chat.completions.create(model="m", messages=body["messages"], stream=True))


def test_open_to_others_warns_only_for_a_non_loopback_address_without_a_key():
    assert open_to_others("0.0.0.0", None) and open_to_others("192.168.1.5", None) and open_to_others("host", None)
    assert not open_to_others("127.0.0.1", None) and not open_to_others("::1", None)
    assert not open_to_others("localhost", None) and not open_to_others("0.0.0.0", "key")
