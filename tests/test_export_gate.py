"""The GGUF check is a gate: a converted file with another chat template or EOS is refused with one line, nothing
is published and an earlier export stays as it was; the Modelfile's SYSTEM is the recipe's system prompt.

llama.cpp's converter is replaced by one that writes a GGUF of chosen metadata (the real conversion is in
tests/test_export_gguf.py)."""

import shutil

import pytest
import yaml

from sft.common.inference import read_run
from sft.common.template import inference_chat_template
from sft.export import gguf as export_gguf

SYSTEM_PROMPT = "你是一个友好的聊天助手"


@pytest.fixture(scope="module")
def merged_run(tiny_model, tmp_path_factory):
    """The tiny model as a merged run's folder, whose recipe has a system prompt."""
    folder = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(tiny_model, folder)
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"system_prompt": SYSTEM_PROMPT}))
    return folder


def fake_converter(monkeypatch, run_folder, template_suffix: str = "", eos_shift: int = 0) -> None:
    """`convert` writes a GGUF carrying the run's vocabulary, chat template and special tokens, or altered ones."""
    from gguf import GGUFWriter

    tokenizer = read_run(str(run_folder)).load_tokenizer()

    def convert(model_dir, outfile, quantization, converter):
        writer = GGUFWriter(str(outfile), "llama")
        writer.add_token_list(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
        writer.add_bos_token_id(tokenizer.bos_token_id)
        writer.add_eos_token_id(tokenizer.eos_token_id + eos_shift)
        writer.add_chat_template(inference_chat_template(tokenizer.chat_template) + template_suffix)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    monkeypatch.setattr(export_gguf, "convert", convert)


def export(run_folder, output_dir, *flags: str):
    converter = str(export_gguf.CONVERTER if export_gguf.CONVERTER.is_file() else __file__)
    argv = ["--model_path", str(run_folder), "--output_dir", str(output_dir), "--converter", converter, *flags]
    return export_gguf.main(argv)


def contents(folder) -> dict:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_the_modelfile_system_is_the_recipes_system_prompt_unless_given(merged_run, tmp_path, monkeypatch):
    fake_converter(monkeypatch, merged_run)
    export(merged_run, tmp_path / "gguf")
    assert f'SYSTEM """{SYSTEM_PROMPT}"""' in (tmp_path / "gguf" / "Modelfile").read_text(encoding="utf-8")
    export(merged_run, tmp_path / "other", "--system_prompt", "简短回答")
    modelfile = (tmp_path / "other" / "Modelfile").read_text(encoding="utf-8")
    assert 'SYSTEM """简短回答"""' in modelfile and SYSTEM_PROMPT not in modelfile


@pytest.mark.parametrize(
    ("altered", "problem"),
    [
        ({"template_suffix": "{{ '!' }}"}, "its chat template is not the run's inference template"),
        ({"eos_shift": 1}, "its eos token is not '</s>'"),
    ],
)
def test_a_gguf_with_another_template_or_eos_is_refused_and_nothing_is_published(
    merged_run, tmp_path, monkeypatch, capsys, altered, problem
):
    fake_converter(monkeypatch, merged_run)
    export(merged_run, tmp_path / "gguf")
    earlier = contents(tmp_path / "gguf")
    capsys.readouterr()
    fake_converter(monkeypatch, merged_run, **altered)
    for output_dir, flags in ((tmp_path / "gguf", ["--overwrite", "true"]), (tmp_path / "new", [])):
        with pytest.raises(SystemExit) as exit_info:
            export(merged_run, output_dir, *flags)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert error == [f"error: the converted GGUF does not match the run: {problem}"]
    assert contents(tmp_path / "gguf") == earlier
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gguf"]  # no new folder, no staging left behind
