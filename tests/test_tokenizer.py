"""Loading tokenizers: one that cannot encode text, or that is not the model's, is refused before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import LlamaConfig

from pandallm.data import PandaDataModule
from pandallm.errors import ModelError
from pandallm.model import PandaLLM
from pandallm.model.build import model_config
from pandallm.model.presets import llama_tiny
from pandallm.tokenizer import load_tokenizer
from tests.conftest import TOKENIZER_DIR


def test_a_directory_with_only_tokenizer_config_is_refused_naming_the_missing_files(tmp_path: Path) -> None:
    # transformers builds a LlamaTokenizer of <unk>, <s> and </s> from the config alone: every row would be BOS EOS.
    config_only = tmp_path / "tok"
    config_only.mkdir()
    shutil.copy(TOKENIZER_DIR / "tokenizer_config.json", config_only)
    expected = (
        rf"tokenizer '{config_only}' cannot encode text \(its 3 tokens are all special: .*\): the directory holds "
        r"\['tokenizer_config.json'\] but not tokenizer.json or tokenizer.model"
    )
    with pytest.raises(ModelError, match=expected):
        load_tokenizer(str(config_only))
    # As training meets it: the model (a preset sized by the tokenizer) and the data module both refuse it.
    with pytest.raises(ModelError, match=expected):
        PandaLLM(model_name_or_path="llama-tiny", tokenizer=str(config_only)).configure_model()
    with pytest.raises(ModelError, match=expected):
        len(PandaDataModule(tokenizer=str(config_only)).tokenizer)


def test_a_model_directory_whose_tokenizer_is_far_smaller_than_the_model_is_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(TOKENIZER_DIR, model_dir)  # the demo tokenizer, 3000 tokens
    LlamaConfig(vocab_size=32000).save_pretrained(model_dir)  # a model of another vocabulary
    with pytest.raises(ModelError, match=r"has 3000 tokens, far fewer than the 32000 of model '.*model'"):
        load_tokenizer(str(model_dir))
    LlamaConfig(vocab_size=3072).save_pretrained(model_dir)  # embeddings padded to a multiple of 1024: its own
    assert len(load_tokenizer(str(model_dir))) == 3000


def test_working_tokenizers_still_load() -> None:
    assert len(load_tokenizer(str(TOKENIZER_DIR))) == 3000
    assert len(load_tokenizer(str(TOKENIZER_DIR / "tokenizer.model"))) == 3000


def test_a_tokenizer_given_apart_from_a_model_far_larger_is_refused_before_loading_it(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    LlamaConfig(**{**llama_tiny(), "vocab_size": 32000}).save_pretrained(model_dir)  # config only: never read
    with pytest.raises(ModelError, match=r"has 3000 tokens, far fewer than the 32000 of model '.*model'"):
        PandaLLM(model_name_or_path=str(model_dir), tokenizer=str(TOKENIZER_DIR)).configure_model()


def test_code_shipped_with_a_tokenizer_or_a_model_never_runs(tmp_path: Path) -> None:
    """An `auto_map` makes transformers import the directory's own module; asked nothing (it would prompt on a
    terminal, and "y" would run it), pandallm refuses."""
    marker = tmp_path / "ran"
    shipped = f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaTokenizer, LlamaConfig\n"
    shipped += "class Custom(LlamaTokenizer): pass\nclass CustomConfig(LlamaConfig): model_type = 'custom'\n"
    tokenizer = tmp_path / "tok"
    shutil.copytree(TOKENIZER_DIR, tokenizer)
    (tokenizer / "custom.py").write_text(shipped)
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="Custom", auto_map={"AutoTokenizer": ["custom.Custom", None]})
    (tokenizer / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="custom code"):
        load_tokenizer(str(tokenizer))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "custom.py").write_text(shipped)
    (model_dir / "config.json").write_text(
        json.dumps({"model_type": "custom", "auto_map": {"AutoConfig": "custom.CustomConfig"}})
    )
    with pytest.raises(ModelError, match="custom code"):
        model_config(str(model_dir), 100, None)
    assert not marker.exists()
