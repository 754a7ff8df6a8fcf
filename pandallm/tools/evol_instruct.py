"""`pandallm evol-instruct`: harder and rarer instructions evolved from a pool by a local model (Evol-Instruct, Xu et
al. 2023, WizardLM), each with the model's reply.

    pandallm evol-instruct --model checkpoints/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --seed_tasks dataset/formats/alpaca_en_zh.json --output runs/evol.jsonl --rounds 4

Each round evolves every instruction of the pool once, by one evolution drawn from the seed and the request:
in depth (add a constraint, deepen, concretize, ask for more reasoning steps) or in breadth (a new, rarer instruction
of the same domain). The model then answers the evolved instruction. The paper's elimination rules decide whether the
evolution is kept (`elimination`): it must add information (the paper asks ChatGPT whether the two instructions are
equal; here, without any API, an evolved instruction whose ROUGE-L F1 with the original is 0.9 or more, or that is
the same once spaces and case are ignored, adds none); the reply is not an apology ("sorry" in fewer than 80 words);
the reply is not only punctuation and stop words; the evolved instruction does not copy the evolving prompt's own
words ("given prompt", "rewritten prompt", ...). A kept evolution replaces its instruction in the pool; a failed one
leaves the instruction as it was for the next round. The output is Alpaca records, resumable
(`pandallm.tools.datagen`).
"""

from __future__ import annotations

import random
import re
import sys
from collections import Counter

from tqdm import tqdm

from pandallm.errors import ConfigError
from pandallm.suggest import tool_cli
from pandallm.tools.datagen import Generator, ResumableOutput, Similarity, located, read_tasks, tasks_digest, word_count

DEPTH = (
    "I want you to act as a prompt rewriter. Rewrite the given prompt into a more complex version that well-known AI "
    "systems find harder to handle, while it stays reasonable and a person can understand and answer it. Keep any "
    "table or code of the given prompt. Make it more complex this way: {method} The rewritten prompt may add only "
    "10 to 20 words to the given prompt, and must not mention the given prompt or the rewriting.\n\n"
    "#The Given Prompt#:\n{instruction}\n\n#Rewritten Prompt#:\n"
)
DEPTH_METHODS = {
    "constraints": "add one more constraint or requirement.",
    "deepening": "where it asks about an issue, widen and deepen the inquiry.",
    "concretizing": "replace general concepts with more specific ones.",
    "reasoning": "where a few simple steps of thought solve it, ask explicitly for reasoning in several steps.",
}
BREADTH = (
    "I want you to act as a prompt creator. Taking the given prompt as inspiration, create a brand-new prompt of the "
    "same domain, but rarer. Its length and difficulty are like the given prompt's, and a person can understand and "
    "answer it. It must not mention the given prompt or the creating.\n\n"
    "#The Given Prompt#:\n{instruction}\n\n#Created Prompt#:\n"
)
EVOLUTIONS = (*DEPTH_METHODS, "breadth")
# Words of the evolving prompts that an evolved instruction copies when the model did not understand the task.
TEMPLATE_WORDS = ("given prompt", "rewritten prompt", "created prompt", "#rewritten", "#created", "#the given")
STOP_WORDS = frozenset(
    ("a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "has", "have", "i", "in", "is", "it", "its",
     "of", "on", "or", "that", "the", "this", "to", "was", "were", "will", "with", "you", "your", "yes", "no", "ok",
     "okay", "的", "了", "是", "在", "和", "我", "你", "吗", "呢", "啊")
)  # fmt: skip
_WORD = re.compile(r"\w+", re.UNICODE)


def evolution_prompt(evolution: str, instruction: str) -> str:
    if evolution == "breadth":
        return BREADTH.format(instruction=instruction)
    return DEPTH.format(method=DEPTH_METHODS[evolution], instruction=instruction)


def evolved_text(response: str) -> str:
    """The instruction a rewriter's response holds: up to any next section marker, without a label it repeated."""
    text = re.sub(r"^\s*#?(Rewritten|Created) Prompt#?:?\s*", "", response, flags=re.IGNORECASE)
    return re.split(r"\n\s*#[^#\n]{1,40}#", "\n" + text)[0].strip()


def elimination(original: str, evolved: str, reply: str, similarity: Similarity) -> str | None:
    """Which of Evol-Instruct's elimination rules the evolution fails (None: kept)."""
    if not evolved.strip():
        return "empty evolution"
    if " ".join(evolved.lower().split()) == " ".join(original.lower().split()):
        return "no information gain (the same instruction)"
    scorer = similarity.scorer
    if scorer.score(original, evolved)["rougeL"].fmeasure >= 0.9:
        return "no information gain (ROUGE-L 0.9 or more with the original)"
    lowered = evolved.lower()
    if any(word in lowered for word in TEMPLATE_WORDS):
        return "copies the evolving prompt's words"
    if "sorry" in reply.lower() and word_count(reply) < 80:
        return "the reply is an apology"
    if not any(word.lower() not in STOP_WORDS for word in _WORD.findall(reply)):
        return "the reply is only punctuation and stop words"
    return None


def evol_instruct(
    model: str,
    seed_tasks: str,
    output: str,
    tokenizer: str | None = None,
    rounds: int = 4,
    max_requests: int | None = None,
    max_new_tokens: int = 512,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 42,
) -> dict:
    """Evolve instructions with a local model, and answer them.

    Args:
        model: A checkpoint directory, a `.gguf` file or a preset (with `tokenizer`) that pandallm loads.
        seed_tasks: The pool to evolve: Alpaca records or Self-Instruct's `seed_tasks.jsonl` layout (an instruction
            with an input is evolved as the two together).
        output: JSON Lines file of Alpaca records; an existing one (with its `.state.json`) is resumed.
        tokenizer: The model's tokenizer, where it is not in `model`.
        rounds: Evolution rounds over the whole pool (the paper: 4).
        max_requests: Stop after this many evolutions, kept or not (default: every round).
        max_new_tokens: Tokens generated for an evolution and for a reply.
        temperature: Sampling temperature (0: greedy).
        top_p: Nucleus sampling.
        seed: Every request's evolution and sampling follow from it and the request's number.
    """
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: at least 1")
    tasks = read_tasks(seed_tasks)
    pool = [f"{t.instruction}\n\n{t.input}" if t.input.strip() else t.instruction for t in tasks]
    # What decides each request (the pool is restored by request number: other seed tasks would scramble it);
    # --rounds and --max_requests may change: they say where to stop.
    settings = {"model": located(model), "tokenizer": located(tokenizer), "seed_tasks": tasks_digest(tasks),
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}  # fmt: skip
    store = ResumableOutput(output, settings)
    records, request = store.load()
    for record in records:  # the pool as the stopped run left it
        pool[record["request"] % len(pool)] = record["instruction"]
    total = rounds * len(pool) if max_requests is None else min(rounds * len(pool), max_requests)
    generate = Generator(model, tokenizer, max_new_tokens, temperature, top_p)
    similarity = Similarity()
    eliminated: Counter[str] = Counter()
    kept = len(records)
    progress = tqdm(total=total, initial=request, desc="evol-instruct", unit="evolution", file=sys.stderr)
    while request < total:
        index, round_ = request % len(pool), request // len(pool) + 1
        evolution = random.Random(f"{seed}:{request}").choice(EVOLUTIONS)
        sample = seed * 1_000_003 + request
        ((response, _),) = generate.complete([evolution_prompt(evolution, pool[index])], seed=sample)
        evolved = evolved_text(response)
        reply = generate.reply(evolved, seed=sample + 1) if evolved else ""
        reason = elimination(pool[index], evolved, reply, similarity)
        new = []
        if reason is None:
            new = [{"instruction": evolved, "input": "", "output": reply, "evolution": evolution, "round": round_}]
            pool[index] = evolved
            kept += 1
        else:
            eliminated[reason.split(" (")[0]] += 1
        store.append(request, new)
        progress.update(1)
        request += 1
    progress.close()
    summary = {"kept": kept, "requests": request, "eliminated": dict(eliminated), "output": output}
    print(f"pandallm evol-instruct: {summary}", file=sys.stderr)
    return summary


def main(args: list[str] | None = None) -> dict:
    return tool_cli(evol_instruct, args, "pandallm evol-instruct", as_positional=False)
