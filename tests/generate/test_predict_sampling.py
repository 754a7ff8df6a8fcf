"""`pandallm predict` (and its alias `generate`) with the sampling options: greedy answers equal plain
transformers' `generate(do_sample=False, num_beams=1)` on the exported model, prompt by prompt, although predict
batches them left-padded; a seed makes sampling reproducible; generating never moves the caller's RNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pandallm.cli import cli, main
from pandallm.errors import ConfigError
from pandallm.generate.options import GenerationOptions, generate
from pandallm.model import PandaLLM
from tests.conftest import TOKENIZER_DIR, tiny_fit_args, write_jsonl

pytestmark = pytest.mark.integration

PROMPTS = [
    {"input": "What is the capital of France?", "target": "Paris."},
    {"input": "Add 2 and 3."},
    {"input": "长城有多长？请告诉我。", "target": "长城全长两万多公里。"},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("run")
    fit = cli(["fit", *tiny_fit_args(root), "--trainer.max_steps=2"])
    log_dir = Path(fit.trainer.log_dir)
    prompts = write_jsonl(root / "prompts.jsonl", PROMPTS)
    return {
        "root": root,
        "ckpt": next((log_dir / "checkpoints").glob("*.ckpt")),
        "hf": log_dir / "hf",
        "prompts": prompts,
    }


def predict(run: dict[str, Path], out: Path, *extra: str, command: str = "predict") -> list[dict]:
    # `main` is the shell's entry point, which knows the `generate` alias; `cli` is LightningCLI's four commands.
    (main if command == "generate" else cli)(
        [
            command,
            f"--ckpt_path={run['ckpt']}",
            f"--data.predict_files=[{run['prompts']}]",
            f"--predictions.path={out}",
            "--model.max_new_tokens=6",
            "--data.per_device_eval_batch_size=2",  # prompts of different lengths share a left-padded batch
            "--data.num_workers=0",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={out.parent}",
            *extra,
        ]
    )
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def test_greedy_predict_equals_plain_transformers_generate_on_the_export(run: dict[str, Path], tmp_path: Path) -> None:
    predicted = predict(run, tmp_path / "greedy.jsonl")
    model = AutoModelForCausalLM.from_pretrained(run["hf"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(run["hf"])
    expected = []
    for record in PROMPTS:
        inputs = tokenizer(record["input"], return_tensors="pt")
        ids = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=6)
        expected.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    assert [p["output"] for p in predicted] == expected
    assert [p["input"] for p in predicted] == [r["input"] for r in PROMPTS]
    assert [p.get("reference") for p in predicted] == [r.get("target") for r in PROMPTS]


def test_a_seed_makes_sampling_reproducible(run: dict[str, Path], tmp_path: Path) -> None:
    sampling = ["--generation.do_sample=true", "--generation.temperature=2.0", "--generation.top_k=0"]
    first = predict(run, tmp_path / "a.jsonl", *sampling, "--generation.seed=7")
    again = predict(run, tmp_path / "b.jsonl", *sampling, "--generation.seed=7", command="generate")
    other = predict(run, tmp_path / "c.jsonl", *sampling, "--generation.seed=8")
    assert [p["output"] for p in first] == [p["output"] for p in again]
    assert [p["output"] for p in first] != [p["output"] for p in other]


def test_generating_leaves_the_callers_rng_where_it_was() -> None:
    module = PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR))
    module.configure_model()
    ids = torch.tensor([[1, 50, 60]])
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    options = GenerationOptions(do_sample=True)
    generate(module.model.eval(), module.tokenizer, ids, torch.ones_like(ids), options, max_new_tokens=3)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("temperature", 0.0, "generation.temperature must be > 0, got 0.0"),
        ("top_p", 1.5, "generation.top_p must be in (0, 1], got 1.5"),
        ("num_beams", 0, "generation.num_beams must be >= 1, got 0"),
    ],
)
def test_bad_sampling_options_name_the_option(option: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        GenerationOptions(**{option: value})
    assert str(error.value) == message


def test_chat_and_generation_load_a_checkpoint_with_its_rendering(run: dict[str, Path]) -> None:
    from safetensors.torch import load_file

    from pandallm.generate.load import load_for_generation

    loaded = load_for_generation(str(run["ckpt"]))
    assert loaded.rendering == {"template": "auto", "template_dir": None, "max_seq_length": 32}
    exported = load_file(run["hf"] / "model.safetensors")
    state = loaded.module.model.state_dict()
    assert all(torch.equal(state[k], exported[k]) for k in exported)
