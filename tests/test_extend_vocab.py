"""`pandallm extend-vocab`: the merged tokenizer (ids, symbols, compression, sentencepiece == transformers), its
errors, and a LoRA run with it that trains the new rows and exports adapters and a merged checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from peft import PeftModel
from safetensors import safe_open
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from pandallm.cli import cli, main
from pandallm.errors import ConfigError, DatasetError, ModelError
from pandallm.model.build import grow_embeddings
from pandallm.model.presets import llama_tiny
from pandallm.tokenizer import load_tokenizer
from pandallm.tools.extend_vocab import corpus_texts, extend_vocab
from tests.conftest import REPO, TOKENIZER_DIR, tiny_fit_args, write_jsonl

ZH_RECORDS = REPO / "dataset" / "instruction_tuning" / "belle_style_zh.json"
ZH_DOCUMENTS = REPO / "dataset" / "pretraining" / "baike_zh.jsonl"
SYMBOLS = ["<tool>", "</tool>", "深度学习", "ChatGPT"]
# Not in the corpus: the new pieces must carry over to unseen Chinese text.
UNSEEN = "黄河与长江是中国最重要的两条河流，两岸的城市在历史上十分繁荣。"


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict:
    """The shipped demo tokenizer extended with pieces learned from the shipped Chinese samples, and symbols."""
    root = tmp_path_factory.mktemp("extend_vocab")
    symbols = root / "symbols.json"
    symbols.write_text(json.dumps(SYMBOLS, ensure_ascii=False), encoding="utf-8")
    report = extend_vocab(
        inputs=[str(ZH_RECORDS), str(ZH_DOCUMENTS)],
        output=str(root / "merged"),
        base_tokenizer=str(TOKENIZER_DIR),
        vocab_size=4000,
        user_symbols=str(symbols),
    )
    return {"root": root, "dir": root / "merged", "report": report}


def _proto(path: Path) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def test_the_merged_tokenizer_encodes_chinese_in_fewer_tokens(merged) -> None:
    base = LlamaTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tokenizer = AutoTokenizer.from_pretrained(str(merged["dir"]))  # plain transformers, no pandallm
    assert isinstance(tokenizer, LlamaTokenizer)
    ids = tokenizer(UNSEEN, add_special_tokens=False)["input_ids"]
    assert len(ids) < 0.9 * len(base(UNSEEN, add_special_tokens=False)["input_ids"])
    assert max(ids) >= len(base)  # new pieces at work
    assert tokenizer.decode(ids) == UNSEEN
    report = merged["report"]
    assert (
        report.base_size == 3000 and report.merged_size == len(tokenizer) == 3000 + len(SYMBOLS) + report.pieces_added
    )
    # Measured: 1.021 -> 0.775 tokens per character on the corpus (vocab_size 4000, 2002 pieces added).
    assert report.tokens_per_char_after < 0.85 * report.tokens_per_char_before


def test_old_pieces_keep_their_ids_and_no_piece_is_duplicated(merged) -> None:
    base, new = _proto(TOKENIZER_DIR / "tokenizer.model"), _proto(merged["dir"] / "tokenizer.model")
    assert [(p.piece, p.type, p.score) for p in new.pieces[: len(base.pieces)]] == [
        (p.piece, p.type, p.score) for p in base.pieces
    ]
    pieces = [p.piece for p in new.pieces]
    assert len(set(pieces)) == len(pieces)
    base_vocab = load_tokenizer(str(TOKENIZER_DIR)).get_vocab()
    vocab = AutoTokenizer.from_pretrained(str(merged["dir"])).get_vocab()
    assert all(vocab[token] == i for token, i in base_vocab.items())
    assert sorted(vocab.values()) == list(range(len(pieces)))


def test_user_symbols_are_single_tokens(merged) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(merged["dir"]))
    processor = spm.SentencePieceProcessor(model_file=str(merged["dir"] / "tokenizer.model"))
    for symbol in SYMBOLS:
        [symbol_id] = tokenizer.convert_tokens_to_ids([symbol])
        assert symbol_id >= 3000
        assert symbol_id in tokenizer(f"用{symbol}做研究", add_special_tokens=False)["input_ids"]
        assert symbol_id in processor.encode(f"用{symbol}做研究")
    assert merged["report"].symbols_added == len(SYMBOLS)


def test_sentencepiece_and_transformers_tokenize_the_merged_model_alike(merged) -> None:
    # The appended pieces' scores order sentencepiece's merges as transformers orders them (by id). The text as it
    # is, full-width punctuation included: the demo tokenizer, like LLaMA's, has no normalizer.
    lines = corpus_texts([str(ZH_RECORDS)])
    assert any("，" in line for line in lines)
    tokenizer = AutoTokenizer.from_pretrained(str(merged["dir"]))
    processor = spm.SentencePieceProcessor(model_file=str(merged["dir"] / "tokenizer.model"))
    assert tokenizer(lines, add_special_tokens=False)["input_ids"] == processor.encode(lines)


def test_the_command_reads_text_files_and_reports_on_the_eval_text(tmp_path, capsys) -> None:
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "zh.txt").write_text(ZH_DOCUMENTS.read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "eval.txt").write_text(UNSEEN + "\n", encoding="utf-8")
    out = tmp_path / "tok"
    args = [f"--inputs=[{tmp_path / 'corpus'}]", f"--eval_inputs=[{tmp_path / 'eval.txt'}]", f"--output={out}"]
    main(["extend-vocab", *args, f"--base_tokenizer={TOKENIZER_DIR / 'tokenizer.model'}", "--vocab_size=3000"])
    printed = capsys.readouterr().out
    assert f"tokens per character on {len(UNSEEN)} characters" in printed
    assert "corpus pieces added" in printed
    assert len(LlamaTokenizer.from_pretrained(str(out))) > 3000


def test_the_base_tokenizers_added_tokens_keep_their_ids_and_its_chat_template_is_kept(tmp_path) -> None:
    base = load_tokenizer(str(TOKENIZER_DIR))
    base.add_special_tokens({"pad_token": "<pad>"})  # id 3000, past the sentencepiece model, as LLaMA-2 chat's pads
    base.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.model").write_bytes((TOKENIZER_DIR / "tokenizer.model").read_bytes())
    extend_vocab([str(ZH_DOCUMENTS)], str(tmp_path / "out"), str(tmp_path / "base"), vocab_size=3000)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 3000)
    assert tokenizer.chat_template == base.chat_template
    assert len(tokenizer) > 3001


def test_new_rows_start_at_the_mean_of_the_old_ones() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**llama_tiny(), vocab_size=3000))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert grow_embeddings(model, 3100) == 100
    new_in, new_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert new_in.shape[0] == new_out.shape[0] == 3100 and model.config.vocab_size == 3100
    assert torch.equal(new_in[:3000], old_in) and torch.equal(new_out[:3000], old_out)
    # transformers samples around the mean with 1e-9 of the old covariance: equal to the mean up to ~1e-5 std.
    for new, old in ((new_in, old_in), (new_out, old_out)):
        spread = (new[3000:] - old.mean(0)).abs().max()
        assert spread < 1e-3 * old.std(), spread


# ---- errors ----------------------------------------------------------------------------------------------------


def test_a_missing_corpus_is_named(tmp_path) -> None:
    with pytest.raises(DatasetError, match=r"--inputs '.*nowhere\.txt': no such file or directory"):
        extend_vocab(inputs=[str(tmp_path / "nowhere.txt")], output=str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no .json, .jsonl or .txt files"):
        extend_vocab(inputs=[str(tmp_path / "empty")], output=str(tmp_path / "out"))


def test_a_tokenizer_that_is_not_sentencepiece_is_refused(tmp_path) -> None:
    byte_level = tmp_path / "byte_level"
    byte_level.mkdir()
    (byte_level / "tokenizer.json").write_text("{}")
    (byte_level / "tokenizer_config.json").write_text("{}")
    corpus = [str(ZH_DOCUMENTS)]
    with pytest.raises(ModelError, match=r"is not sentencepiece-based: it has no tokenizer\.model \(found: "):
        extend_vocab(inputs=corpus, output=str(tmp_path / "out"), base_tokenizer=str(byte_level))
    (tmp_path / "garbage.model").write_bytes(b"\xff\xfe not a model")
    with pytest.raises(ModelError, match="is not a sentencepiece model"):
        extend_vocab(inputs=corpus, output=str(tmp_path / "out"), base_tokenizer=str(tmp_path / "garbage.model"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('["<a>", "<b>"', r"symbols\.json:1: not valid JSON"),
        ('{"symbols": ["<a>"]}', r"symbols\.json': holds a dict; expected a JSON list of strings"),
        ('["<a>", 42]', r"symbols\.json': entry 1 \(42\) is not a non-empty string"),
        ('["<a>", ""]', r"symbols\.json': entry 1 \(\"\"\) is not a non-empty string"),
        ('["<a>", "two words"]', r"symbols\.json': entry 1 \(\"two words\"\) contains whitespace"),
    ],
)
def test_a_malformed_symbols_file_names_the_file_and_the_entry(tmp_path, content: str, message: str) -> None:
    (tmp_path / "symbols.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        extend_vocab(
            inputs=[str(ZH_DOCUMENTS)], output=str(tmp_path / "out"), user_symbols=str(tmp_path / "symbols.json")
        )


def test_llmbox_user_defined_symbols_layout_is_read_as_the_list(tmp_path) -> None:
    from pandallm.tools.sentencepiece_merge import read_symbols

    (tmp_path / "user_defined_symbols.json").write_text(
        json.dumps({"list": ["<tool>", "深度学习"]}, ensure_ascii=False)
    )
    assert read_symbols(str(tmp_path / "user_defined_symbols.json")) == ["<tool>", "深度学习"]
    (tmp_path / "user_defined_symbols.json").write_text('{"list": ["<tool>", "two words"]}')
    with pytest.raises(
        ConfigError, match=r"user_defined_symbols\.json': entry 1 \(\"two words\"\) contains whitespace"
    ):
        read_symbols(str(tmp_path / "user_defined_symbols.json"))
    with pytest.raises(ConfigError, match=r"--user_symbols '.*': a directory, not the JSON file of symbols"):
        read_symbols(str(tmp_path))  # it said "no such file"


def test_a_vocab_size_the_corpus_cannot_fill_is_refused(tmp_path) -> None:
    (tmp_path / "tiny.txt").write_text("长城\n")
    with pytest.raises(ConfigError, match=r"--vocab_size 20000: sentencepiece cannot train on this corpus: .*too high"):
        extend_vocab(inputs=[str(tmp_path / "tiny.txt")], output=str(tmp_path / "out"))


# ---- training with the merged tokenizer ---------------------------------------------------------------------


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.integration
def test_lora_with_the_merged_tokenizer_trains_the_new_rows_and_both_exports_reproduce_it(merged) -> None:
    root, tokenizer_dir = merged["root"] / "lora", merged["dir"]
    vocab_size = len(load_tokenizer(str(tokenizer_dir)))
    records = json.loads(ZH_RECORDS.read_text(encoding="utf-8"))
    write_jsonl(root / "it" / "a.jsonl", records[:16])  # tiny_fit_args keeps existing data
    write_jsonl(root / "val.jsonl", records[16:20])
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**llama_tiny(), vocab_size=3000)).save_pretrained(root / "base")  # base vocab
    args = tiny_fit_args(
        root,
        f"--model.model_name_or_path={root / 'base'}",
        f"--model.tokenizer={tokenizer_dir}",
        "--model.use_lora=true",
        "--model.lora_r=4",
        "--model.modules_to_save=[embed_tokens, lm_head]",
        "--trainer.max_steps=8",
    )
    built = cli(args, run=False)
    module = built.model
    module.configure_model()
    before = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    built.trainer.fit(module, built.datamodule)

    trained = {name: p for name, p in module.named_parameters() if p.requires_grad}
    embed = next(n for n in trained if "embed_tokens.modules_to_save" in n)
    head = next(n for n in trained if "lm_head.modules_to_save" in n)
    assert trained[embed].shape[0] == trained[head].shape[0] == vocab_size
    seen = sorted({i for r in records[:16] for i in load_tokenizer(str(tokenizer_dir))(r["input"])["input_ids"]})
    new_seen = [i for i in seen if i >= 3000]
    assert new_seen  # the training data uses new pieces, and their rows were trained
    assert not torch.equal(trained[embed][new_seen], before[embed][new_seen])
    assert not torch.equal(trained[head][3000:], before[head][3000:])

    ids = torch.tensor([[1, *load_tokenizer(str(tokenizer_dir))(UNSEEN, add_special_tokens=False)["input_ids"], 2]])
    assert ids.max() >= 3000
    ours = logits(module.model, ids)
    hf = Path(built.trainer.log_dir) / "hf"  # adapter_only, written at the end of fit
    with safe_open(hf / "adapter_model.safetensors", "pt") as f:
        saved = {name: f.get_slice(name).get_shape() for name in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    # Each embedding once, whole (the trained modules_to_save), not also the frozen original and the base's copy.
    embeddings = {name: shape for name, shape in saved.items() if "embed_tokens" in name or "lm_head" in name}
    assert sorted(embeddings) == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    assert all(shape[0] == vocab_size for shape in embeddings.values())
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    base.resize_token_embeddings(vocab_size)  # as the run did before adding adapters (README)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base, hf), ids), ours, rtol=0, atol=1e-6)
    merged_model = AutoModelForCausalLM.from_pretrained(module.export_hf(root / "merged", "merge"))
    assert merged_model.get_input_embeddings().num_embeddings == vocab_size
    torch.testing.assert_close(logits(merged_model, ids), ours, rtol=0, atol=1e-5)
