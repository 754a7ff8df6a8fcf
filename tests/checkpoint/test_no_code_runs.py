"""Nothing a user is handed runs code: sharded checkpoint directories (torch.distributed.checkpoint's `.metadata`,
the non-tensor items in its shards, Lightning's `meta.pt`), checkpoints at a URL, PEFT adapters and delta bases
with pickled `.bin` weights. Each payload would create a marker file; each file is refused with a message naming it.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import shlex
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from pandallm.checkpoint.load import check_dcp_directory, load_weights_only
from pandallm.cli import cli
from pandallm.errors import ConfigError, ModelError
from pandallm.model.delta import apply_delta
from pandallm.model.module import PandaLLM
from pandallm.model.peft import load_adapter
from pandallm.model.presets import llama_tiny
from pandallm.tools.export import export
from tests.conftest import REPO, TOKENIZER_DIR, tiny_fit_args


class Payload:
    """Unpickled without restriction, it creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "the payload ran"


def write_dcp(directory: Path, state: dict, meta: object = None) -> Path:
    """A sharded checkpoint directory as FSDP2 writes one: DCP's shards and `.metadata`, and Lightning's `meta.pt`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)  # one process: the intent
        dcp.save(state, checkpoint_id=directory, no_dist=True)
    torch.save({} if meta is None else meta, directory / "meta.pt")
    return directory


def with_payload_metadata(directory: Path, marker: Path) -> Path:
    directory.mkdir()
    torch.save({}, directory / "meta.pt")
    (directory / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return directory


def model_state() -> dict[str, torch.Tensor]:
    """The state dict of `llama-tiny` under PandaLLM's keys, as FSDP2 checkpoints store it."""
    module = PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(TOKENIZER_DIR))
    module.configure_model()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_export_of_a_sharded_directory_does_not_unpickle_its_metadata(tmp_path: Path, marker: Path) -> None:
    directory = with_payload_metadata(tmp_path / "last.ckpt", marker)
    with pytest.raises(ModelError, match=r"last.ckpt/.metadata: not loadable as weights only.*GLOBAL posix.system"):
        export([f"--ckpt_path={directory}", f"--output={tmp_path / 'hf'}"])


def test_metadata_that_would_change_torch_itself_is_refused(tmp_path: Path) -> None:
    """No global but the metadata classes is called, and none is changed either: BUILD on a function would set its
    attributes for the whole process (here the cache of layouts that every later `torch.load` reads)."""
    layouts = torch.serialization._get_layout.cache
    directory = tmp_path / "last.ckpt"
    directory.mkdir()
    torch.save({}, directory / "meta.pt")
    (directory / ".metadata").write_bytes(
        b"\x80\x02ctorch.serialization\n_get_layout\n"  # the function itself, then its new attributes
        + pickle.dumps({"cache": {"torch.strided": "tampered"}}, protocol=2)[2:-1]
        + pickle.BUILD
        + pickle.STOP
    )
    try:
        with pytest.raises(ModelError, match=r"\.metadata: not loadable as weights only.*BUILD of function"):
            export([f"--ckpt_path={directory}", f"--output={tmp_path / 'hf'}"])
        assert torch.serialization._get_layout.cache is layouts
    finally:
        torch.serialization._get_layout.cache = layouts


def test_what_dcp_writes_reads_back_weights_only(tmp_path: Path) -> None:
    """The metadata classes allowed are those torch writes: tensors of several dtypes, optimizer param groups."""
    groups = {"lr": 1e-3, "betas": (0.9, 0.95), "foreach": None, "params": ["model.w"], "amsgrad": False}
    state = {
        "state_dict": {"model.w": torch.arange(6.0).view(2, 3), "model.b": torch.ones(3, dtype=torch.bfloat16)},
        "optimizer_0": {"state": {"model.w": {"step": torch.tensor(2.0)}}, "param_groups": [groups]},
    }
    directory = write_dcp(tmp_path / "ok.ckpt", state, meta={"global_step": 2})
    check_dcp_directory(directory)
    wanted = {"state_dict.model.w": torch.empty(2, 3), "optimizer_0.param_groups.0.betas": None}
    loaded = load_weights_only(directory, wanted)
    assert torch.equal(wanted["state_dict.model.w"], state["state_dict"]["model.w"])
    assert loaded["optimizer_0.param_groups.0.betas"] == (0.9, 0.95)


def test_the_metadata_torch_falls_back_to_is_checked_too(tmp_path: Path, marker: Path) -> None:
    """torch reads a rank's `__RANK.metadata` when reading `.metadata` fails: it is held to the same rules."""
    directory = write_dcp(tmp_path / "last.ckpt", {"state_dict": {"w": torch.zeros(2)}})
    (directory / "__0.metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ModelError, match=r"last.ckpt/__0.metadata: not loadable as weights only"):
        check_dcp_directory(directory)


FSDP2 = [
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=1",
    "--trainer.strategy.tensor_parallel_size=1",
    "--trainer.devices=1",
    "--trainer.max_steps=1",
    "--trainer.num_sanity_val_steps=0",
    "--export.enabled=false",
]


@pytest.mark.integration
@pytest.mark.parametrize("hidden_in", [".metadata", "a tensor's item", "meta.pt"])
def test_fsdp2_loads_a_sharded_directory_without_running_its_pickles(
    tmp_path: Path, marker: Path, hidden_in: str
) -> None:
    """`fit --ckpt_path DIR` (`validate` for `meta.pt`, which `fit` reads after the optimizer state) under
    `ModelParallelStrategy`, as a user resumes: the strategy's own load never gets to unpickle the payload."""
    directory, command, env = tmp_path / "last.ckpt", "fit", {}
    if hidden_in == ".metadata":
        with_payload_metadata(directory, marker)
        refused = r"last.ckpt/.metadata: not loadable as weights only"
    elif hidden_in == "a tensor's item":
        # Recorded in `.metadata` as a non-tensor item, the weight is loaded with `torch.load(weights_only=False)`.
        state = {**model_state(), "model.model.norm.weight": Payload(marker)}
        write_dcp(directory, {"state_dict": state})
        refused = r"last.ckpt \(item 'state_dict.model.model.norm.weight'\): not loadable as weights only"
    else:
        write_dcp(directory, {"state_dict": model_state()}, meta={"payload": Payload(marker)})
        command = "validate"
        # Lightning passes `weights_only=None` for `meta.pt`; this makes torch read None as False.
        env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
        refused = r"last.ckpt/meta.pt: not loadable as weights only"
    args = [sys.executable, "-m", "pandallm", command, *tiny_fit_args(tmp_path, *FSDP2), f"--ckpt_path={directory}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    # A user error: one message naming the file, no traceback (`--traceback` shows one).
    assert re.search(rf"pandallm {command}: error: .*{refused}", done.stderr), done.stderr[-3000:]
    assert "Traceback" not in done.stderr


@pytest.fixture
def served(tmp_path: Path, monkeypatch) -> Iterator[tuple[Path, str]]:
    """A directory served over http on 127.0.0.1, and its URL; torch.hub's download cache inside tmp_path."""
    root = tmp_path / "served"
    root.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.mark.integration
def test_checkpoint_urls_load_weights_only(tmp_path: Path, marker: Path, served: tuple[Path, str]) -> None:
    root, url = served
    fit = tiny_fit_args(tmp_path, "--trainer.max_steps=1", "--export.enabled=false")
    run = cli(["fit", *fit])
    run.trainer.save_checkpoint(root / "good.ckpt")
    # A pandallm checkpoint at a URL still loads: weights-only is all it needs.
    cli(["validate", *fit, f"--ckpt_path={url}/good.ckpt"])

    torch.save({"state_dict": {}, "pandallm": {}, "payload": Payload(marker)}, root / "evil.ckpt")
    for command in ("fit", "validate"):
        with pytest.raises(ModelError, match=rf"{url}/evil.ckpt: not loadable as weights only.*posix.system"):
            cli([command, *fit, f"--ckpt_path={url}/evil.ckpt"])

    with pytest.raises(ConfigError, match="weights_only: false: pandallm loads checkpoints weights-only"):
        cli(["validate", *fit, "--weights_only=false", f"--ckpt_path={root / 'good.ckpt'}"])


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**llama_tiny(), "vocab_size": 100}))


def test_a_pickled_adapter_is_refused_naming_it(tmp_path: Path, marker: Path) -> None:
    """peft reads `adapter_model.bin` weights-only: the payload does not run, and the user is told which adapter."""
    adapter = tmp_path / "adapter"
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        adapter, safe_serialization=False
    )
    weights = torch.load(adapter / "adapter_model.bin", weights_only=True)
    torch.save({**weights, "payload": Payload(marker)}, adapter / "adapter_model.bin")
    with pytest.raises(ModelError, match=rf"model.lora_adapter '{adapter}': not loadable as weights only"):
        load_adapter(tiny_llama(), str(adapter))


def test_a_pickled_delta_base_is_refused_naming_it(tmp_path: Path, marker: Path) -> None:
    """transformers reads `pytorch_model.bin` weights-only: the payload does not run; the message names the base."""
    base = tmp_path / "base"
    model = tiny_llama()
    model.config.save_pretrained(base)
    torch.save({**model.state_dict(), "payload": Payload(marker)}, base / "pytorch_model.bin")
    with pytest.raises(ModelError, match=rf"model.delta_from '{base}': not loadable as weights only"):
        apply_delta(tiny_llama(), str(base), str(tmp_path / "delta"))
