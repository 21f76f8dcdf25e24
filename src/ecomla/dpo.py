"""DPO after distillation, through TRL's DPOTrainer with an explicit frozen reference model.

    L = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

Preference files (JSON list or JSONL):
    {"prompt": str, "chosen": str, "rejected": str}                          plain text
    {"conversations": [{"from", "value"}...], "chosen": {"from", "value"}, "rejected": {...}}
                                                                              chat (as ../shared/data/train/dpo_en_demo.json)
Chat rows go to TRL in its conversational format, so the tokenizer's chat template is applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .data import ROLE, _content, read_rows


@dataclass
class DPOArgs:
    model: str
    data: str
    out: str
    ref_model: str | None = None  # default: the model itself, frozen at the start
    beta: float = 0.1
    lr: float = 5e-7
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 2
    grad_accum: int = 1
    max_length: int = 512
    precision: str = "fp32"
    save_every: int = 100
    seed: int = 0
    resume: bool = False
    overwrite: bool = False


def _turn(m) -> dict:
    if isinstance(m, str):
        return {"role": "assistant", "content": m}
    role = ROLE.get(m.get("role", m.get("from")))
    if role is None:
        raise ValueError(f"unknown chat role in {m!r}")
    return {"role": role, "content": _content(m.get("content", m.get("value", "")))}


def preference_row(row: dict) -> dict:
    """One preference pair in TRL's standard (strings) or conversational (message lists) format."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise ValueError("preference rows need 'chosen' and 'rejected' (and 'prompt' or 'conversations')")
    if "conversations" in row:
        prompt = [_turn(m) for m in row["conversations"]]
        return {"prompt": prompt, "chosen": [_turn(row["chosen"])], "rejected": [_turn(row["rejected"])]}
    if "prompt" in row and all(isinstance(row[k], str) for k in ("prompt", "chosen", "rejected")):
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    if "prompt" in row:  # already conversational
        return {"prompt": [_turn(m) for m in row["prompt"]], "chosen": [_turn(m) for m in row["chosen"]],
                "rejected": [_turn(m) for m in row["rejected"]]}
    raise ValueError("preference rows need 'prompt' or 'conversations' beside 'chosen' and 'rejected'")


def read_preferences(path: str | Path) -> list[dict]:
    """Preference rows from a .json list or .jsonl file (read as data.read_rows reads training data)."""
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"preference file {path}: expected .json (a list of rows) or .jsonl (one row per line)")
    return [preference_row(r) for r in read_rows(path)]


def dpo(args: DPOArgs, log=print) -> Path:
    """Train with DPO; the final model is written atomically to args.out (TRL state in out.dpo-state/)."""
    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    from .atomic import check_output_dir, save_checkpoint
    from .sources import load_model

    out = Path(args.out)
    if not args.resume:
        check_output_dir(out, args.overwrite)
    rows = read_preferences(args.data)
    model, tok = load_model(args.model, dtype=torch.float32)
    if tok is None:
        raise ValueError(f"{args.model} ships no tokenizer; DPO needs one")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if isinstance(rows[0]["prompt"], list) and not tok.chat_template:
        raise ValueError("chat preference data need a tokenizer with a chat template")
    ref, _ = load_model(args.ref_model or args.model, dtype=torch.float32, tokenizer=False)
    ref.requires_grad_(False)
    state = out.with_name(out.name + ".dpo-state")
    config = DPOConfig(
        output_dir=str(state), beta=args.beta, learning_rate=args.lr, num_train_epochs=args.epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        max_length=args.max_length, bf16=args.precision == "bf16", save_steps=args.save_every, save_strategy="steps",
        logging_steps=1, report_to=[], seed=args.seed, use_cpu=not torch.cuda.is_available(), save_only_model=False,
    )
    trainer = DPOTrainer(model=model, ref_model=ref, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tok)
    last = None
    if args.resume and state.is_dir():
        ckpts = sorted(state.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        last = str(ckpts[-1]) if ckpts else None
        log(f"[ecomla dpo] resuming from {last}" if last else "[ecomla dpo] --resume: no checkpoint, starting fresh")
    trainer.train(resume_from_checkpoint=last)
    (state / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    save_checkpoint(trainer.model, tok, out, overwrite=True)
    return out
