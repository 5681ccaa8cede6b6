"""Generation settings reaching `generate`, and the server's request parameters, on the tiny model in-process:
top_k (0 included) in eval, chat and serve; a request's top_p, max_tokens, max_completion_tokens and stop strings;
the default reply budget inside the context window; the recipe's system prompt; the two model ids."""

import asyncio
import dataclasses
import json
import shutil
from types import SimpleNamespace

import httpx
import pytest
import torch
import transformers
import yaml
from helpers import TINY_MODEL
from transformers import TopKLogitsWarper, TopPLogitsWarper

from sft.common.errors import UserError
from sft.common.generation import (
    GenerationArguments,
    chosen_settings,
    generation_kwargs,
    load_generation_defaults,
    save_generation_config,
)
from sft.common.inference import TrainedModelArguments
from sft.evaluation.batch_generation import generate_replies
from sft.serving import chat
from sft.serving.api import ApiError, ChatCompletionRequest
from sft.serving.generator import Decoding, Generator, OpenAIPenalties, split_at_stop
from sft.serving.server import ServeArguments, Service, build_app, load_service

SYSTEM_PROMPT = "你是一个友好的聊天助手"
HELLO = [{"role": "user", "content": "你好，今天天气怎么样"}]


@pytest.fixture(scope="module")
def model_folder(tiny_model, tmp_path_factory):
    """The tiny model as a merged run's folder, whose recipe has a system prompt."""
    folder = tmp_path_factory.mktemp("run") / "tiny-run"
    shutil.copytree(tiny_model, folder)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"system_prompt": SYSTEM_PROMPT, "seed": 7}))
    return folder


@pytest.fixture(scope="module")
def service(model_folder) -> Service:
    """The service `lccc-sft serve` builds for that folder, with the default settings."""
    return load_service(TrainedModelArguments(model_path=str(model_folder)), ServeArguments(), GenerationArguments())


@pytest.fixture
def generate_calls(monkeypatch) -> list[dict]:
    """The keyword arguments of every `generate` call, which still runs."""
    calls, original = [], transformers.GenerationMixin.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.GenerationMixin, "generate", spy)
    return calls


@pytest.fixture
def served_warpers(monkeypatch) -> list[list]:
    """The logits processors the server builds for each request's row (it samples each row itself)."""
    calls, original = [], Decoding.processors

    def spy(self, *args, **kwargs):
        chosen = original(self, *args, **kwargs)
        calls.append(chosen)
        return chosen

    monkeypatch.setattr(Decoding, "processors", spy)
    return calls


def post(service: Service, **body) -> dict | list[dict]:
    """One chat completion from the app in-process: the JSON answer, or a stream's chunks."""

    async def send():
        transport = httpx.ASGITransport(app=build_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            response = await client.post("/v1/chat/completions", json={"messages": HELLO, **body})
        assert response.status_code == 200, response.text
        if not body.get("stream"):
            return response.json()
        events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return [json.loads(event) for event in events[:-1]]

    return asyncio.run(send())


def streamed_text(chunks: list[dict]) -> str:
    return "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"])


# --- top_k in eval, chat and serve ------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [0, 7])
def test_top_k_reaches_generate_when_serving(service, generate_calls, served_warpers, top_k):
    """0 too: no top-k at all, where transformers' own sampling would apply its default of 50. The server draws
    each row's token itself (generate samples nothing), so the row's own processors are what count."""
    served = dataclasses.replace(service, defaults=GenerationArguments(top_k=top_k))
    post(served, model=service.tuned_id, max_tokens=2, temperature=0.5)
    assert generate_calls[-1]["do_sample"] is False
    top_ks = [w.top_k for w in served_warpers[-1] if isinstance(w, TopKLogitsWarper)]
    assert top_ks == ([top_k] if top_k else [])


@pytest.mark.parametrize("top_k", [0, 7])
def test_top_k_reaches_generate_in_chat(model_folder, generate_calls, top_k):
    chat.main(["--model_path", str(model_folder), "--message", "你好", "--max_new_tokens", "2", "--top_k", str(top_k)])
    assert generate_calls[-1]["top_k"] == top_k and generate_calls[-1]["do_sample"] is True


@pytest.mark.parametrize("top_k", [0, 7])
def test_top_k_reaches_generate_in_eval(service, generate_calls, top_k):
    model, tokenizer = service.generator.model, service.tokenizer
    generate_replies(model, tokenizer, [HELLO], GenerationArguments(max_new_tokens=2, top_k=top_k, seed=1), 1, True)
    assert generate_calls[-1]["top_k"] == top_k and generate_calls[-1]["do_sample"] is True


# --- a request's parameters ----------------------------------------------------------------------------------------


def test_a_requests_top_p_reaches_generate(service, served_warpers):
    post(service, model=service.tuned_id, max_tokens=2, top_p=0.3)
    assert [w.top_p for w in served_warpers[-1] if isinstance(w, TopPLogitsWarper)] == [0.3]


def test_max_completion_tokens_limits_the_reply(service, generate_calls):
    answer = post(service, model=service.tuned_id, max_completion_tokens=3, temperature=0)
    assert generate_calls[-1]["max_new_tokens"] == 3
    assert answer["usage"]["completion_tokens"] == 3 and answer["choices"][0]["finish_reason"] == "length"


def test_a_streamed_reply_cut_by_max_tokens_ends_with_finish_reason_length(service):
    chunks = post(service, model=service.tuned_id, max_tokens=3, temperature=0, stream=True)
    reasons = [chunk["choices"][0]["finish_reason"] for chunk in chunks if chunk["choices"]]
    assert reasons[-1] == "length" and not any(reasons[:-1])


def test_the_default_reply_budget_stays_inside_the_context_window(service, generate_calls):
    """A prompt that leaves 5 tokens of room, no max_tokens: 5 tokens (not the default 128), cut for length."""
    prompt_tokens = len(service.prompt_ids(HELLO))
    small = dataclasses.replace(service, context_window=prompt_tokens + 5)
    answer = post(small, model=service.tuned_id, temperature=0)
    assert generate_calls[-1]["max_new_tokens"] == 5
    assert answer["usage"]["prompt_tokens"] == prompt_tokens and answer["usage"]["completion_tokens"] == 5
    assert answer["choices"][0]["finish_reason"] == "length"


# --- stop strings ------------------------------------------------------------------------------------------------


def test_no_prefix_of_a_long_stop_string_is_ever_sent():
    stop = "<|end|>"
    for k in range(1, len(stop)):
        assert split_at_stop("你好" + stop[:k], [stop]) == ("你好", False), stop[:k]
    assert split_at_stop("你好" + stop + "吗", [stop]) == ("你好", True)
    assert split_at_stop("你好<x", [stop]) == ("你好<x", False)  # `<x` can no longer become the stop string


def test_with_several_stop_strings_the_reply_ends_at_the_first_that_occurs():
    assert split_at_stop("甲乙丙丁戊", ["丁戊", "乙"]) == ("甲", True)
    assert split_at_stop("甲乙丙丁戊", ["乙", "丁戊"]) == ("甲", True)


def test_a_served_reply_ends_before_its_stop_strings_and_the_stream_never_holds_them(service):
    reply = post(service, model=service.tuned_id, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
    compact = reply.replace(" ", "")
    assert len(compact) > 12, reply
    stop, later = compact[6:8], compact[10:12]  # two characters each, from the greedy reply itself
    expected = reply[: reply.index(stop)].rstrip()
    for stops in ([stop], [later, stop]):
        answer = post(service, model=service.tuned_id, max_tokens=24, temperature=0, stop=stops)
        assert answer["choices"][0] | {"logprobs": None} == {
            "index": 0,
            "message": {"role": "assistant", "content": expected},
            "finish_reason": "stop",
            "logprobs": None,
        }
        chunks = post(service, model=service.tuned_id, max_tokens=24, temperature=0, stop=stops, stream=True)
        assert streamed_text(chunks) == expected


# --- the recipe's system prompt and the two model ids --------------------------------------------------------------


def test_the_recipes_system_prompt_is_the_servers_default(service):
    assert service.system_prompt == SYSTEM_PROMPT
    assert SYSTEM_PROMPT in service.tokenizer.decode(service.prompt_ids(HELLO))
    own = [{"role": "system", "content": "简短回答"}, *HELLO]
    assert SYSTEM_PROMPT not in service.tokenizer.decode(service.prompt_ids(own))


@pytest.fixture(scope="module")
def adapted_service(service):
    """The tiny model with a LoRA adapter that changes what it generates, served as `tuned` and `tuned-base`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(TINY_MODEL), config).eval()
    generator = Generator(model, service.tokenizer)
    return dataclasses.replace(service, generator=generator, tuned_id="tuned", base_id="tuned-base")


def test_the_fine_tuned_and_base_ids_are_told_apart_by_what_each_model_generates(adapted_service):
    model, tokenizer = adapted_service.generator.model, adapted_service.tokenizer
    ids = torch.tensor([adapted_service.prompt_ids(HELLO)])

    def reply(output) -> str:
        return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()

    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        tuned = reply(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings))
        with model.disable_adapter():
            base = reply(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings))
    assert tuned != base
    served = {
        name: post(adapted_service, model=name, max_tokens=8, temperature=0)["choices"][0]["message"]["content"]
        for name in ("tuned", "tuned-base")
    }
    assert served == {"tuned": tuned, "tuned-base": base}


# --- the settings themselves: checks, the decoding switch, saved with a run and read back -------------------------

TOKENS = SimpleNamespace(eos_token_id=2, pad_token_id=0, bos_token_id=1)


def test_generate_arguments_follow_the_decoding_asked_for():
    settings = GenerationArguments(max_new_tokens=9, temperature=0.5, top_p=0.8, top_k=0, repetition_penalty=1.1)
    fixed = {"max_new_tokens": 9, "eos_token_id": 2, "pad_token_id": 0, "num_beams": 1, "repetition_penalty": 1.1}
    sampled = {**fixed, "no_repeat_ngram_size": 0, "do_sample": True, "top_p": 0.8, "temperature": 0.5, "top_k": 0}
    assert generation_kwargs(TOKENS, settings) == sampled
    greedy = {**fixed, "no_repeat_ngram_size": 0, "do_sample": False}
    assert generation_kwargs(TOKENS, settings, sample=False) == greedy
    assert generation_kwargs(TOKENS, dataclasses.replace(settings, do_sample=False)) == greedy
    assert generation_kwargs(TOKENS, dataclasses.replace(settings, do_sample=False), sample=True) == sampled


def test_settings_saved_with_a_run_read_back_the_same_and_flags_go_on_top(tmp_path):
    settings = GenerationArguments(
        max_new_tokens=33, do_sample=False, temperature=0.5, top_p=0.8, top_k=0, repetition_penalty=1.2,
        no_repeat_ngram_size=3,
    )  # fmt: skip
    save_generation_config(tmp_path, settings, TOKENS)
    saved = json.loads((tmp_path / "generation_config.json").read_text(encoding="utf-8"))
    # vLLM and TGI stop at the end-of-turn token the file names
    assert (saved["eos_token_id"], saved["pad_token_id"], saved["bos_token_id"]) == (2, 0, 1)
    assert load_generation_defaults(tmp_path) == settings
    assert load_generation_defaults(tmp_path, {"top_k": 5}) == dataclasses.replace(settings, top_k=5)
    assert chosen_settings(settings, ["top_k", "port", "seed"]) == {"top_k": 0, "seed": None}
    assert load_generation_defaults(tmp_path / "elsewhere") == GenerationArguments()
    (tmp_path / "checkpoint-4").mkdir()  # a checkpoint is evaluated and served with its run's settings
    assert load_generation_defaults(tmp_path / "checkpoint-4") == settings
    (tmp_path / "checkpoint-4" / "generation_config.json").write_text(json.dumps({"top_k": 7}))
    assert load_generation_defaults(tmp_path / "checkpoint-4").top_k == 7  # unless it has its own
    (tmp_path / "best").mkdir()
    assert load_generation_defaults(tmp_path / "best") == GenerationArguments()  # only a checkpoint looks up
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(UserError, match="is not a readable generation config"):
        load_generation_defaults(tmp_path)


@pytest.mark.parametrize(
    "values",
    [{"max_new_tokens": 1}, {"top_p": 1.0}, {"top_k": 0}, {"no_repeat_ngram_size": 0}, {"repetition_penalty": 0.01}],
)
def test_the_smallest_and_largest_allowed_settings_are_accepted(values):
    assert GenerationArguments(**values)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_new_tokens": 0}, "--max_new_tokens must be positive"),
        ({"top_p": 0.0}, r"--top_p must be in \(0, 1\]"),
        ({"top_p": 1.01}, r"--top_p must be in \(0, 1\]"),
        ({"temperature": 0.0}, "--temperature must be positive"),
        ({"top_k": -1}, "--top_k and --no_repeat_ngram_size must be 0"),
        ({"no_repeat_ngram_size": -1}, "--top_k and --no_repeat_ngram_size must be 0"),
        ({"repetition_penalty": 0.0}, "--repetition_penalty must be positive"),
    ],
)
def test_settings_out_of_range_are_one_clear_error(values, message):
    with pytest.raises(UserError, match=message):
        GenerationArguments(**values)


def test_frequency_and_presence_penalties_count_only_the_replys_tokens():
    prompt_and_reply = torch.tensor([[4, 4, 1, 1, 1, 2], [1, 3, 3, 0, 0, 0]])  # a 2-token prompt, then the reply
    penalised = OpenAIPenalties(prompt_length=2, frequency=0.5, presence=2.0)(prompt_and_reply, torch.zeros(2, 5))
    # token 1 three times in the first reply: 3 x 0.5 + 2; token 2 once: 0.5 + 2; token 4 only in the prompt: 0
    assert penalised.tolist() == [[0.0, -3.5, -2.5, 0.0, 0.0], [-3.5, 0.0, 0.0, -2.5, 0.0]]


def decoded_scores(decoding: Decoding, ids: list[int], scores: list[float], prompt_length: int = 2) -> list[float]:
    """The next-token scores after this request's processors, for one row."""
    input_ids, row = torch.tensor([ids]), torch.tensor([scores])
    for processor in decoding.processors(prompt_length, eos_token_id=0, device="cpu"):
        row = processor(input_ids, row)
    return row[0].tolist()


INF = float("-inf")


@pytest.mark.parametrize(
    "settings, ids, expected",
    [
        ({"min_tokens": 2}, [5, 6, 1], [INF, 1.0, 2.0, 3.0]),  # one reply token so far: the end is held off
        ({"min_tokens": 2}, [5, 6, 1, 2], [0.0, 1.0, 2.0, 3.0]),  # two: the reply may end
        ({"repetition_penalty": 2.0}, [5, 6, 3], [0.0, 1.0, 2.0, 1.5]),  # transformers' penalty on seen tokens
        ({"frequency_penalty": 0.5}, [5, 6, 3, 3], [0.0, 1.0, 2.0, 2.0]),  # either OpenAI penalty alone applies
        ({"presence_penalty": 0.5}, [5, 6, 3, 3], [0.0, 1.0, 2.0, 2.5]),
        ({"no_repeat_ngram_size": 2}, [5, 6, 3, 1, 3], [0.0, INF, 2.0, 3.0]),  # "3 1" again is banned
        ({"top_k": 1}, [5, 6], [INF, INF, INF, 3.0]),
        ({"min_p": 0.3}, [5, 6], [INF, INF, 2.0, 3.0]),  # below 0.3 x the top token's probability
        ({"top_k": 1, "greedy": True}, [5, 6], [0.0, 1.0, 2.0, 3.0]),  # greedy decoding takes no sampling warper
    ],
)
def test_each_decoding_setting_changes_the_next_token_scores_as_asked(settings, ids, expected):
    assert decoded_scores(Decoding(max_new_tokens=8, **settings), ids, [0.0, 1.0, 2.0, 3.0]) == expected


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="smoke", messages=[{"role": "user", "content": "你好"}], **fields)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_a_request_asking_for_what_the_server_does_not_do_is_a_400_naming_the_field(fields, param):
    with pytest.raises(ApiError) as refused:
        request(**fields).check_supported()
        request(**fields).stop_strings()
    assert (refused.value.status, refused.value.param) == (400, param) and refused.value.message.startswith(param)


def test_fields_at_their_harmless_values_and_stop_strings_as_openai_takes_them_are_accepted():
    harmless = request(tools=[], logprobs=False, response_format={"type": "text"}, n=1, user="x", tool_choice=None)
    harmless.check_supported()
    assert request(stop="。").stop_strings() == ["。"]  # one string is one stop, not one per character
    assert request(stop=["a", "", "b", "c"]).stop_strings() == ["a", "b", "c"]  # four are allowed; empty ones dropped
    assert request().stop_strings() == []


SAMPLING_SERVER = GenerationArguments(
    max_new_tokens=64, do_sample=True, temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.1,
    no_repeat_ngram_size=3, seed=5,
)  # fmt: skip
GREEDY_SERVER = dataclasses.replace(SAMPLING_SERVER, do_sample=False)
ASKED = {
    "temperature": 0.5, "top_p": 0.5, "top_k": 3, "seed": 7, "repetition_penalty": 1.3, "frequency_penalty": 0.4,
    "presence_penalty": 0.2, "min_p": 0.1, "min_tokens": 8, "stop": "。",
}  # fmt: skip
ASKED_DECODING = {
    "greedy": False, "temperature": 0.5, "top_p": 0.5, "top_k": 3, "seed": 7, "repetition_penalty": 1.3,
    "frequency_penalty": 0.4, "presence_penalty": 0.2, "min_p": 0.1, "min_tokens": 8, "stop": ["。"],
}  # fmt: skip
SERVER_DECODING = {
    "greedy": False, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 5, "repetition_penalty": 1.1,
    "frequency_penalty": 0.0, "presence_penalty": 0.0, "min_p": 0.0, "min_tokens": 0, "stop": [],
}  # fmt: skip


@pytest.mark.parametrize(
    "defaults, fields, expected",
    [
        (SAMPLING_SERVER, {}, SERVER_DECODING),  # the server's settings where the request gives none
        (SAMPLING_SERVER, ASKED, ASKED_DECODING),  # the request's where it gives them
        (GREEDY_SERVER, ASKED, ASKED_DECODING),  # a temperature asked for samples on a greedy server
        (GREEDY_SERVER, {}, {**SERVER_DECODING, "greedy": True}),
        (SAMPLING_SERVER, {"temperature": 0}, {"greedy": True}),  # temperature 0 is greedy, as in OpenAI's API
        (SAMPLING_SERVER, {"top_k": -1, "seed": -1}, {"top_k": 0, "seed": None}),  # vLLM's "no top-k", a random seed
        (SAMPLING_SERVER, {"min_tokens": 16}, {"min_tokens": 16}),  # as many as the reply may have
    ],
)
def test_a_requests_settings_win_and_the_servers_fill_the_rest(service, defaults, fields, expected):
    served = dataclasses.replace(service, defaults=defaults)
    decoding = served.decoding(request(**fields), max_new_tokens=16)
    assert decoding.max_new_tokens == 16 and decoding.no_repeat_ngram_size == 3
    assert {key: getattr(decoding, key) for key in expected} == expected


def test_more_min_tokens_than_the_reply_may_have_is_a_400(service):
    with pytest.raises(ApiError) as refused:
        service.decoding(request(min_tokens=17), max_new_tokens=16)
    assert (refused.value.status, refused.value.param) == (400, "min_tokens") and "16" in refused.value.message


def test_the_reply_budget_is_the_asked_or_default_limit_within_the_context_window(service):
    served = dataclasses.replace(service, defaults=SAMPLING_SERVER, context_window=100)
    assert served.reply_budget(prompt_tokens=10, max_tokens=None) == 64  # the server's default
    assert served.reply_budget(prompt_tokens=50, max_tokens=None) == 50  # what the window leaves
    assert served.reply_budget(prompt_tokens=10, max_tokens=90) == 90  # asked for, exactly filling the window
    assert served.reply_budget(prompt_tokens=99, max_tokens=1) == 1
    cases = ((10, 91, "max_tokens"), (99, 2, "max_tokens"), (100, None, "messages"), (120, 5, "messages"))
    for prompt_tokens, max_tokens, param in cases:
        with pytest.raises(ApiError) as refused:
            served.reply_budget(prompt_tokens, max_tokens)
        assert (refused.value.status, refused.value.param, refused.value.code) == (
            400, param, "context_length_exceeded"
        )  # fmt: skip
        assert f"{prompt_tokens}" in refused.value.message and "100 tokens" in refused.value.message


def test_a_conversation_too_long_however_it_tokenizes_is_refused_before_tokenizing(service):
    served = dataclasses.replace(service, context_window=10)
    longest = served.longest_token * 10
    served.check_length([{"role": "user", "content": "字" * longest}])  # could still fit
    with pytest.raises(ApiError) as refused:
        served.check_length([{"role": "system", "content": "字"}, {"role": "user", "content": "字" * longest}])
    assert (refused.value.status, refused.value.param, refused.value.code) == (
        400, "messages", "context_length_exceeded"
    )  # fmt: skip
    assert f"{longest + 1} characters" in refused.value.message
