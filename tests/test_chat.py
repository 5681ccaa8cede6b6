"""`lccc-sft chat`: streamed replies, kept and trimmed history, /reset and /exit, driven through stdin and --message."""

import dataclasses
import io
import sys

import pytest
import transformers
from helpers import run_command

import sft.serving.chat
from sft.common.generation import GenerationArguments, generation_kwargs
from sft.serving.chat import ASSISTANT_PROMPT, ChatSession, MessageTooLong, interactive, main

pytestmark = pytest.mark.slow  # every test here needs a training run, a server or a browser


def session_for(trained_model, trained_tokenizer, max_context=1024, max_new_tokens=6, **kwargs):
    generation = generation_kwargs(
        trained_tokenizer, GenerationArguments(max_new_tokens=max_new_tokens, do_sample=False)
    )
    return ChatSession(trained_model, trained_tokenizer, max_context=max_context, generation=generation, **kwargs)


def turn(user, reply):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def test_chat_through_stdin_with_reset_and_exit(smoke_run):
    result = run_command(
        [sys.executable, "-m", "sft.chat", "--model_path", str(smoke_run), "--max_new_tokens", "6"],
        input="你好\n\n今天天气怎么样？\n/reset\n在吗\n/exit\n这句不会被读到\n",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    transcript = result.stdout
    assert transcript.count(ASSISTANT_PROMPT) == 3
    assert "user> 你好\n" in transcript and "user> /reset\n(history cleared)" in transcript
    assert "这句不会被读到" not in transcript


def test_message_mode_replies_once_per_message_and_keeps_history(smoke_run, capsys, monkeypatch):
    prompts = []
    real_prompt_ids = ChatSession.prompt_ids

    def recording_prompt_ids(session, user_text):
        ids = real_prompt_ids(session, user_text)
        prompts.append(session.tokenizer.decode(ids))
        return ids

    monkeypatch.setattr(ChatSession, "prompt_ids", recording_prompt_ids)
    replies = main(["--model_path", str(smoke_run), "--message", "你好", "--message", "在吗", "--max_new_tokens", "6"])
    assert len(replies) == 2 and len(prompts) == 2
    second = prompts[1]  # holds the first turn, user message and reply, before the second message
    assert second.count("[/INST]") == 2 and second.index("你好") < second.index("[/INST]") < second.index("在吗")
    first_reply = second[second.index("[/INST]") + len("[/INST]") : second.index("</s>")]
    assert first_reply.strip() == replies[0].strip()
    out = capsys.readouterr().out
    assert ASSISTANT_PROMPT not in out and "user>" not in out  # only the replies, for scripts
    assert all(reply in out for reply in replies)


def test_replies_stream_token_by_token(trained_model, trained_tokenizer, monkeypatch):
    pieces = []

    class RecordingStreamer(transformers.TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            pieces.append(text)

    monkeypatch.setattr(sft.serving.chat, "TextStreamer", RecordingStreamer)
    session = session_for(trained_model, trained_tokenizer, max_new_tokens=8)
    session.generation["min_new_tokens"] = 8
    reply = session.reply("你好")
    assert len([p for p in pieces if p]) > 1  # several pieces, not one block at the end
    assert "".join(pieces).strip() == reply
    assert session.history == turn("你好", reply)


def test_history_is_kept_in_the_prompt(trained_tokenizer):
    session = session_for(None, trained_tokenizer, system_prompt="你是一个友好的助手。")
    session.history = turn("第一句", "第一个回答") + turn("第二句", "第二个回答")
    prompt = trained_tokenizer.decode(session.prompt_ids("第三句"))
    assert prompt.index("友好的助手") < prompt.index("第一句") < prompt.index("第二个回答") < prompt.index("第三句")
    assert prompt.rstrip().endswith("[/INST]") and prompt.count("<s>") == 3


def test_history_is_trimmed_from_the_oldest_turn_when_the_context_fills(trained_tokenizer):
    turns = turn("第一句话比较长一些", "第一个回答") + turn("第二句", "第二个回答") + turn("第三句", "第三个回答")
    roomy = session_for(None, trained_tokenizer, max_new_tokens=6, max_context=10_000)
    roomy.history = turns[2:]
    two_turns = len(roomy.prompt_ids("新的问题"))
    session = session_for(None, trained_tokenizer, max_new_tokens=6, max_context=two_turns + 6)
    session.history = list(turns)
    ids = session.prompt_ids("新的问题")
    assert len(ids) + 6 <= session.max_context
    assert session.history == turns[2:] and session.dropped_turns == 1
    prompt = trained_tokenizer.decode(ids)
    assert "第一句" not in prompt and "第二句" in prompt and "新的问题" in prompt


def test_a_message_too_long_for_the_context_is_refused_and_history_kept(trained_tokenizer):
    session = session_for(None, trained_tokenizer, max_context=20, max_new_tokens=6)
    session.history = turn("你好", "好")
    with pytest.raises(MessageTooLong):
        session.prompt_ids("这是一句非常非常长的话，" * 5)
    assert session.history == turn("你好", "好")


def test_end_of_input_ends_the_chat(trained_model, trained_tokenizer, capsys):
    session = session_for(trained_model, trained_tokenizer)
    interactive(session, io.StringIO("你好\n"))
    assert len(session.history) == 2
    assert capsys.readouterr().out.count(ASSISTANT_PROMPT) == 1


def test_chat_flag_mistakes_are_one_line(smoke_run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model_path", str(smoke_run), "--max_new_tokens", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --max_new_tokens must be positive")
    with pytest.raises(SystemExit):
        main(["--model_path", str(smoke_run), "--temperatur", "1"])
    assert "unknown option `--temperatur` (did you mean `temperature`?)" in capsys.readouterr().err


def test_chat_starts_from_the_generation_settings_saved_with_the_run(smoke_run, tmp_path):
    import shutil

    from sft.common.generation import save_generation_config
    from sft.common.inference import read_run

    run = shutil.copytree(smoke_run, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-*"))
    saved = GenerationArguments(max_new_tokens=4, temperature=1.5, top_k=5, repetition_penalty=1.2)
    save_generation_config(run, saved, read_run(str(run)).load_tokenizer())
    from_file = main(["--model_path", str(run), "--message", "你好"])
    flags = ["--max_new_tokens", "4", "--temperature", "1.5", "--top_k", "5", "--repetition_penalty", "1.2"]
    assert from_file == main(["--model_path", str(smoke_run), "--message", "你好", *flags])
    from sft.common.inference import parse_generating_command
    from sft.serving.chat import ChatArguments

    *_, settings = parse_generating_command(ChatArguments, ["--model_path", str(run)], prog="chat")
    assert settings == dataclasses.replace(saved, seed=None)
    *_, settings = parse_generating_command(ChatArguments, ["--model_path", str(run), "--top_k", "9"], prog="chat")
    assert (settings.top_k, settings.max_new_tokens) == (9, 4)  # a flag wins over the file; the rest stays
