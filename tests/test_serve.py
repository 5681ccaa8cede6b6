"""`lccc-sft serve` as its users meet it: the official `openai` client, bad requests, many clients at once."""

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from helpers import run_command

pytestmark = pytest.mark.slow  # every test here needs a training run, a server or a browser

MESSAGE = "我终于学会了煎荷包蛋。"
STRANGER_KEY = "not-the-key"


def client(server, api_key=None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key or server.api_key, max_retries=0, timeout=120)


def post(server, body, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}", **kwargs.pop("headers", {})}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120, **kwargs)


def ask(server, model, **settings) -> dict:
    """One plain request; the response as JSON."""
    response = post(server, {"model": model, "messages": [{"role": "user", "content": MESSAGE}], **settings})
    assert response.status_code == 200, response.text
    return response.json()


def open_stream(server, body):
    """A streamed chat completion, to read with `with ... as response`."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    url = f"{server.url}/v1/chat/completions"
    return httpx.stream("POST", url, json={**body, "stream": True}, headers=headers, timeout=120)


def stream_events(server, body) -> list[str]:
    """The `data:` payloads of one streamed reply, read to the end."""
    with open_stream(server, body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def streamed_text(events: list[str]) -> str:
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_openai_client_plain_and_streaming_with_both_models(server):
    api = client(server)
    assert sorted(m.id for m in api.models.list()) == sorted([server.tuned, server.base])
    replies = {}
    for model in (server.tuned, server.base):
        plain = api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": MESSAGE}], max_tokens=12, seed=5
        )
        assert plain.model == model and plain.choices[0].message.role == "assistant"
        assert plain.choices[0].finish_reason in ("stop", "length")
        usage = plain.usage
        assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 12
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        stream = api.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": MESSAGE}],
            max_tokens=12,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content  # the same seed gives the same reply, streamed or not
        assert chunks[-1].usage.completion_tokens == usage.completion_tokens
        replies[model] = plain.choices[0].message.content
    # The base answers with the adapter off: greedy replies of the two models differ.
    greedy = {m: ask(server, m, temperature=0, max_tokens=12)["choices"][0]["message"]["content"] for m in replies}
    assert greedy[server.tuned] != greedy[server.base]


def test_stream_ends_with_done_and_stop_strings_cut_the_reply(server):
    body = {"model": server.base, "messages": [{"role": "user", "content": MESSAGE}], "temperature": 0}
    events = stream_events(server, {**body, "max_tokens": 16})
    assert events[-1] == "[DONE]"
    full = streamed_text(events)
    assert len(full) >= 4, full
    stop = full[len(full) // 2]
    cut = ask(server, server.base, temperature=0, max_tokens=16, stop=[stop])
    assert cut["choices"][0]["message"]["content"] == full[: full.index(stop)].rstrip()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert (
        streamed_text(stream_events(server, {**body, "max_tokens": 16, "stop": stop}))
        == full[: full.index(stop)].rstrip()
    )
    short = ask(server, server.base, temperature=0, max_tokens=2)
    assert short["usage"]["completion_tokens"] == 2 and short["choices"][0]["finish_reason"] == "length"


LONG = "你好" * 2000  # far beyond the tiny model's 1024-token context
BAD_REQUESTS = {
    "malformed JSON": (b'{"model": "x", "messages": [', 400, None),
    "missing messages": ({"model": "{tuned}"}, 400, "messages"),
    "empty messages": ({"model": "{tuned}", "messages": []}, 400, "messages"),
    "unknown role": ({"model": "{tuned}", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    "non-string content": (
        {"model": "{tuned}", "messages": [{"role": "user", "content": 42}]},
        400,
        "messages[0].content",
    ),
    "max_tokens zero": (
        {"model": "{tuned}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        400,
        "max_tokens",
    ),
    "max_tokens beyond the context": (
        {"model": "{tuned}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
        400,
        "max_tokens",
    ),
    "prompt longer than the context": (
        {"model": "{tuned}", "messages": [{"role": "user", "content": LONG}]},
        400,
        "messages",
    ),
    "unknown model": ({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    "last message not the user's": (
        {"model": "{tuned}", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        400,
        "messages",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, case):
    body, status, param = BAD_REQUESTS[case]
    headers = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    if isinstance(body, dict):
        body = json.dumps(body).replace("{tuned}", server.tuned).encode()
    response = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert MESSAGE not in error["message"] and LONG not in error["message"]
    assert ask(server, server.tuned, max_tokens=1)["usage"]["completion_tokens"] == 1


def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": f"Bearer {STRANGER_KEY}"}):
        response = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key=STRANGER_KEY).chat.completions.create(
            model=server.tuned, messages=[{"role": "user", "content": MESSAGE}]
        )


def cancel_mid_stream(server, model) -> str:
    """Start a long streamed reply, read its first event and hang up; the completion id."""
    body = {"model": model, "messages": [{"role": "user", "content": MESSAGE}], "max_tokens": 400, "seed": 11}
    with open_stream(server, body) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    return json.loads(first.removeprefix("data: "))["id"]


def test_concurrent_clients_are_all_answered_without_sharing_state(server):
    seeded = {"seed": 1234, "max_tokens": 10, "temperature": 1.0}
    alone = ask(server, server.tuned, **seeded)["choices"][0]["message"]["content"]
    body = {"model": server.tuned, "messages": [{"role": "user", "content": MESSAGE}], **seeded}
    jobs = [
        lambda: ask(server, server.tuned, **seeded)["choices"][0]["message"]["content"],
        lambda: ask(server, server.base, **seeded)["choices"][0]["message"]["content"],
        lambda: ask(server, server.tuned, max_tokens=8)["choices"][0]["message"]["content"],
        lambda: ask(server, server.base, max_tokens=8, temperature=0)["choices"][0]["message"]["content"],
        lambda: streamed_text(stream_events(server, body)),
        lambda: streamed_text(stream_events(server, {**body, "model": server.base})),
        lambda: streamed_text(stream_events(server, {**body, "seed": 7})),
        lambda: cancel_mid_stream(server, server.base),
        lambda: cancel_mid_stream(server, server.base),
        lambda: ask(server, server.tuned, **seeded)["choices"][0]["message"]["content"],
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = [future.result(timeout=600) for future in [pool.submit(job) for job in jobs]]
    assert results[0] == results[4] == results[9] == alone  # the same seed, whatever ran around it
    assert all(isinstance(r, str) for r in results)
    assert ask(server, server.tuned, max_tokens=3)["usage"]["completion_tokens"] >= 1  # queued after all of them
    log = server.log.read_text(encoding="utf-8")
    for cancelled in results[7:9]:  # hung up: their generation stopped long before 400 tokens
        ended = [line.split(f"{cancelled}: ")[1] for line in log.splitlines() if f"{cancelled}: " in line]
        assert "cancelled by the client" in ended[-1], ended
        assert ended[-1].startswith("cancelled") or int(ended[-1].split()[0]) < 400, ended


def test_log_holds_neither_the_api_key_nor_message_text(server):
    ask(server, server.tuned, max_tokens=3)
    log = server.log.read_text(encoding="utf-8")
    assert "chat/completions" in log and " prompt tokens" in log
    assert server.api_key not in log and MESSAGE not in log and "你好" not in log


def test_a_missing_run_is_one_line_error(tmp_path):
    result = run_command(["python", "-m", "sft.serve", "--model_path", str(tmp_path / "nothing")])
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: model path not found") and len(result.stderr.splitlines()) == 1
