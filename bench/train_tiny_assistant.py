"""Distil the tiny VLM's MTP assistant on the CPU from the tiny VLM's own predictions (minutes).

Run ``uv run python bench/train_tiny_assistant.py --out DIR``: it writes an assistant folder (bf16 weights,
config, generation config) with ``TRAINING.json`` (the recipe and what came of it) and ``SHA256SUMS``.
What ships in ``src/ecoquant/fixtures/tiny_vlm_assistant/`` is this script's output; the shape is
:func:`ecoquant.fixtures.tiny_assistant.assistant_config`.

What the assistant must learn, and how it is taught:

* At inference (transformers' ``SinglePositionMultiTokenCandidateGenerator``) the assistant sits at the
  position ``q`` of the newest token: it takes that token's embedding (the target's scaled table)
  concatenated with the target's last hidden state at ``q - 1``, attends to the target's KV of the earlier
  positions, and predicts the token after it. Each further draft step keeps the position and feeds back
  its own projected hidden state with the token it just drafted.
* Training does exactly that for every answer position of a batch at once: one target forward (bf16, as
  served) gives the last hidden states, the shared KV and the target's greedy choice at every position;
  the assistant is unrolled ``draft_steps`` times, each step's token the target's own next token (the
  draft that would have been accepted). The loss is cross-entropy against the target's greedy choice,
  which is what greedy acceptance checks; a mask lets position ``q`` see the KV of positions before it only.
* The requests are the basic pages as ``ecoquant eval`` asks them, plus "Describe the page." (longer
  answers: more positions to learn from), on the VLM's training pages; evaluation pages are skipped as the
  VLM's own training skipped them (:class:`ecoquant.fixtures.train_tiny_vlm.PageStream`). The shipped
  text corpus is not used: the assistant drafts answers about pages, and the target's answers are what it
  must predict.
* The head is tied to the assistant's embedding table, which starts as a copy of the target's (same width,
  same vocabulary), so the first steps already score tokens the way the target does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ecoquant.errors import EcoquantError
from ecoquant.fixtures.train_tiny_vlm import TrainRecipe, _log


@dataclass(frozen=True)
class DistilRecipe:
    """Everything that decides the assistant's weights (library versions are recorded beside).

    ``seed``, ``batch_size`` and ``describe_fraction`` are read by the VLM recipe's page plan as well. The
    target's forward costs more than the assistant's step on two shared cores, so ``teacher_batches``
    batches are computed once and ``steps`` optimizer steps draw from them, in an order set by the seed.
    """

    seed: int = 20261207
    teacher_batches: int = 10
    steps: int = 90
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 5
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    draft_steps: int = 2
    describe_fraction: float = 0.5

    lr_at = TrainRecipe.lr_at  # the VLM's schedule: linear warm-up, then cosine down to final_lr_fraction


def earlier_positions_mask(queries: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """``[1, 1, Q, L]`` booleans: the query at position ``q`` may see keys ``t < q`` (within ``window`` when sliding).

    Position 0 is always visible so no row is empty (an all-masked row is NaN in SDPA); no loss is taken there.
    """
    q = queries[:, None]
    t = torch.arange(length)[None, :]
    allowed = t < q
    if window is not None:
        allowed &= t >= q - window
    allowed |= t == 0
    return allowed[None, None]


@dataclass(frozen=True)
class TeacherBatch:
    """What the target computed for one batch, kept so several optimizer steps can reuse it.

    Only the answer region is kept for queries (from the earliest first answer token on): the assistant is
    never asked to draft inside a prompt. KV is kept whole, since the answer's queries attend to the prompt.
    """

    ids: torch.Tensor  # [B, L] token ids (right-padded)
    lengths: torch.Tensor  # [B] tokens per row
    first: torch.Tensor  # [B] index of each row's first generated token
    start: int  # first query position kept
    greedy: torch.Tensor  # [B, L]: the target's greedy choice for position t + 1
    prev_hidden: torch.Tensor  # [B, L - start, H]: the target's last hidden state at q - 1, q = start..L-1
    kv: dict[str, tuple[torch.Tensor, torch.Tensor]]  # the target's shared KV per layer type, float32


@torch.no_grad()
def teacher_batch(target: Any, batch: dict[str, torch.Tensor], first: torch.Tensor) -> TeacherBatch:
    """One bf16 target forward, as the served model computes it, reduced to what distillation reads."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    out = target(**inputs, output_hidden_states=True, return_shared_kv_states=True)
    start = int(first.min())
    return TeacherBatch(
        ids=batch["input_ids"],
        lengths=batch["attention_mask"].sum(dim=1),
        first=first,
        start=start,
        greedy=out.logits.argmax(-1),
        prev_hidden=out.hidden_states[-1][:, start - 1 : -1].float(),
        kv={k: (v[0].float(), v[1].float()) for k, v in out.shared_kv_states.items()},
    )


def unrolled_loss(assistant: Any, embed: Any, teacher: TeacherBatch, steps: int) -> tuple[torch.Tensor, list[float]]:
    """Mean cross-entropy over ``steps`` draft steps against the target's greedy tokens; per-step argmax hit rate."""
    ids, greedy = teacher.ids, teacher.greedy
    rows, length = ids.shape
    queries = torch.arange(teacher.start, length)
    config = assistant.config.get_text_config()
    masks = {
        "full_attention": earlier_positions_mask(queries, length, None).expand(rows, -1, -1, -1),
        "sliding_attention": earlier_positions_mask(queries, length, config.sliding_window).expand(rows, -1, -1, -1),
    }
    positions = queries[None].expand(rows, -1)
    prev = teacher.prev_hidden  # step 1 reads the target's state at q - 1
    total, hits, count = torch.zeros(()), [], 0
    for j in range(steps):
        # Step j + 1 at position q: token q + j (the target's own, as an accepted draft), label greedy[q + j].
        at = (queries + j).clamp(max=length - 1)
        tokens, labels = ids[:, at], greedy[:, at]
        valid = (positions >= teacher.first[:, None]) & (positions + j <= teacher.lengths[:, None] - 2)
        x = assistant.pre_projection(torch.cat([embed(tokens).float(), prev], dim=-1))
        # output_hidden_states keeps every query position (transformers would otherwise try to slice the
        # queries for its KV-shared layers, a decode-time shortcut that assumes Per-Layer Embeddings).
        out = assistant.model(
            inputs_embeds=x,
            attention_mask=masks,
            position_ids=positions,
            shared_kv_states=teacher.kv,
            use_cache=False,
            output_hidden_states=True,
        )
        logits = assistant.lm_head(out.last_hidden_state)
        prev = assistant.post_projection(out.last_hidden_state)
        if valid.any():
            total = total + F.cross_entropy(logits[valid].float(), labels[valid], reduction="sum")
            count += int(valid.sum())
            hits.append(float((logits[valid].argmax(-1) == labels[valid]).float().mean()))
        else:
            hits.append(float("nan"))
    return total / max(count, 1), hits


def train(out: Path, recipe: DistilRecipe, max_minutes: float) -> Path:
    """Distil into ``out`` (must not exist)."""
    import transformers
    from transformers import AutoProcessor, Gemma4AssistantForCausalLM, Gemma4ForConditionalGeneration

    from ecoquant.fixtures.tiny_assistant import assistant_config
    from ecoquant.fixtures.tiny_vlm import tiny_vlm_path, write_checksums
    from ecoquant.fixtures.train_tiny_vlm import Encoder, PageStream, collate, step_examples

    if out.exists():
        raise EcoquantError(f"{out} already exists; pass a new folder")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    target_path = tiny_vlm_path()
    processor = AutoProcessor.from_pretrained(target_path)
    target = Gemma4ForConditionalGeneration.from_pretrained(target_path, dtype=torch.bfloat16).eval()
    embed = target.get_input_embeddings()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        assistant = Gemma4AssistantForCausalLM(assistant_config()).float()
    with torch.no_grad():  # the tied head starts as the target's (see the module docstring)
        assistant.model.embed_tokens.weight.copy_(target.get_input_embeddings().weight.float())
    assistant.train()
    pad_id = processor.tokenizer.pad_token_id
    encoder = Encoder(processor)
    stream = PageStream(encoder)
    params = [p for p in assistant.parameters() if p.requires_grad]
    decay = [p for n, p in assistant.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in assistant.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    t0 = time.monotonic()
    teachers = []
    for b in range(recipe.teacher_batches):
        examples = step_examples(stream, recipe, b)  # type: ignore[arg-type]
        first = torch.tensor([len(e.prompt_ids) for e in examples])
        teachers.append(teacher_batch(target, collate(examples, pad_id), first))
        _log(f"teacher batch {b + 1}/{recipe.teacher_batches} ({(time.monotonic() - t0) / 60:.1f} min)")
    teacher_minutes = (time.monotonic() - t0) / 60
    order = random.Random(recipe.seed)
    rows: list[dict[str, Any]] = []
    for step in range(recipe.steps):
        if (time.monotonic() - t0) / 60 > max_minutes:
            _log(f"time limit of {max_minutes} min reached at step {step}; stopping early")
            break
        lr = recipe.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, hits = unrolled_loss(assistant, embed, teachers[order.randrange(len(teachers))], recipe.draft_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
        opt.step()
        rows.append({"step": step, "loss": float(loss.detach()), "hits": hits, "seconds": time.monotonic() - t0})
        if step % 10 == 0:
            shown = " ".join(f"{h:.2f}" for h in hits)
            _log(f"step {step}/{recipe.steps} loss {rows[-1]['loss']:.3f} hit@1..{recipe.draft_steps} {shown} lr {lr:.1e}")
    seconds = time.monotonic() - t0
    assistant = assistant.to(torch.bfloat16).eval()
    assistant.generation_config.num_assistant_tokens = recipe.draft_steps
    partial = out.with_name(out.name + ".partial")
    assistant.save_pretrained(partial)
    last = rows[-20:]
    record = {
        "recipe": dataclasses.asdict(recipe),
        "target": str(target_path.name),
        "target_sha256sums": (target_path / "SHA256SUMS").read_text().splitlines(),
        "steps_done": len(rows),
        "teacher_examples": recipe.teacher_batches * recipe.batch_size,
        "teacher_minutes": round(teacher_minutes, 2),
        "train_minutes": round(seconds / 60, 2),
        "final_loss_mean_of_last_20": sum(r["loss"] for r in last) / max(1, len(last)),
        "final_hit_rate_per_draft_step_mean_of_last_20": [
            sum(r["hits"][j] for r in last) / max(1, len(last)) for j in range(recipe.draft_steps)
        ],
        "loss_every_10_steps": [round(r["loss"], 4) for r in rows[::10]],
        "train_pages_skipped_as_eval_pages": stream.skipped,
        "parameters": sum(p.numel() for p in assistant.parameters()),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "command": "uv run python bench/train_tiny_assistant.py " + " ".join(sys.argv[1:]),
    }
    (partial / "TRAINING.json").write_text(json.dumps(record, indent=2) + "\n")
    write_checksums(partial)
    os.replace(partial, out)
    _log(f"wrote {out} ({len(rows)} steps, {seconds / 60:.1f} min)")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to create (must not exist)")
    parser.add_argument("--steps", type=int, default=DistilRecipe.steps, help="optimizer steps (batch 16 each)")
    parser.add_argument("--teacher-batches", type=int, default=DistilRecipe.teacher_batches, help="target batches computed once")
    parser.add_argument("--lr", type=float, default=DistilRecipe.lr, help="peak learning rate")
    parser.add_argument("--max-minutes", type=float, default=15.0, help="stop the optimizer steps after this much wall time (teacher batches included)")
    args = parser.parse_args(argv)
    try:
        train(args.out, DistilRecipe(steps=args.steps, lr=args.lr, teacher_batches=args.teacher_batches), args.max_minutes)
    except EcoquantError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
