"""`pandallm lm-eval`: benchmarks through lm-evaluation-harness on any model pandallm loads.

    pandallm lm-eval --model runs/tiny/version_0/hf --tasks dataset/eval/questions.jsonl
    pandallm lm-eval --model runs/x/checkpoints/last.ckpt --tasks '[my_tasks/arith.yaml, hellaswag]' --limit 100

The model is loaded as `pandallm chat` loads it (a run's `hf/` export, a PEFT adapter directory on its base, a
Lightning checkpoint, a `.gguf` file, a hub id) and handed to the harness's Hugging Face model (`HFLM`). Tasks are
question files, harness task YAML files, or harness task names (`pandallm.eval.harness`). The harness's request cache
(`use_cache`, a SQLite file of pickles) is never used: a cache file handed over could run code.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from pandallm.errors import ConfigError, PandaError
from pandallm.generate.arguments import add_device_argument, add_model_arguments, resolve_device


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="pandallm lm-eval", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_model_arguments(parser)
    parser.add_argument(
        "--tasks",
        type=list[str],
        required=True,
        help="Question files (.json/.jsonl/.parquet), harness task .yaml files or directories, harness task names.",
    )
    parser.add_argument("--num_fewshot", type=int | None, default=None, help="Examples shown before each question.")
    parser.add_argument("--limit", type=int | None, default=None, help="Questions per task at most (a quick look).")
    parser.add_argument("--batch_size", type=int, default=8, help="Requests per forward pass.")
    parser.add_argument(
        "--max_new_tokens", type=int, default=64, help="Tokens generated per answer of a question file."
    )
    parser.add_argument("--apply_chat_template", type=bool, default=False, help="Prompt through the chat template.")
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=1234, help="The harness's seeds (few-shot draws, sampling).")
    parser.add_argument("--output", type=str | None, default=None, help="Write the results (and each answer) as JSON.")
    return parser


def run(cfg: Any) -> dict[str, Any]:
    """Evaluate; the harness's results (`results`: per task, metric -> value), plus `samples` with `--output`."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ConfigError("pandallm lm-eval needs lm-evaluation-harness: pip install 'pandallm[eval]'") from error
    from pandallm.eval.harness import resolve_tasks
    from pandallm.generate.load import load_for_generation

    if cfg.batch_size < 1 or cfg.max_new_tokens < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise ConfigError("--batch_size, --max_new_tokens and --limit are at least 1")
    with tempfile.TemporaryDirectory(prefix="pandallm-lm-eval-") as workdir:
        # The tasks first: a malformed question file or an unknown task name fails before a model is loaded.
        tasks, include = resolve_tasks(cfg.tasks, Path(workdir), cfg.max_new_tokens)
        named = [t for t in tasks if isinstance(t, str)]
        # The harness's own task index (thousands of YAML files, seconds to read) only where a task is named.
        manager = TaskManager(include_path=include or None, include_defaults=bool(named))
        unknown = [t for t in named if t not in manager.all_tasks]
        if unknown:
            raise ConfigError(
                f"--tasks: no harness task named {', '.join(map(repr, unknown))} (`lm_eval ls tasks` lists them; a "
                "question file or a task .yaml is given by its path)"
            )
        loaded = load_for_generation(cfg.model, "--model", cfg.base, cfg.tokenizer)
        device = resolve_device(cfg.device)
        model = loaded.module.model.to(device).eval()
        lm = HFLM(pretrained=model, tokenizer=loaded.module.tokenizer, batch_size=cfg.batch_size, device=str(device))
        try:
            results = simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=cfg.num_fewshot,
                limit=cfg.limit,
                task_manager=manager,
                apply_chat_template=cfg.apply_chat_template,
                log_samples=cfg.output is not None,
                bootstrap_iters=0,  # no standard errors: thousands of resamplings per metric, for a figure not shown
                random_seed=cfg.seed,
                numpy_random_seed=cfg.seed,
                torch_random_seed=cfg.seed,
                fewshot_random_seed=cfg.seed,
            )
        except PandaError:
            raise
        except (ConnectionError, OSError) as error:  # a hub task's data, offline
            raise ConfigError(
                f"--tasks: a task's data could not be read ({' '.join(str(error).split())[:300]}); hub tasks need "
                "the network or a filled Hugging Face cache, question files do not"
            ) from error
    return results


def table(results: dict[str, Any]) -> str:
    lines = []
    for task, metrics in results["results"].items():
        shown = [
            f"{name.split(',')[0]} {value:.4f}"
            for name, value in metrics.items()
            if "," in name and "stderr" not in name and isinstance(value, int | float)
        ]
        count = results.get("n-samples", {}).get(task, {}).get("effective")
        lines.append(f"  {task}: {', '.join(shown)}" + (f" ({count} questions)" if count is not None else ""))
    return "\n".join(lines)


def main(args: list[str] | None = None) -> dict[str, Any]:
    cfg = build_parser().parse_args(args)
    results = run(cfg)
    print(f"pandallm lm-eval: {cfg.model}")
    print(table(results))
    if cfg.output:
        kept = {key: results[key] for key in ("results", "n-samples", "configs", "samples") if key in results}
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.output).write_text(json.dumps(kept, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
        print(f"pandallm lm-eval: wrote {cfg.output}")
    return results
