"""`ecomla convert` / `ecomla kv` on a tiny local model: outputs, and refusals that write nothing."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from conftest import tiny_llama, tiny_model_dir
from ecomla.cli import main
from ecomla.conversion.plan import parse_layers


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_llama(num_kv_heads=2, layers=4).save_pretrained(path)
    return path


def test_convert_writes_checkpoint_and_prints_table(tiny_dir, tmp_path, capsys):
    out = tmp_path / "mla"
    assert main(["convert", str(tiny_dir), "--kv-rank", "16", "--rope-dim", "8", "--layers", "0,2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| original | 64 |" in text and "| converted | 44 |" in text  # (16 + 8 + 2*64) / 2 per layer
    assert "1.45x smaller" in text
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.mla_layers == [0, 2] and model.config.kv_lora_rank == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mla"]  # no temporary directory left behind
    assert main(["kv", str(out)]) == 0 and "1.45x smaller" in capsys.readouterr().out


def test_the_command_starts_without_torch_and_still_loads_converted_models(tiny_dir, tmp_path):
    """The `ecomla` script imports torch and transformers only for a command that uses them: `--help` took
    ~4 s (and Ctrl-C in those seconds printed a traceback). A converted model still loads there: `sources`
    registers the EcoMLA classes, which `import ecomla` no longer does in the script."""
    script = Path(sys.executable).parent / "ecomla"
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([script, "--help"], env=env, capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert proc.returncode == 0 and "usage: ecomla" in proc.stdout and "ecomla.cli" in imported
    assert not imported & {"torch", "transformers"}
    out = tmp_path / "mla"
    assert main(["convert", str(tiny_dir), "--kv-rank", "16", "--rope-dim", "8", "--out", str(out)]) == 0
    proc = subprocess.run([script, "kv", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "| converted |" in proc.stdout, proc.stderr


def test_a_reader_that_stops_reading_stdout_leaves_the_work_done_and_written(tiny_dir, tmp_path):
    """`ecomla eval ... | head -1`: the evaluation ran, then printing its table failed (BrokenPipeError, an OSError, taken
    for bad input): exit 2 and no results written; `ecomla kv | head` exited 2 too. What is printed after the reader
    left is dropped; the command finishes, writes its outputs and exits 0. `ecomla --version` answers."""
    script = str(Path(sys.executable).parent / "ecomla")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 200)
    for argv, written in (([script, "kv", str(tiny_dir)], None),
                          ([script, "eval", str(tiny_model_dir(tmp_path / "m")), "--ppl-file", str(text), "--ppl-window", "64", "--ppl-stride",
                            "32", "--dtype", "float32", "--out", str(tmp_path / "ev")], tmp_path / "ev" / "results.json")):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()  # the reader is gone before the first line (as `| head -0`)
        err = proc.stderr.read()
        assert proc.wait(timeout=300) == 0 and "error" not in err and "Traceback" not in err, err
        assert written is None or written.is_file()
    from ecomla.version import __version__

    proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ecomla {__version__}"
    # started with stdout closed (`>&-`, cron): Python's stdout is None, which the reader-gone wrapper called
    proc = subprocess.run([script, "kv", str(tiny_dir)], stderr=subprocess.PIPE, text=True, timeout=300,
                          preexec_fn=lambda: os.close(1))
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    # a log file's slower progress bars are the command's own: nothing is left in this process's environment
    assert main(["kv", str(tiny_dir)]) == 0 and "TQDM_MININTERVAL" not in os.environ


def test_a_log_files_progress_bars_are_slow_however_main_is_entered(tiny_dir, monkeypatch):
    """With stderr no terminal, bars are redrawn at most every 30 s. tqdm reads TQDM_MININTERVAL once, as it is
    imported: `python -m ecomla.cli` and `main()` from Python import it first (a tiny distill drew 15 and 79 bars
    where the `ecomla` script drew 2). Afterwards bars are as they were."""
    import io

    import tqdm.auto  # (as `import ecomla` imports it, through huggingface_hub)

    from ecomla.options import KVOptions

    seen = []
    monkeypatch.setattr(KVOptions, "run", lambda self, log=print: seen.append(tqdm.auto.tqdm(range(2)).mininterval))
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file
    assert main(["kv", str(tiny_dir)]) == 0 and seen == [30]
    assert tqdm.auto.tqdm(range(2), file=io.StringIO()).mininterval == 0.1 and "TQDM_MININTERVAL" not in os.environ
    from ecomla.cli import slow_progress_bars  # two commands in threads of one process, the first ending first: the

    first, second = slow_progress_bars(), slow_progress_bars()  # second put back the first's slowed bars, for good
    first()
    assert tqdm.auto.tqdm(range(2), file=io.StringIO()).mininterval == 30
    second()
    assert tqdm.auto.tqdm(range(2), file=io.StringIO()).mininterval == 0.1


def test_a_file_flags_tilde_is_the_home_folder_as_for_models_and_out(monkeypatch):
    """`--calib=~/t.txt` (the shell expands no `~` after `=`): 'no such file', though `--out=~/x` and models given so
    were found; the same for --data, --data-dir, --ppl-file and --passkey-filler."""
    from ecomla.cli import build_parser

    monkeypatch.setenv("HOME", "/home/u")
    parse = lambda argv: (lambda a: a.options_class.from_args(a))(build_parser().parse_args(argv))  # noqa: E731
    assert parse(["convert", "m", "--kv-ratio", "4", "--calib=~/t.txt", "--out", "o"]).calib == "/home/u/t.txt"
    assert parse(["distill", "m", "--teacher", "t", "--data=~/a.txt", "--data", "~/b.txt", "--out", "o"]).data == \
        ["/home/u/a.txt", "/home/u/b.txt"]
    evaluation = parse(["eval", "m", "--data-dir=~/ev", "--ppl-file=~/p.txt", "--passkey-filler=~/f.txt"])
    assert (evaluation.data_dir, evaluation.ppl_files, evaluation.passkey_filler) == \
        ("/home/u/ev", ["/home/u/p.txt"], "/home/u/f.txt")
    assert parse(["dpo", "m", "--data=~/p.jsonl", "--out", "o"]).data == "/home/u/p.jsonl"


def test_a_repeated_data_flag_adds_its_files():
    """`--data a --data b` trained on b alone, without a word (as `--ppl-file`, repeatable, suggests: both)."""
    from ecomla.cli import build_parser

    for argv, files in ((["--data", "a", "--data", "b"], ["a", "b"]), (["--data", "a", "b", "--data", "c"], ["a", "b", "c"]),
                        (["--data", "a"], ["a"])):
        args = build_parser().parse_args(["distill", "s", "--teacher", "t", "--out", "o", *argv])
        assert args.options_class.from_args(args).data == files


def test_head_dims_beyond_the_heads_are_said_to_be_zeros(tiny_dir, tmp_path, capsys):
    """--nope-dim 1000 on 16-dim heads wrote a checkpoint 11x the original's without a word (exact: zeros)."""
    assert main(["convert", str(tiny_dir), "--kv-rank", "16", "--rope-dim", "8", "--nope-dim", "12", "--v-dim", "16",
                 "--init", "xecomla", "--out", str(tmp_path / "mla")]) == 0
    out = capsys.readouterr().out
    assert "--nope-dim 12 is more than the 8 dimensions each head has: the other 4 are zeros" in out
    assert "--v-dim" not in out


def test_kv_ratio_and_overwrite(tiny_dir, tmp_path, capsys):
    out = tmp_path / "mla"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["convert", str(tiny_dir), "--kv-ratio", "2", "--rope-dim", "8", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    # --overwrite never removes a folder ecomla did not write
    assert main(["convert", str(tiny_dir), "--kv-ratio", "2", "--rope-dim", "8", "--out", str(out), "--overwrite"]) == 2
    assert "not written by ecomla (it holds keep.txt)" in capsys.readouterr().err and (out / "keep.txt").read_text() == "x"
    out = tmp_path / "mla2"
    assert main(["convert", str(tiny_dir), "--kv-rank", "8", "--rope-dim", "8", "--init", "xecomla", "--out", str(out)]) == 0
    assert main(["convert", str(tiny_dir), "--kv-ratio", "2", "--rope-dim", "8", "--out", str(out), "--overwrite"]) == 0
    assert "replacing" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.kv_lora_rank == 24  # (24 + 8) / 64 = 2x


@pytest.mark.parametrize("args, message", [
    (["--kv-rank", "10000"], "kv_lora_rank=10000 is impossible"),
    (["--kv-rank", "16", "--rope-dim", "7"], "RoPE dimension 7 is invalid"),
    (["--kv-rank", "16", "--rope-dim", "64"], "RoPE dimension 64 is invalid"),
    (["--kv-rank", "16", "--layers", "0,9"], "out of range"),
    (["--kv-rank", "16", "--layers", "x"], "--layers 'x'"),
    (["--kv-rank", "16", "--layers", ","], "--layers ',' selects no layer"),
    (["--kv-ratio", "0.5"], "kv_ratio (--kv-ratio) must be > 1, got 0.5"),
    (["--kv-rank", "16", "--svd", "activations", "--calib", "/no/such/calib.txt"], "--calib /no/such/calib.txt: no such file"),
    (["--kv-rank", "16", "--svd", "activations", "--calib", "/"], "--calib /: a folder; give a text file"),
    (["--kv-rank", "16", "--num-mla-layers", "9"], "num_mla_layers=9 (--num-mla-layers) must be between 1"),
    (["--kv-rank", "16", "--target", "deepseek-v3", "--rope-freqs", "contribution"], "DeepSeek-V3 one standard rotary"),
    (["--kv-rank", "16", "--svd", "activations", "--calib-tokens", "0"], "calib_tokens (--calib-tokens) must be >= 256"),
    (["--kv-rank", "16", "--rope-key", "two"], "rope_key_heads='two' (--rope-key) must be"),
])
def test_bad_settings_fail_clearly_and_write_nothing(tiny_dir, tmp_path, capsys, args, message):
    out = tmp_path / "mla"
    assert main(["convert", str(tiny_dir), *args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_missing_source_and_unsupported_architecture(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), "--kv-rank", "8", "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)).save_pretrained(gpt2)
    assert main(["convert", str(gpt2), "--kv-rank", "8", "--out", str(tmp_path / "o")]) == 2
    assert "'GPT2LMHeadModel' (model_type 'gpt2') is not supported yet" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_kv_table_for_original_and_refusal_for_others(tiny_dir, tmp_path, capsys):
    assert main(["kv", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert "| original | 64 |" in out and "converted" not in out
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)).save_pretrained(gpt2)
    assert main(["kv", str(gpt2)]) == 2 and "not 'gpt2'" in capsys.readouterr().err
    (tmp_path / "ds").mkdir()  # a damaged DeepSeek-V3 config: a KeyError traceback
    (tmp_path / "ds" / "config.json").write_text('{"model_type": "deepseek_v3", "num_hidden_layers": 2}')
    assert main(["kv", str(tmp_path / "ds")]) == 2
    assert "a DeepSeek-V3 config needs integer num_hidden_layers, kv_lora_rank" in capsys.readouterr().err


def test_parse_layers():
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers(None, 2) == [0, 1]
    assert parse_layers("0,2,4", 8) == [0, 2, 4]
    assert parse_layers("0-3,6", 8) == [0, 1, 2, 3, 6]
    assert parse_layers("even", 5) == [0, 2, 4] and parse_layers("odd", 5) == [1, 3]
    with pytest.raises(ValueError, match="--layers '3-1'"):
        parse_layers("3-1", 8)


def test_convert_chooses_layers_ranks_and_frequencies_and_caches_statistics(tiny_dir, tmp_path, capsys):
    """Data-free calibration (the model's own samples; this source has no tokenizer), cached for the next run."""
    cache = tmp_path / "cache"
    args = ["convert", str(tiny_dir), "--kv-rank", "8", "--rope-dim", "4", "--num-mla-layers", "2", "--rank-alloc",
            "spectrum", "--rope-freqs", "cost", "--calib-tokens", "512", "--calib-cache", str(cache)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "warning: no serving engine runs this shape" in capsys.readouterr().out  # per-layer choices, a hybrid
    assert len(list(cache.glob("cov-*"))) == 1
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "a").config
    conv = config.conversion
    assert len(config.mla_layers) == 2 and set(conv["layer_sensitivity_kl"]) == {"0", "1", "2", "3"}
    assert conv["calibration"] == "512 tokens sampled from the model" and conv["rope_freqs"] == "cost"
    assert sorted(config.layer_rope_pair_indices) == [str(i) for i in config.mla_layers]
    assert sum(config.layer_kv_lora_rank(i) for i in config.mla_layers) == 16
    assert main([*args, "--init", "xecomla", "--out", str(tmp_path / "b")]) == 0
    conv = AutoModelForCausalLM.from_pretrained(tmp_path / "b").config.conversion
    assert (conv["init"], conv["svd"], conv["rope_freqs"], conv["rope_key_init"]) == ("xecomla", "weights", "cost", "mean")


def test_the_default_conversion_is_engine_native_and_options_turn_it_off(tiny_dir, tmp_path, capsys):
    args = ["convert", str(tiny_dir), "--kv-rank", "8", "--rope-dim", "4", "--calib-tokens", "512"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "| transformers DeepseekV3 | yes |" in out and "| llama.cpp (CPU; CUDA without flash attention) | yes |" in out
    assert "warning" not in out
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "a").config
    assert config.use_kv_a_layernorm and config.conversion["rope_freqs"] == "progression" and config.conversion["latent_norm"]
    assert main([*args, "--no-latent-norm", "--out", str(tmp_path / "b")]) == 0
    assert "warning: no serving engine runs this shape" in capsys.readouterr().out
    assert not AutoModelForCausalLM.from_pretrained(tmp_path / "b").config.use_kv_a_layernorm


def test_generate_static_cache_streams_the_same_text_as_dynamic(tmp_path, capsys):
    tiny_model_dir(tmp_path / "orig")
    out = tmp_path / "mla"
    assert main(["convert", str(tmp_path / "orig"), "--kv-rank", "12", "--rope-dim", "8", "--init", "xecomla",
                 "--out", str(out)]) == 0
    texts = {}
    for cache in ("dynamic", "static"):
        capsys.readouterr()
        assert main(["generate", str(out), "--prompt", "the cat sat", "--max-new-tokens", "12", "--cache", cache,
                     "--device", "cpu"]) == 0
        texts[cache] = capsys.readouterr().out
    assert texts["dynamic"] == texts["static"] and len(texts["static"]) > len("the cat sat")
    # past the model's 256 positions: refused before the model loads, or with the prompt counted, naming the most
    assert main(["generate", str(out), "--prompt", "the cat sat", "--max-new-tokens", "100000"]) == 2
    assert "--max-new-tokens 100000 runs past the model's 256 positions" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "the cat sat", "--max-new-tokens", "255"]) == 2
    assert re.search(r"the prompt's (\d+) tokens and --max-new-tokens 255 run past the model's 256 positions: choose "
                     r"--max-new-tokens \d+ at most", capsys.readouterr().err)
    # a prompt that alone fills the positions: "choose --max-new-tokens 1 at most" (with 1 given) named no fix
    assert main(["generate", str(out), "--prompt", "the cat sat. " * 100, "--max-new-tokens", "1"]) == 2
    assert re.search(r"the prompt's (\d+) tokens fill the model's 256 positions, leaving none to generate: shorten the "
                     r"prompt by at least \d+ tokens", capsys.readouterr().err)
    # --chat with a tokenizer without a chat template went on as plain text less its BOS: refused
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = None
    (out / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template is None
    assert main(["generate", str(out), "--prompt", "the cat sat", "--chat"]) == 2
    assert "--chat: the tokenizer of" in capsys.readouterr().err
    # weights that are not numbers (a run that diverged, a damaged copy) printed the prompt alone and exited 0
    from safetensors.torch import load_file, save_file

    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    assert main(["generate", str(out), "--prompt", "the cat sat"]) == 2
    assert "holds weights that are not finite numbers (1 tensors, e.g. model.norm.weight): it cannot generate" in \
        capsys.readouterr().err
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], 1e5)  # finite, beyond float16's range
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    assert main(["generate", str(out), "--prompt", "the cat sat", "--dtype", "fp16"]) == 2
    assert "loaded in float16, a weight beyond its range becomes inf: use --dtype float32 or bfloat16" in \
        capsys.readouterr().err


def test_a_list_option_given_without_a_value_is_refused(tmp_path, capsys):
    """`--data $FILES` with an empty variable trained data-free on text the teacher samples, without a word."""
    with pytest.raises(SystemExit) as stop:
        main(["distill", "student", "--teacher", "teacher", "--data", "--out", str(tmp_path / "o")])
    assert stop.value.code == 2 and "--data: expected at least one argument" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_forked_worker_stopped_by_sigterm_ends_quietly(capfd):
    """lm-eval's bootstrap pool forks workers that inherit `ecomla`'s SIGTERM handler: shutting the pool down made
    each one raise Terminated and print a traceback in the middle of an evaluation that succeeded."""
    import multiprocessing
    import signal
    import time

    import ecomla.cli as cli

    previous = signal.getsignal(signal.SIGTERM)
    cli._COMMAND_PID = os.getpid()
    signal.signal(signal.SIGTERM, cli._terminate)
    try:
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        worker.start()
        time.sleep(0.5)
        worker.terminate()  # SIGTERM, as a pool's shutdown sends its busy workers
        worker.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "Traceback" not in capfd.readouterr().err and worker.exitcode == -signal.SIGTERM
