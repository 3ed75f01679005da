"""The E4B's MODELLED energy on an L4 for the built-in suite: where the joules go, and what W4A16 can save.

Nothing here runs a model: the E4B shape twin's cost terms
(:mod:`ecoquant.energy.costs`, from its config and meta shapes) and each
request of the built-in suite (its prompt text and images, from the suite
definition) go through the roofline (:mod:`ecoquant.energy.roofline`) of an
L4's datasheet figures (:mod:`ecoquant.energy.gpus`). Every joule printed is
*modelled for L4*, not measured.

Three checkpoints, side by side in one run: bf16; the seed's W4A16
(``gemma4-e``: 259 decoder Linears int4, head tied bf16); W4A16 + an untied
int4 head (``gemma4-e-int4-head``). Weight-only int4 computes in bf16, so the
three differ only in the bytes read per decode step.

Assumptions stated as such (the bench's own, beyond docs/energy.md's):

* **Text tokens** are counted with Gemma-3's 262k SentencePiece tokenizer (the
  Gemma-3 270M fixture: no Gemma-4 tokenizer is available offline; Gemma-4 keeps
  a vocabulary of the same size), plus :data:`TEMPLATE_TOKENS` for the chat
  template's turn markers and :data:`TOKENS_PER_IMAGE_MARKERS` per image.
* **Image tokens** are the full budget per image (70 / 280 / 1120): an image
  whose aspect ratio fills fewer patches becomes fewer soft tokens.
* **Answers** are exactly 5 or 50 tokens per request (``ecoquant``'s ``short``
  response gives the first; a sentence-long answer the second).
* Concurrency 1 (one request at a time, the worst case) and the default
  per-request host overhead.

With ``--mtp`` it prints instead the issue-30 grid: W4A16 + int4 head with and
without Gemma-4's MTP assistant (the E4B assistant's shape twin,
:mod:`ecoquant.fixtures.e4b_assistant`, where each of its numbers comes from),
over acceptance lengths (tokens per target step) 1.5 / 2 / 2.5 / 3, k = 1..4,
the three image budgets, 5- and 50-token answers and concurrency 1 and 8. The
acceptance lengths are the grid's inputs, not measurements: every MTP figure
is at an ASSUMED acceptance. A cell whose acceptance length exceeds k + 1 is
impossible and left out. Beside it: the draft's overhead with nothing accepted
and the break-even acceptance length (bisection to 0.01 over the model) below
which MTP costs more than it saves.

Usage::

    uv run python bench/energy_model.py [--size 2] [--gpu L4] [--mtp]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

BUDGETS = (70, 280, 1120)
ANSWERS = (5, 50)
TEMPLATE_TOKENS = 8
"""``<bos>``, the user turn's opening and closing markers, the model turn's opening (Gemma-4's template)."""
TOKENS_PER_IMAGE_MARKERS = 2
"""Begin- and end-of-image tokens around each image's soft tokens (text tokens, not soft tokens)."""

VARIANTS = (
    ("bf16", None),
    ("W4A16 (seed, gemma4-e)", "gemma4-e"),
    ("W4A16 + int4 head", "gemma4-e-int4-head"),
)
SEED_MEASURED = -0.52
"""The seed's Round-2 retrospective: int4 Marlin checkpoints used 52% less energy than bf16 on its L4 suite."""


MTP_LENGTHS = (1.5, 2.0, 2.5, 3.0)
"""Acceptance lengths (tokens per target step, 1 + mean accepted drafts) the grid assumes."""
MTP_KS = (1, 2, 3, 4)
MTP_CONCURRENCY = (1, 8)


@dataclass(frozen=True)
class Prompt:
    text_tokens: int
    images: int


def suite_prompts(size: int) -> list[Prompt]:
    """Each built-in request's text tokens (Gemma-3 tokenizer + template) and images."""
    from transformers import AutoTokenizer

    from ecoquant.eval.backends.base import TextPart
    from ecoquant.eval.modelled import count_images
    from ecoquant.eval.runner import EvalConfig, prepare_suite
    from ecoquant.fixtures.gemma3_gguf import gemma3_270m_path

    tokenizer = AutoTokenizer.from_pretrained(gemma3_270m_path())
    prepared = prepare_suite(EvalConfig(suite="builtin", size=size))
    prompts = []
    for _, _, request in prepared.requests["default"]:
        text = "\n".join(p.text for m in request.messages for p in m.parts if isinstance(p, TextPart))
        images = count_images(request)
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        prompts.append(Prompt(n + TEMPLATE_TOKENS + TOKENS_PER_IMAGE_MARKERS * images, images))
    return prompts


def break_even(total: Callable[[float], float], plain: float, k: int) -> float | None:
    """The smallest acceptance length (to 0.01) at which MTP's modelled total drops below ``plain``; None if even
    full acceptance (k + 1) does not. Bisection: fewer target steps never cost more."""
    if total(k + 1.0) >= plain:
        return None
    low, high = 1.0, k + 1.0  # total(low) > plain: nothing accepted is the draft's pure overhead
    while high - low > 0.005:
        mid = (low + high) / 2
        low, high = (low, mid) if total(mid) < plain else (mid, high)
    return high


def mtp_grid(prompts: list[Prompt], gpu_name: str) -> None:
    """The issue-30 table: W4A16 + int4 head with and without MTP (see the module docstring)."""
    from ecoquant.energy.gpus import gpu_spec
    from ecoquant.energy.roofline import RequestTokens, modelled_energy
    from ecoquant.energy.speculative import Speculation, assistant_costs
    from ecoquant.energy.costs import planned_costs
    from ecoquant.fixtures.e4b_assistant import E4B_ASSISTANT_ID, e4b_assistant_twin_path
    from ecoquant.fixtures.e4b_twin import e4b_twin_path

    gpu = gpu_spec(gpu_name)
    target = planned_costs(e4b_twin_path(), "gemma4-e-int4-head")
    draft = assistant_costs(e4b_assistant_twin_path())
    step = target.decode.total
    print(
        f"{E4B_ASSISTANT_ID} (shape twin): per drafted token {draft.weight_bytes / 2**20:.2f} MiB of weights"
        f" ({draft.candidates:,} of {draft.vocab:,} head rows) + {draft.input_bytes / 1024:.0f} KiB input row"
        f" + {sum(a.kv_bytes(1) for a in draft.attention) / 1024:.0f} KiB of the target's KV per context token;"
        f" target step {step / 2**30:.2f} GiB: a drafted token reads {(draft.weight_bytes + draft.input_bytes) / step:.2%}"
        " of a step's weights"
    )
    print()
    heads = " | ".join(f"L={x:g}" for x in MTP_LENGTHS)
    print(
        f"| image budget | answer tokens | concurrency | k | no MTP: J (modelled for {gpu.name}) | {heads}"
        " | nothing accepted | break-even L |"
    )
    print("|---:|---:|---:|---:|---:|" + "---:|" * len(MTP_LENGTHS) + "---:|---:|")
    savings: list[tuple[int, int, int, int, float, float]] = []  # budget, answer, c, k, L, saving
    evens: dict[tuple[int, int, int], float | None] = {}
    for budget in BUDGETS:
        for answer in ANSWERS:
            requests = [RequestTokens(p.text_tokens, p.images * budget, p.images, answer) for p in prompts]
            for c in MTP_CONCURRENCY:
                plain = modelled_energy(requests, target, gpu, c).total_j
                for k in MTP_KS:

                    def total(length: float, k: int = k, c: int = c) -> float:
                        spec = Speculation(draft, k, length - 1.0, measured=False, name=E4B_ASSISTANT_ID)
                        return modelled_energy(requests, target, gpu, c, speculative=spec).total_j

                    cells = []
                    for length in MTP_LENGTHS:
                        if length > k + 1:
                            cells.append("—")
                            continue
                        j = total(length)
                        savings.append((budget, answer, c, k, length, 1 - j / plain))
                        cells.append(f"{j:.1f} ({j / plain - 1:+.1%})")
                    even = break_even(total, plain, k)
                    evens[(answer, c, k)] = max(evens.get((answer, c, k)) or 0.0, even or float("inf"))
                    print(
                        f"| {budget} | {answer} | {c} | {k} | {plain:.1f} | " + " | ".join(cells)
                        + f" | {total(1.0) / plain - 1:+.1%} | {'never' if even is None else f'{even:.2f}'} |"
                    )
    print()
    for length in MTP_LENGTHS:
        cells = [s for s in savings if s[4] == length]
        best = max(cells, key=lambda s: s[5])
        worst = min(cells, key=lambda s: s[5])
        print(
            f"L={length:g} (assumed): saves {worst[5]:.1%} (budget {worst[0]}, {worst[1]}-token answers, c={worst[2]},"
            f" k={worst[3]}) to {best[5]:.1%} (budget {best[0]}, {best[1]}-token answers, c={best[2]}, k={best[3]})"
            f" of the suite's modelled {gpu.name} energy"
        )
    for (answer, c, k), even in sorted(evens.items()):
        print(f"break-even acceptance length, {answer}-token answers, c={c}, k={k}: {even:.2f} (highest over budgets)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2, help="Built-in suite size (pages, documents, charts per kind).")
    parser.add_argument("--gpu", default="L4", help="Target GPU of the roofline.")
    parser.add_argument("--mtp", action="store_true", help="Print the MTP grid (issue 30) instead of the parts table.")
    args = parser.parse_args()
    if args.mtp:
        prompts = suite_prompts(args.size)
        print(f"built-in suite, size {args.size}: {len(prompts)} requests, {sum(p.images for p in prompts)} images")
        mtp_grid(prompts, args.gpu)
        return

    from ecoquant.energy.costs import checkpoint_costs, planned_costs
    from ecoquant.energy.gpus import gpu_spec
    from ecoquant.energy.roofline import RequestTokens, modelled_energy
    from ecoquant.fixtures.e4b_twin import e4b_twin_path

    gpu = gpu_spec(args.gpu)
    twin = e4b_twin_path()
    terms = {name: checkpoint_costs(twin) if preset is None else planned_costs(twin, preset) for name, preset in VARIANTS}
    prompts = suite_prompts(args.size)
    text = sum(p.text_tokens for p in prompts)
    images = sum(p.images for p in prompts)
    print(f"built-in suite, size {args.size}: {len(prompts)} requests, {text} text tokens, {images} images")
    for name, t in terms.items():
        d = t.decode
        print(f"{name}: decode reads {d.total / 2**30:.2f} GiB per step (decoder {d.decoder / 2**30:.2f}, head {d.head / 2**30:.2f})")
    print()
    print(f"| image budget | answer tokens | checkpoint | total J (modelled for {gpu.name}) | J per request"
          " | prefill text | prefill image | vision | decode | idle | vs bf16 |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for budget in BUDGETS:
        for answer in ANSWERS:
            requests = [RequestTokens(p.text_tokens, p.images * budget, p.images, answer) for p in prompts]
            base = None
            for name, t in terms.items():
                e = modelled_energy(requests, t, gpu)
                base = base or e.total_j
                s = e.shares()
                print(
                    f"| {budget} | {answer} | {name} | {e.total_j:.1f} | {e.total_j / len(requests):.2f}"
                    f" | {s['prefill_text']:.0%} | {s['prefill_image']:.0%} | {s['vision_encoder']:.0%}"
                    f" | {s['decode']:.0%} | {s['idle']:.0%} | {e.total_j / base - 1:+.1%} |"
                )
    print(f"\nseed measured (int4 Marlin vs bf16, its L4 suite): {SEED_MEASURED:+.0%}")


if __name__ == "__main__":
    main()
