"""Model sources: local directories, GGUF files, built-in names, and clear refusals."""

import pytest
from transformers import GPT2Config, MistralConfig

from ecomla.sources import UnsupportedModelError, builtin_gguf, check_supported, resolve_source


def test_builtin_resolves_to_packaged_gguf():
    path, gguf = resolve_source("smollm2-135m")
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and (builtin_gguf("smollm2-135m")).is_file()
    assert str(builtin_gguf("smollm2-135m").parent) == path


def test_local_dir_gguf_and_hub_id(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)) == (str(tmp_path), None)
    (tmp_path / "m.gguf").symlink_to(builtin_gguf("smollm2-135m"))
    assert resolve_source(str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")  # read before any model is built from it
    with pytest.raises(ValueError, match="empty.gguf cannot be read .*damaged or not a GGUF file"):
        resolve_source(str(tmp_path / "empty.gguf"))
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)


@pytest.mark.parametrize("source, message", [
    ("./no/such/dir", "not found"),
    ("/no/such/model.gguf", "GGUF file not found"),
    ("a/b/c", "not found"),
])
def test_missing_paths_are_clear(source, message):
    with pytest.raises(FileNotFoundError, match=message):
        resolve_source(source)


def test_dir_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_unsupported_architectures_are_named():
    cfg = GPT2Config()
    cfg.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(UnsupportedModelError, match="'GPT2LMHeadModel'.*not supported yet"):
        check_supported(cfg)
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        check_supported(MistralConfig(sliding_window=4096))
    check_supported(MistralConfig(sliding_window=None))  # Mistral v0.2+ converts


def test_a_bare_name_close_to_a_local_folder_is_a_typo_not_a_hub_id(tmp_path, monkeypatch):
    """`llamaa` beside `llama/` is said at once (no hub retries), naming the folder; ecomla's own hidden files are
    never listed; a bare name like nothing here stays a hub id."""
    (tmp_path / "llama").mkdir()
    (tmp_path / ".llama2.ecomla-lock").write_text("")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'llamaa' not found: .*\(did you mean llama\?\)"):
        resolve_source("llamaa")
    with pytest.raises(FileNotFoundError, match=r"holds llama\)") as err:
        resolve_source("./other")
    assert "ecomla-lock" not in str(err.value)
    assert resolve_source("gpt2") == ("gpt2", None)


def test_a_damaged_tokenizer_is_named_and_no_tokenizer_is_none(tmp_path):
    """A truncated tokenizer.json, or a tokenizer_config.json whose tokenizer.json is gone, was taken for "no
    tokenizer": `ecomla convert` published the model without one, without a word."""
    import shutil

    from conftest import tiny_model_dir
    from ecomla.cli import main
    from ecomla.sources import load_tokenizer

    model = tiny_model_dir(tmp_path / "m")
    assert load_tokenizer(str(model)) is not None
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(model / f, bare / f)
    assert load_tokenizer(str(bare)) is None  # weights only: no tokenizer, as before
    text = (model / "tokenizer.json").read_text()
    (model / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"its tokenizer \(tokenizer.json, tokenizer_config.json.*\) cannot be loaded"):
        load_tokenizer(str(model))
    assert main(["convert", str(model), "--kv-rank", "8", "--init", "xecomla", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    (model / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"its tokenizer \(tokenizer_config.json.*\) cannot be loaded"):
        load_tokenizer(str(model))
