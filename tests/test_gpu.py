"""GPU-only paths, on one CUDA GPU: DeepSpeed ZeRO-2 / ZeRO-3 / ZeRO-3 with CPU offload and Lightning's FSDP train
the same steps as a plain single-GPU run, their checkpoints resume and export to one Hugging Face model; QLoRA
quantizes its base on the GPU and trains. Skipped, saying why, where there is no GPU (or no deepspeed).

On one GPU nothing is sharded across ranks, but every piece of each strategy runs: DeepSpeed's engine, its
partitioned optimizer, its checkpoint layout and ZeRO-3's gathering; FSDP's flat parameters and sharded
checkpoints. The two-rank behaviour is the CPU tests' (tests/test_parallel.py, FSDP2 and DDP on gloo).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pandallm.tools.export import export
from tests.conftest import TOKENIZER_DIR
from tests.test_parallel import assert_same_training
from tests.test_resume import final_weights, fit, losses, pretraining_data

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")

GPU = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=32-true"]
SAME_BATCHES = [
    "--trainer.max_steps=6",
    "--data.shuffle=false",
    "--data.per_device_train_batch_size=4",
    "--model.config_overrides={attention_dropout: 0.0}",
    "--trainer.gradient_clip_val=0.5",  # every GPU recipe clips; each strategy clips its own way
]
# fp32 on a GPU, against the same run under another strategy: other kernels and reduction orders (DeepSpeed's flat
# fp32 partitions, its CPUAdam under offload), not other arithmetic.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def strategy(class_name: str, **init_args) -> str:
    return "--trainer.strategy=" + json.dumps({"class_path": class_name, "init_args": init_args})


DEEPSPEED = "lightning.pytorch.strategies.DeepSpeedStrategy"
ZERO = {
    name: strategy(DEEPSPEED, config=f"configs/deepspeed/{name}.json") for name in ("zero2", "zero3", "zero3_offload")
}
LAYER = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"


def fsdp(activation_checkpointing: bool) -> str:
    checkpointing = {"activation_checkpointing_policy": [LAYER]} if activation_checkpointing else {}
    return strategy(
        "lightning.pytorch.strategies.FSDPStrategy",
        sharding_strategy="FULL_SHARD",
        auto_wrap_policy=[LAYER],
        state_dict_type="sharded",
        **checkpointing,
    )


@pytest.fixture(scope="module")
def single_gpu(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    """A plain single-GPU run, from a Hugging Face checkpoint on disk (as users start: `from_pretrained`, which
    ZeRO-3 must route through DeepSpeed's partitioning)."""
    root = tmp_path_factory.mktemp("gpu")
    data = pretraining_data(root)
    base = root / "base"
    export(["--model.model_name_or_path=llama-tiny", f"--model.tokenizer={TOKENIZER_DIR}", f"--output={base}"])
    run(root, "single", (root, data, base))
    return root, data, base


def run(root: Path, name: str, setup: tuple[Path, dict[str, str], Path], *extra: str, expect_code: int = 0):
    """`name`, trained like the single-GPU reference of `setup`, with `extra` options."""
    _, data, base = setup
    return fit(
        root, name, data, *GPU, *SAME_BATCHES, f"--model.model_name_or_path={base}", *extra, expect_code=expect_code
    )


def assert_exports_like_fit_end(root: Path, name: str) -> None:
    """`pandallm export` of the run's last checkpoint (taken at its last step) gives the weights of its own export
    at the end of fit."""
    last = root / name / "checkpoints" / "last.ckpt"
    export([f"--ckpt_path={last}", f"--output={root / name / 'exported'}"])
    exported = AutoModelForCausalLM.from_pretrained(root / name / "exported").state_dict()
    at_fit_end = final_weights(root, name)
    for key in at_fit_end:
        torch.testing.assert_close(exported[key], at_fit_end[key], rtol=0, atol=0)


def assert_resumes_like(root: Path, straight: str, setup, *args: str) -> None:
    """Run `straight` again with `args`, killed after step 3 and resumed from its last checkpoint (step 2): the same
    per-step losses."""
    kill = ["--trainer.callbacks+=tests.helpers.KillAtStep", "--trainer.callbacks.step=3"]
    run(root, "resumed", setup, *args, *kill, expect_code=-9)
    run(root, "resumed", setup, *args, "--ckpt_path=last")
    resumed, uninterrupted = losses(root, "resumed"), losses(root, straight)
    assert sorted(resumed) == sorted(uninterrupted)
    torch.testing.assert_close(
        torch.tensor([float(resumed[k]) for k in sorted(resumed)]),
        torch.tensor([float(uninterrupted[k]) for k in sorted(uninterrupted)]),
        **TOLERANCE,
    )


@needs_deepspeed
@pytest.mark.parametrize("stage", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_trains_like_one_gpu_resumes_and_exports(single_gpu, tmp_path: Path, stage: str) -> None:
    reference = single_gpu[0]
    run(tmp_path, stage, single_gpu, ZERO[stage])
    # Under ZeRO-3 the weights compared were gathered onto rank 0 by the export at the end of fit.
    assert_same_training(tmp_path, stage, reference, TOLERANCE)
    assert (tmp_path / stage / "checkpoints" / "last.ckpt" / "checkpoint").is_dir()  # DeepSpeed's own layout
    assert_exports_like_fit_end(tmp_path, stage)

    assert_resumes_like(tmp_path, stage, single_gpu, ZERO[stage])


@needs_deepspeed
def test_deepspeed_lora_checkpoints_hold_the_adapters_only_and_resume(single_gpu, tmp_path: Path) -> None:
    lora = [ZERO["zero2"], "--model.use_lora=true", "--model.lora_r=8", "--model.lora_dropout=0.0"]
    run(tmp_path, "lora", single_gpu, *lora)
    [states] = (tmp_path / "lora" / "checkpoints" / "last.ckpt" / "checkpoint").glob("*model_states.pt")
    saved = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert saved and all("lora_" in name for name in saved)  # the frozen base stays out

    assert_resumes_like(tmp_path, "lora", single_gpu, *lora)


@needs_deepspeed
def test_deepspeed_refuses_to_skip_nonfinite_steps(single_gpu, tmp_path: Path) -> None:
    done = run(tmp_path, "skip", single_gpu, ZERO["zero2"], "--model.nonfinite=skip", expect_code=1)
    assert "model.nonfinite: skip is not possible under DeepSpeed" in done.stderr


@needs_deepspeed
@pytest.mark.parametrize(
    ("poison", "message"),
    [
        ("NaNForwardAtStep", "step 2: non-finite loss on 1 rank(s)"),
        ("NaNGradientAtStep", "step 2: gradient norm nan under DeepSpeed"),  # the loss is finite: after the step
    ],
)
def test_deepspeed_stops_on_a_nonfinite_loss_or_gradient_naming_the_step(
    single_gpu, tmp_path: Path, poison: str, message: str
) -> None:
    nan = [f"--trainer.callbacks+=tests.helpers.{poison}", "--trainer.callbacks.step=2"]
    done = run(tmp_path, "nan", single_gpu, ZERO["zero2"], *nan, expect_code=1)
    assert message in done.stderr


@needs_deepspeed
def test_lightning_builtin_zero3_config_still_exports_at_the_end_of_fit(single_gpu, tmp_path: Path) -> None:
    """Lightning's `deepspeed_stage_3` leaves the 16-bit gather off; pandallm turns it on for the export."""
    run(tmp_path, "builtin", single_gpu, "--trainer.strategy=deepspeed_stage_3")
    assert_same_training(tmp_path, "builtin", single_gpu[0], TOLERANCE)


def test_compiled_decoder_layers_train_like_eager_ones_on_the_gpu(single_gpu, tmp_path: Path) -> None:
    run(tmp_path, "compiled", single_gpu, "--model.compile=true")
    # Inductor's fused GPU kernels round differently from eager ones: the same training, not the same bits.
    assert_same_training(tmp_path, "compiled", single_gpu[0], {"rtol": 1e-3, "atol": 1e-4})


@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_lightning_fsdp_trains_like_one_gpu_and_its_sharded_checkpoint_exports(
    single_gpu, tmp_path: Path, activation_checkpointing: bool
) -> None:
    reference = single_gpu[0]
    run(tmp_path, "fsdp", single_gpu, fsdp(activation_checkpointing))
    assert_same_training(tmp_path, "fsdp", reference, TOLERANCE)
    assert_exports_like_fit_end(tmp_path, "fsdp")


def test_qlora_quantizes_on_the_gpu_trains_and_exports_its_adapter(single_gpu, tmp_path: Path) -> None:
    from peft import PeftModel

    _, data, _ = single_gpu
    qlora = ["--model.use_lora=true", "--model.lora_r=8", "--model.use_quant=true", "--model.bit_training=4"]
    bf16 = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-true"]
    fit(tmp_path, "qlora", data, *bf16, *qlora, "--trainer.max_steps=12", "--model.learning_rate=1e-3")
    trained = losses(tmp_path, "qlora")
    assert float(trained[11]) < float(trained[0])
    [adapter] = sorted((tmp_path / "qlora").glob("version_*/hf"))
    assert (adapter / "adapter_config.json").is_file()
    base_dir = tmp_path / "base"  # a base of the adapter's shape: plain peft must load the adapter onto it
    export(["--model.model_name_or_path=llama-tiny", f"--model.tokenizer={TOKENIZER_DIR}", f"--output={base_dir}"])
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    trained_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert trained_b and all(v.abs().sum() > 0 for v in trained_b.values())  # B starts at zero: it was trained
    loaded = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(loaded) == len(trained_b)
    for name, value in trained_b.items():  # peft only warns about keys it cannot place: check they all arrived
        [match] = [p for n, p in loaded.items() if n.replace(".default", "").endswith(name.split("base_model.")[-1])]
        torch.testing.assert_close(match.detach().cpu().to(value.dtype), value, rtol=0, atol=0)
