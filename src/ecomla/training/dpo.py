"""DPO after distillation, through TRL's DPOTrainer with an explicit frozen reference model.

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

Preference files (JSON list or JSONL; `preference_row` reads more layouts):
    {"prompt": str, "chosen": str, "rejected": str}                          plain text
    {"conversations": [{"from", "value"}...], "chosen": {"from", "value"}, "rejected": {...}}
                                                                              chat (as ../shared/data/train/dpo_en_demo.json)
    {"prompt": [turns], "chosen": [turns], "rejected": [turns]}               chat, TRL's conversational rows
    {"chosen": [whole chat], "rejected": [whole chat]} (+ "prompt": str)     chat, the shared opening is the prompt
Chat rows go to TRL in its conversational format, so the tokenizer's chat template is applied.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..options import DPOOptions
from ..io import JSON_LINES, iter_rows, read_json, row_name
from .data import message, text_turns, to_messages

# DPO's training compute so far, {"tokens", "train_seconds"}: in each checkpoint (a resume adds to it) and, when the
# run is done, in its state folder (what `ecomla run`'s report counts for the dpo row)
SPENT = "ecomla_spent.json"


def state_dir(out) -> Path:
    """TRL's state (checkpoints, log) of the DPO run publishing `out`: beside it, OUT.dpo-state."""
    out = Path(str(out)).expanduser().resolve()
    return out.with_name(out.name + ".dpo-state")


def spent(out) -> dict:
    """{"tokens", "train_seconds"} the finished DPO run publishing `out` trained on and for; {} if unknown."""
    path = state_dir(out) / SPENT
    return read_json(path, "the DPO run's compute", f"run the DPO step again (remove {out})") if path.is_file() else {}


def _turns(turns, what: str) -> list[dict]:
    if not isinstance(turns, list):
        raise ValueError(f"'{what}' must be a list of chat turns, got {turns!r}")
    return text_turns([message(m, "preference row") for m in turns])


def _answer(answer, what: str) -> list[dict]:
    """An answer's turns: a string is one assistant turn; every turn must be the assistant's."""
    turns = ([{"role": "assistant", "content": answer}] if isinstance(answer, str)
             else _turns(answer if isinstance(answer, list) else [answer], what))
    if not turns or any(t["role"] != "assistant" for t in turns):
        raise ValueError(f"'{what}' must be the assistant's answer, got {answer!r}")
    return turns


def _implicit(row: dict) -> dict:
    """TRL's implicit prompt: chosen and rejected whole chats; the turns they open with alike are the prompt (a
    "prompt" string beside them, as UltraFeedback's, must be that prompt's last user turn)."""
    chosen, rejected = _turns(row["chosen"], "chosen"), _turns(row["rejected"], "rejected")
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    users = [t["content"] for t in chosen[:k] if t["role"] == "user"]
    if not users:
        raise ValueError("'chosen' and 'rejected' are chats that share no opening user turn: give the prompt's turns "
                         "as 'prompt' and only the answers as 'chosen' and 'rejected'")
    if isinstance(row.get("prompt"), str) and row["prompt"] != users[-1]:
        raise ValueError("'prompt' is not the last user turn 'chosen' and 'rejected' open with: give the prompt's "
                         "turns as 'prompt' and only the answers as 'chosen' and 'rejected'")
    return {"prompt": chosen[:k], "chosen": _answer(chosen[k:], "chosen"), "rejected": _answer(rejected[k:], "rejected")}


def preference_row(row: dict) -> dict:
    """One preference pair as TRL's DPOTrainer takes it: prompt, chosen and rejected all strings (plain text) or all
    lists of chat turns. Read from TRL's standard and conversational rows; its implicit-prompt rows (chosen and
    rejected whole chats opening alike: UltraFeedback's, with its prompt string beside them); LLaMA-Factory's ranking
    rows, sharegpt ({conversations, chosen, rejected} turns) and alpaca ({instruction, input, chosen, rejected}), each
    with its `system` (and alpaca's `history`)."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise ValueError("preference rows need 'chosen' and 'rejected' (and 'prompt', 'conversations' or 'instruction')")
    if "conversations" in row:
        turns = _turns(row["conversations"], "conversations")
        if not turns:
            raise ValueError("'conversations' is empty: give the prompt's chat turns")
        system = [{"role": "system", "content": row["system"]}] if row.get("system") and turns[0]["role"] != "system" else []
        if system and not isinstance(row["system"], str):
            raise ValueError(f"'system' must be a string, got {row['system']!r}")
        return {"prompt": system + turns, "chosen": _answer(row["chosen"], "chosen"),
                "rejected": _answer(row["rejected"], "rejected")}
    if "instruction" in row:
        if not all(isinstance(row[k], str) for k in ("chosen", "rejected")):
            raise ValueError("alpaca preference rows need 'chosen' and 'rejected' strings")
        prompt = text_turns(to_messages({**row, "output": ""}, "preference row")[:-1])
        return {"prompt": prompt, "chosen": _answer(row["chosen"], "chosen"), "rejected": _answer(row["rejected"], "rejected")}
    keys = ("prompt", "chosen", "rejected")
    if "prompt" in row and all(isinstance(row[k], str) for k in keys):
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    if "prompt" in row and all(isinstance(row[k], list) for k in keys):  # already conversational
        return {"prompt": _turns(row["prompt"], "prompt"), "chosen": _answer(row["chosen"], "chosen"),
                "rejected": _answer(row["rejected"], "rejected")}
    if all(isinstance(row[k], list) for k in ("chosen", "rejected")) and not isinstance(row.get("prompt"), list):
        return _implicit(row)
    if "prompt" in row:
        got = ", ".join(f"{k} {type(row[k]).__name__}" for k in keys)
        raise ValueError(f"'prompt', 'chosen' and 'rejected' must all be strings (plain text) or all lists of chat "
                         f"turns; got {got}")
    raise ValueError("preference rows need 'prompt', 'conversations' or 'instruction' beside 'chosen' and 'rejected'")


def read_preferences(path: str | Path) -> list[dict]:
    """Preference rows from a .json list or .jsonl file (read by io.iter_rows, as training data is)."""
    path = Path(path)
    if path.suffix.lower() not in (".json", *JSON_LINES):
        raise ValueError(f"preference file {path}: expected .json (a list of rows) or .jsonl (one row per line)")
    rows, numbers = [], []
    for n, r in iter_rows(path, "preference file"):
        try:
            rows.append(preference_row(r))
            numbers.append(n)
        except ValueError as err:
            raise ValueError(f"preference file {path}, {row_name(path, n)}: {err}") from None
    if not rows:
        raise ValueError(f"preference file {path} holds no rows")
    kinds = {isinstance(r["prompt"], list): n for n, r in zip(reversed(numbers), reversed(rows))}  # each kind's first
    if len(kinds) == 2:  # TRL takes one kind of row a dataset (a mix failed in pyarrow after the models loaded)
        raise ValueError(f"preference file {path} mixes plain-text rows ({row_name(path, kinds[False])}) and chat rows "
                         f"({row_name(path, kinds[True])}): give one kind in a file")
    same = [row_name(path, n) for n, r in zip(numbers, rows) if r["chosen"] == r["rejected"]]
    if same:  # a pair whose answers are one text has zero DPO gradient: a file of them trains nothing, silently
        raise ValueError(f"preference file {path}: {len(same)} of {len(rows)} rows have the same chosen and rejected "
                         f"answer ({', '.join(same[:5])}{' ...' if len(same) > 5 else ''}); they teach nothing: drop them")
    return rows


def check_chat_template(rows: list[dict], tokenizer, model: str) -> None:
    """Chat rows need `model`'s tokenizer to have a chat template (checked before any weight loads)."""
    if any(isinstance(r["prompt"], list) for r in rows) and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the preference data hold chat turns and {model}'s tokenizer has no chat template to render "
                         "them: give plain-text rows ('prompt', 'chosen' and 'rejected' strings), or add a chat_template "
                         "to its tokenizer_config.json")


def _ids(tokenizer, text_or_turns, generation_prompt: bool = False) -> list[int]:
    """As TRL's DPOTrainer tokenizes: chat turns through the template, text as the tokenizer encodes it."""
    if isinstance(text_or_turns, list):
        return tokenizer.apply_chat_template(text_or_turns, tokenize=True, add_generation_prompt=generation_prompt,
                                             return_dict=True)["input_ids"]
    return tokenizer(text=text_or_turns)["input_ids"]


def _common(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def prompt_lengths(rows: list[dict], tokenizer, at_least: int) -> list[int]:
    """Each row's prompt length as TRL's DPOTrainer counts it where it is at least `at_least` (what its
    --max-length filter compares): the tokens the prompt shares with both prompt + answer (a last prompt token that
    merges with the answer's first is the answer's); below that, the prompt's own token count (no smaller count
    changes the comparison)."""
    lengths = []
    for r in rows:
        prompt = _ids(tokenizer, r["prompt"], generation_prompt=True)
        if len(prompt) >= at_least:
            prompt = prompt[:min(_common(prompt, _ids(tokenizer, r["prompt"] + r[k])) for k in ("chosen", "rejected"))]
        lengths.append(len(prompt))
    return lengths


def check_prompts_fit(lengths: list[int], max_length: int, data) -> None:
    """Refuse preference data whose every prompt fills --max-length: TRL drops such a pair (none of its answer would
    be left to train on), and with none left it failed inside the Trainer ("num_samples=0")."""
    if lengths and min(lengths) >= max_length:
        raise ValueError(f"preference file {data}: every one of its {len(lengths)} prompts has at least --max-length "
                         f"{max_length} tokens (the shortest {min(lengths)}), so no answer token would fit and nothing "
                         "would train: raise --max-length, or shorten the prompts")


def check_preferences(rows: list[dict], tokenizer, model: str, max_length: int, data) -> None:
    """What DPO needs of its preference rows, checked before any weight loads (by `ecomla dpo` and by `ecomla run`
    before step one): `model`'s tokenizer, a chat template for chat rows, a prompt shorter than `max_length`."""
    if tokenizer is None:
        raise ValueError(f"{model} ships no tokenizer; DPO needs one")
    check_chat_template(rows, tokenizer, model)
    check_prompts_fit(prompt_lengths(rows, tokenizer, max_length), max_length, data)


def capped_length(max_length: int, config, log) -> int:
    """--max-length, at most the model's positions: it caps each prompt + answer (TRL truncates to it), and tokens
    past the positions the model was trained on would train it on positions it has never seen."""
    most = getattr(config, "max_position_embeddings", None)
    if most and max_length > most:
        log(f"[ecomla dpo] note: --max-length {max_length} is beyond the model's {most} positions: sequences are cut "
            f"at {most}")
        return most
    return max_length


def dpo(args: DPOOptions, log=print) -> Path:
    """Train with DPO; the final model is written atomically to args.out (TRL state in out.dpo-state/). Under a
    launch of several processes (`accelerate launch`) every process trains (TRL's Trainer shares the batches) and the
    first alone holds the outputs' locks and writes (the others were refused the lock it held, or wrote beside it)."""
    from contextlib import nullcontext

    import torch
    from accelerate import PartialState

    from ..io import claim

    if args.model is None:
        raise ValueError("give the MODEL to train")
    main = PartialState(cpu=not torch.cuda.is_available()).is_main_process  # (as the Trainer's use_cpu: one group)
    log = log if main else (lambda *a, **k: None)
    inputs = {"model": args.model, "reference model": args.ref_model, "preference data": args.data}
    state = state_dir(args.out)
    # the first process is the only writer of both, from these checks to the end
    with claim(args.out, inputs) if main else nullcontext(), claim(state, inputs) if main else nullcontext():
        out = _dpo(args, inputs, state, log, main)
    log(f"saved {out}")
    return out


def _dpo(args: DPOOptions, inputs: dict, state: Path, log, main: bool = True) -> Path:
    import shutil

    import torch

    from ..io import check_output, check_unchanged_sources
    from ..sources import load_config, load_model, load_tokenizer
    from .data import check_vocab

    out = check_output(args.out, inputs, args.overwrite, resume=args.resume, kind="dpo", overwrite_kind=args.overwrite_kind)
    check_output(state, inputs, overwrite=args.overwrite, resume=args.resume, kind="dpo-state",
                 overwrite_kind=args.overwrite_kind)
    rows = read_preferences(args.data)
    tok = load_tokenizer(args.model)
    max_length = capped_length(args.max_length, load_config(args.model), log)
    check_preferences(rows, tok, args.model, max_length, args.data)
    if args.ref_model:
        check_vocab(tok, load_tokenizer(args.ref_model), load_config(args.model),
                    load_config(args.ref_model), other="reference model", job="DPO")
    if args.resume:
        recorded = args.check_resume(state / "args.json")
        if any(state.glob("checkpoint-*")):  # (before the first checkpoint, nothing trained on it yet)
            check_unchanged_sources(recorded.get("data_files"), [args.data], f"the DPO run in {out}", "preference data",
                                    "the rest of the run would train on other pairs")
            began = recorded.get("pairs_digest")  # (recorded since 2026-12-05; a finished run trains no more)
            if began != pairs_digest(rows) and not (out / "config.json").is_file():
                why = ("this ecomla reads its preference file otherwise than the one that started it" if began else
                       "started by an earlier ecomla, which may read its preference file otherwise and recorded no "
                       "fingerprint of the pairs it read to check")
                raise ValueError(f"--resume of the DPO run in {out}: {why}, so the rest of the run could train on other "
                                 "pairs; finish it with the ecomla that started it, or start it again with --overwrite")
    model, _ = load_model(args.model, dtype=torch.float32, tokenizer=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ref, _ = load_model(args.ref_model or args.model, dtype=torch.float32, tokenizer=False)
    ref.requires_grad_(False)
    created = not state.exists()
    try:
        _train(args, state, out, model, ref, tok, rows, inputs, max_length, log, main)
    except BaseException:
        if main and created and not any(state.glob("checkpoint-*")):  # nothing worth resuming: leave no empty folder
            shutil.rmtree(state, ignore_errors=True)
        raise
    return out


def pairs_digest(rows: list[dict]) -> str:
    """A fingerprint of the pairs as read (TRL's rows): what a resume must train on again. The file's own fingerprint
    does not see how a version of ecomla reads it (LLaMA-Factory's `system`, which turns are the prompt)."""
    import hashlib

    return hashlib.blake2b(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode(), digest_size=16).hexdigest()


def whole_run_train_loss(history: list[dict]) -> list[dict]:
    """The Trainer's log with its closing `train_loss` over every step: after a resume the Trainer averages only the
    steps since the checkpoint (each step's `loss` is logged, logging_steps=1, and the log restored on resume)."""
    losses = [r["loss"] for r in history if "loss" in r]
    return [{**r, "train_loss": sum(losses) / len(losses)} if "train_loss" in r and losses else r for r in history]


def spent_recording_trainer():
    """TRL's DPOTrainer whose checkpoints get `write_spent(folder)` (the compute so far) before the Trainer writes
    their trainer_state.json, which marks one whole: written after it (a callback's on_save), a run stopped in
    between (as the Trainer removed older checkpoints) resumed from a checkpoint without it, and its compute was
    unknown for good."""
    from trl import DPOTrainer

    class SpentRecordingDPOTrainer(DPOTrainer):
        write_spent = None  # folder -> None

        def _save_checkpoint(self, model, trial):
            if self.write_spent is not None:
                folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
                folder.mkdir(parents=True, exist_ok=True)
                self.write_spent(folder)
            super()._save_checkpoint(model, trial)

    return SpentRecordingDPOTrainer


def _train(args: DPOOptions, state: Path, out: Path, model, ref, tok, rows, inputs, max_length: int, log,
           main: bool = True) -> None:
    import math
    import time

    import datasets
    import torch
    from trl import DPOConfig

    from ..io import atomic_write, clear_run_dir, fingerprint_sources, mark, save_checkpoint
    from ..sources import non_finite_weights
    from .loop import fresh_precision

    from accelerate import PartialState

    if main:
        state.mkdir(parents=True, exist_ok=True)
        if args.overwrite and not args.resume:
            clear_run_dir(state)
        mark(state, "dpo-state")
        atomic_write(state / "args.json", json.dumps({**args.recorded(), "data_files": fingerprint_sources([args.data]),
                                                      "pairs_digest": pairs_digest(rows)}, indent=1))
    PartialState().wait_for_everyone()  # the others read the state folder after the first has made it
    config = DPOConfig(
        output_dir=str(state), beta=args.beta, learning_rate=args.lr, num_train_epochs=args.epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_length=max_length, bf16=args.precision == "bf16",
        save_steps=args.save_every, save_strategy="steps",
        save_total_limit=args.keep_checkpoints,  # the newest; each holds the model and AdamW's moments
        logging_steps=1, report_to=[], seed=args.seed, use_cpu=not torch.cuda.is_available(), save_only_model=False,
    )
    fresh_precision()  # the Trainer builds its own Accelerator (bf16 or not) after an earlier stage's
    trainer = spent_recording_trainer()(model=model, ref_model=ref, args=config,
                                        train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    skipped = len(rows) - len(trainer.train_dataset)
    if skipped:  # TRL drops them without a word
        log(f"[ecomla dpo] note: {skipped} of {len(rows)} preference pairs are skipped: the prompt alone fills "
            f"--max-length {max_length} tokens, so none of its answer would fit (raise --max-length to train on them)")
    last = None
    if args.resume:
        ckpts = sorted(state.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        for ckpt in ckpts:  # the Trainer writes a checkpoint in place, trainer_state.json last
            if not (ckpt / "trainer_state.json").is_file():
                log(f"[ecomla dpo] {ckpt.name} is incomplete (no trainer_state.json: stopped while it was written); "
                    "not resumed from")
        ckpts = [c for c in ckpts if (c / "trainer_state.json").is_file()]
        last = str(ckpts[-1]) if ckpts else None
        log(f"[ecomla dpo] resuming from {last}" if last else "[ecomla dpo] --resume: no checkpoint, starting fresh")
    recorded = Path(last) / SPENT if last else None  # what the checkpoint resumed from had spent
    before = (read_json(recorded, "a DPO checkpoint's compute", f"resume from another checkpoint (remove {last})")
              if recorded and recorded.is_file() else {})
    known = recorded is None or recorded.is_file()  # (a checkpoint of an older ecomla recorded nothing: unknown)
    t0 = time.time()

    def so_far() -> str:  # TRL counts the tokens of this train() call (prompt and both answers)
        return json.dumps({"tokens": before.get("tokens", 0) + int(getattr(trainer, "_total_train_tokens", 0)),
                           "train_seconds": before.get("train_seconds", 0.0) + time.time() - t0})

    if known and main:
        trainer.write_spent = lambda folder: atomic_write(folder / SPENT, so_far())
    if main:
        (state / SPENT).unlink(missing_ok=True)  # a finished run's, before this one goes on
    ended = last and read_json(Path(last) / "trainer_state.json", "a DPO checkpoint's trainer state",
                               f"resume from another checkpoint (remove {last})")
    if ended and ended.get("global_step", 0) >= ended.get("max_steps", math.inf) > 0:
        # the run's last step (stopped while publishing, or finished): the Trainer would train one step past its end
        log(f"[ecomla dpo] {Path(last).name} holds the run's last step: nothing more to train; publishing it")
        trained = type(trainer.model).from_pretrained(last, dtype=torch.float32)
        history = whole_run_train_loss(ended["log_history"] + [{"train_loss": None, "step": ended["global_step"]}])
        if known and main:
            atomic_write(state / SPENT, json.dumps(before))
    else:
        trainer.train(resume_from_checkpoint=last)
        if known and main:
            atomic_write(state / SPENT, so_far())
        trained = trainer.model
        history = whole_run_train_loss(trainer.state.log_history) if last else trainer.state.log_history
    if main:
        atomic_write(state / "log_history.json", json.dumps(history, indent=1))
    bad = non_finite_weights(trained)
    if bad:
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        raise ValueError(f"[ecomla dpo] training diverged: {len(bad)} weight tensors hold non-finite values (e.g. "
                         f"{bad[0]}; logged losses {losses[-3:]}); nothing was published to {out}. Likely cause: "
                         f"the learning rate (--lr {args.lr:g}) or --beta {args.beta:g}; start again with a lower --lr")
    if main:
        save_checkpoint(trained, tok, out, overwrite=True, inputs=inputs, kind="dpo", overwrite_kind=args.overwrite_kind)
    PartialState().wait_for_everyone()  # (the others end once the model is published)
