"""The data module on real files: exact rows, the content-keyed cache, splits, batching and errors."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.trainer.states import TrainerFn

import pandallm.data.datamodule as datamodule_module
from pandallm.data import PandaDataModule
from pandallm.data.encode import IGNORE_INDEX
from pandallm.errors import DataFormatError, DatasetError
from tests.conftest import DOCUMENTS, INSTRUCTIONS, write_jsonl


def make(tokenizer_dir: str, **kwargs) -> PandaDataModule:
    defaults = {"tokenizer": tokenizer_dir, "max_seq_length": 64, "num_workers": 0}
    return PandaDataModule(**{**defaults, **kwargs})


def ready(dm: PandaDataModule, stage: str = "fit") -> PandaDataModule:
    dm.prepare_data()
    dm.setup(stage)
    return dm


def test_instruction_row_golden(tmp_path: Path, tokenizer_dir: str) -> None:
    # Golden ids of the shipped demo tokenizer, reviewed piece by piece:
    # prompt: ▁What ▁is ▁the ▁c ap it al ▁of ▁F r ance ?   target: ▁P ar is .   then </s>
    write_jsonl(tmp_path / "it" / "a.jsonl", [{"input": "What is the capital of France?", "target": "Paris."}])
    dm = ready(
        make(
            tokenizer_dir,
            instruction_tuning_data_dir=str(tmp_path / "it"),
            pretraining_data_dir=None,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    row = dm.datasets["train"][0]
    prompt = [1, 454, 299, 263, 270, 400, 289, 288, 284, 533, 1205, 575, 1259]
    target = [406, 278, 275, 1221, 2]
    assert row["input_ids"] == prompt + target
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + target
    assert dm.tokenizer.convert_ids_to_tokens(target) == ["▁P", "ar", "is", ".", "</s>"]


def test_pretraining_blocks_cover_every_document_token(tmp_path: Path, tokenizer_dir: str) -> None:
    write_jsonl(tmp_path / "pt" / "d.jsonl", DOCUMENTS)
    dm = ready(
        make(
            tokenizer_dir,
            instruction_tuning_data_dir=None,
            pretraining_data_dir=str(tmp_path / "pt"),
            cache_dir=str(tmp_path / "cache"),
            max_seq_length=32,
        )
    )
    tok = dm.tokenizer
    expected = []
    for doc in DOCUMENTS:
        text = f"{doc['title']}\n{doc['content']}" if doc["title"] else doc["content"]
        expected += [tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id]
    rows = dm.datasets["train"]
    assert [t for ids in rows["input_ids"] for t in ids] == expected
    assert all(len(ids) == 32 for ids in rows["input_ids"][:-1])
    assert rows["labels"] == rows["input_ids"]


def test_second_run_loads_the_cache_without_tokenizing(data_dirs, tokenizer_dir, monkeypatch) -> None:
    first = ready(make(tokenizer_dir, **data_dirs))

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(datamodule_module, "tokenize_instructions", fail)
    monkeypatch.setattr(datamodule_module, "tokenize_documents", fail)
    second = ready(make(tokenizer_dir, **data_dirs))
    assert second.datasets["train"]["input_ids"] == first.datasets["train"]["input_ids"]
    with pytest.raises(AssertionError, match="tokenized again"):  # a new setting is a new key
        ready(make(tokenizer_dir, **data_dirs, max_seq_length=48))


def test_changing_a_file_rebuilds(data_dirs, tokenizer_dir) -> None:
    first = ready(make(tokenizer_dir, **data_dirs))
    write_jsonl(Path(data_dirs["instruction_tuning_data_dir"]) / "c.jsonl", [{"input": "New?", "target": "Yes."}])
    second = ready(make(tokenizer_dir, **data_dirs))
    assert len(second.datasets["train"]) == len(first.datasets["train"]) + 1


def test_val_fraction_holds_out_records_and_val_files_are_detected(data_dirs, tokenizer_dir, tmp_path) -> None:
    val_file = write_jsonl(tmp_path / "val.jsonl", [{"input": "Held?", "target": "Out."}])
    full = ready(make(tokenizer_dir, **data_dirs))
    split = ready(make(tokenizer_dir, **data_dirs, val_fraction=0.2, val_files=[str(val_file)]))
    assert len(split.datasets["train"]) < len(full.datasets["train"])
    assert len(split.datasets["validation"]) > 1
    train_rows = {tuple(ids) for ids in split.datasets["train"]["input_ids"]}
    val_only = [ids for ids in split.datasets["validation"]["input_ids"] if tuple(ids) not in train_rows]
    assert val_only  # at least the explicit file's row and the unique held-out documents


def test_batches_pad_to_the_longest_row_not_max_seq_length(data_dirs, tokenizer_dir) -> None:
    dm = ready(
        make(
            tokenizer_dir,
            **{**data_dirs, "pretraining_data_dir": None},
            max_seq_length=512,
            per_device_train_batch_size=4,
        )
    )
    for batch in dm.train_dataloader():
        longest = int(batch["attention_mask"].sum(1).max())
        assert batch["input_ids"].shape[1] == longest < 512
        assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_malformed_record_fails_in_prepare_data_with_file_and_line(data_dirs, tokenizer_dir) -> None:
    bad = Path(data_dirs["instruction_tuning_data_dir"]) / "z.jsonl"
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "a", "target": ["b"]}\n')
    with pytest.raises(DataFormatError, match=r"z.jsonl:2: field 'target': expected a string, got list"):
        make(tokenizer_dir, **data_dirs).prepare_data()


def test_missing_inputs_are_named(data_dirs, tokenizer_dir, tmp_path) -> None:
    with pytest.raises(DatasetError, match="pretraining_data_dir '.*nowhere' is not a directory"):
        make(tokenizer_dir, **{**data_dirs, "pretraining_data_dir": str(tmp_path / "nowhere")}).prepare_data()
    with pytest.raises(DatasetError, match="val_files: '.*missing.jsonl': no such file"):
        make(tokenizer_dir, **data_dirs, val_files=[str(tmp_path / "missing.jsonl")]).prepare_data()
    with pytest.raises(DatasetError, match="no validation data"):
        ready(make(tokenizer_dir, **data_dirs), "validate")
    with pytest.raises(DatasetError, match="no training data"):
        make(tokenizer_dir, instruction_tuning_data_dir=None, pretraining_data_dir=None).prepare_data()


def test_num_train_batches_follows_the_distributed_sampler(data_dirs, tokenizer_dir) -> None:
    dm = ready(make(tokenizer_dir, **data_dirs, per_device_train_batch_size=3))
    rows = len(dm.datasets["train"])
    assert dm.num_train_batches(1) == len(dm.train_dataloader()) == math.ceil(rows / 3)
    assert dm.num_train_batches(2) == math.ceil(math.ceil(rows / 2) / 3)


def test_skip_mode_leaves_out_and_reports_malformed_records(tmp_path, tokenizer_dir, caplog) -> None:
    it = tmp_path / "it"
    write_jsonl(it / "good.jsonl", [{"input": f"Q{i}?", "target": f"A{i}."} for i in range(199)])
    (it / "bad.jsonl").write_text('{"input": "x", "target": 5}\n{"input": "y", "target": "z"}\n')
    settings = {"instruction_tuning_data_dir": str(it), "pretraining_data_dir": None, "cache_dir": str(tmp_path / "c")}
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1: field 'target'"):
        make(tokenizer_dir, **settings).prepare_data()  # strict by default
    for run in ("builds the cache", "reuses it"):  # reported by every run, not only by the one that tokenized
        caplog.clear()
        dm = ready(make(tokenizer_dir, **settings, bad_records="skip", max_bad_fraction=0.01))
        assert len(dm.datasets["train"]) == 200
        reported = [r.getMessage() for r in caplog.records if "skipped 1 of 201 records" in r.getMessage()]
        assert reported and "bad.jsonl:1: field 'target'" in reported[0], run
    with pytest.raises(DatasetError, match=r"1 of 201 records \(0.5%\) are malformed, more than data.max_bad_fraction"):
        make(tokenizer_dir, **settings, bad_records="skip", max_bad_fraction=0.001).prepare_data()


def test_overlong_records_are_truncated_or_dropped_and_counted(tmp_path, tokenizer_dir, caplog) -> None:
    it = write_jsonl(
        tmp_path / "it" / "a.jsonl", [{"input": "word " * 80, "target": "Yes."}, {"input": "Hi", "target": "Hello."}]
    )
    settings = {"instruction_tuning_data_dir": str(it.parent), "pretraining_data_dir": None, "max_seq_length": 24}
    truncated = ready(make(tokenizer_dir, **settings, cache_dir=str(tmp_path / "a"), per_device_train_batch_size=1))
    # "Hi" + "Hello." fits whole: <s> ▁H i ▁H ell o . </s>
    assert [len(ids) for ids in truncated.datasets["train"]["input_ids"]] == [24, 8]
    assert (
        truncated.datasets["train"][0]["labels"][-4:] == truncated.datasets["train"][0]["input_ids"][-4:]
    )  # target kept
    for run in ("builds the cache", "reuses it"):  # the counts are stored with the cache entry
        caplog.clear()
        dropped = ready(
            make(
                tokenizer_dir,
                **settings,
                cache_dir=str(tmp_path / "b"),
                overlong_records="drop",
                per_device_train_batch_size=1,
            )
        )
        assert len(dropped.datasets["train"]) == 1
        assert any(
            f"{it.parent}: 1 of 2 instruction records are longer than max_seq_length=24; they are dropped"
            in r.getMessage()
            for r in caplog.records
        ), run


def test_too_small_training_data_fails_before_training(tmp_path, tokenizer_dir) -> None:
    it = write_jsonl(tmp_path / "it" / "a.jsonl", INSTRUCTIONS[:2])
    dm = make(
        tokenizer_dir,
        instruction_tuning_data_dir=str(it.parent),
        pretraining_data_dir=None,
        cache_dir=str(tmp_path / "c"),
        per_device_train_batch_size=4,
    )
    dm.prepare_data()
    with pytest.raises(DatasetError, match=r"has 2 rows per epoch, fewer than one batch across ranks \(1 x .*=4\)"):
        dm.setup("fit")


@pytest.mark.parametrize("num_workers", [0, 1])
def test_training_loader_resumed_mid_epoch_continues_the_same_order_in_later_epochs(
    data_dirs, tokenizer_dir, num_workers: int
) -> None:
    def loader(position: dict | None = None):
        dm = ready(make(tokenizer_dir, **data_dirs, num_workers=num_workers, per_device_train_batch_size=4))
        if position is not None:
            dm.load_state_dict(position)  # as Lightning does with the checkpoint's data module state
        return dm.train_dataloader()

    def ids(batches) -> list[list[int]]:
        return [row for batch in batches for row in batch["input_ids"][:, 0:4].tolist()]

    def epoch(loader, number: int) -> list[list[int]]:
        loader.sampler.set_epoch(number)  # as Lightning does before each epoch
        return ids(loader)

    straight = loader()
    epochs = [epoch(straight, e) for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    resumed = loader({"epoch": 0, "rows_read": 8})  # after two batches of four
    assert epoch(resumed, 0) == epochs[0][8:]
    assert [epoch(resumed, 1), epoch(resumed, 2)] == epochs[1:]  # the order of the later epochs, too
    at_boundary = loader({"epoch": 1, "rows_read": 0})  # saved at the last batch of epoch 0
    assert [ids(at_boundary), epoch(at_boundary, 2)] == epochs[1:]


def test_mix_ratios_weigh_the_sources_of_each_epoch(tmp_path: Path, tokenizer_dir: str) -> None:
    write_jsonl(tmp_path / "zh.jsonl", INSTRUCTIONS[:2] * 5)  # a third source, given as a file
    sources = {"instruction_tuning_data_dir": str(tmp_path / "it"), "pretraining_data_dir": None}
    write_jsonl(tmp_path / "it" / "a.jsonl", INSTRUCTIONS * 4)
    mix = {sources["instruction_tuning_data_dir"]: 1.0, str(tmp_path / "zh.jsonl"): 3.0}
    dm = ready(make(tokenizer_dir, **sources, train_files=[str(tmp_path / "zh.jsonl")], mix_ratios=mix, epoch_rows=40))
    assert dm.train_source_sizes == (len(INSTRUCTIONS) * 4, 10)
    assert dm.training_order.source_counts() == [10, 30]
    loader = dm.train_dataloader()
    positions = list(loader.sampler)
    assert len(positions) == 40 == len(loader.sampler) == sum(len(batch["input_ids"]) for batch in loader)
    from_file = [p for p in positions if p >= dm.train_source_sizes[0]]  # the file's rows follow the directory's
    assert len(from_file) == 30 and sorted(set(from_file)) == list(range(16, 26))  # each of its 10 rows 3 times


def test_mix_unit_records_gives_record_shares_with_packing(tmp_path: Path, tokenizer_dir: str) -> None:
    short = write_jsonl(tmp_path / "short.jsonl", [{"input": f"Q{i}?", "target": f"A{i}."} for i in range(60)])
    long = write_jsonl(tmp_path / "long.jsonl", [{"input": "word " * 12, "target": "answer " * 8}] * 30)
    files = [str(short), str(long)]
    settings = {"instruction_tuning_data_dir": None, "pretraining_data_dir": None, "train_files": files}
    drawn = {}
    for unit in ("rows", "records"):
        dm = ready(
            make(
                tokenizer_dir,
                **settings,
                packing=True,
                mix_ratios=dict.fromkeys(files, 1.0),
                mix_unit=unit,
                epoch_rows=24,
                cache_dir=str(tmp_path / "c"),
            )
        )
        rows = dm.train_source_sizes
        per_row = [60 / rows[0], 30 / rows[1]]  # records per packed block of each source
        drawn[unit] = [count * k for count, k in zip(dm.training_order.source_counts(), per_row, strict=True)]
    assert drawn["rows"][0] > 2 * drawn["rows"][1]  # equal blocks: many more short records than long ones
    short_share = drawn["records"][0] / sum(drawn["records"])
    assert abs(short_share - 0.5) < 0.1, drawn  # equal records, up to whole blocks per epoch


def test_mix_ratios_must_name_every_source(tmp_path: Path, tokenizer_dir: str) -> None:
    write_jsonl(tmp_path / "it" / "a.jsonl", INSTRUCTIONS)
    write_jsonl(tmp_path / "b.jsonl", INSTRUCTIONS)
    dm = make(
        tokenizer_dir,
        instruction_tuning_data_dir=str(tmp_path / "it"),
        pretraining_data_dir=None,
        train_files=[str(tmp_path / "b.jsonl")],
        mix_ratios={str(tmp_path / "it"): 1.0, "data/typo.jsonl": 1.0},
    )
    with pytest.raises(DatasetError, match=r"unknown \['data/typo.jsonl'\], missing \['.*b.jsonl'\]"):
        ready(dm)
    with pytest.raises(DatasetError, match="train_files: '.*nothing.jsonl': no such file or directory"):
        ready(make(tokenizer_dir, pretraining_data_dir=None, train_files=[str(tmp_path / "nothing.jsonl")]))


def test_a_mix_source_left_without_rows_is_named(tmp_path: Path, tokenizer_dir: str) -> None:
    write_jsonl(tmp_path / "it" / "a.jsonl", INSTRUCTIONS)
    long = tmp_path / "long.jsonl"
    write_jsonl(long, [{"input": "word " * 200, "target": "reply " * 200}] * 3)  # every record over-long
    dm = make(
        tokenizer_dir,
        instruction_tuning_data_dir=str(tmp_path / "it"),
        pretraining_data_dir=None,
        train_files=[str(long)],
        mix_ratios={str(tmp_path / "it"): 1.0, str(long): 1.0},
        overlong_records="drop",
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(DatasetError, match=r"mix_ratios: training source\(s\) \['.*long.jsonl'\] have a positive"):
        ready(dm)


def test_special_token_text_in_records_stays_text(tmp_path: Path, tokenizer_dir: str, caplog) -> None:
    """A literal "<s>" or "</s>" (HTML strike-through, scraped text) is not a BOS or an EOS: one BOS opens the row,
    and EOS ends the reply and the document, nowhere else."""
    write_jsonl(tmp_path / "it" / "a.jsonl", [{"input": "Strike <s>this</s> out", "target": "Done: </s> end"}])
    write_jsonl(tmp_path / "pt" / "d.jsonl", [{"title": "<s>T</s>", "content": "body </s> more"}])
    dm = ready(
        make(
            tokenizer_dir,
            instruction_tuning_data_dir=str(tmp_path / "it"),
            pretraining_data_dir=str(tmp_path / "pt"),
            cache_dir=str(tmp_path / "cache"),
            max_seq_length=256,
            per_device_train_batch_size=1,
        )
    )
    bos, eos = dm.tokenizer.bos_token_id, dm.tokenizer.eos_token_id
    rows = list(dm.datasets["train"])
    instruction = next(r for r in rows if any(label != IGNORE_INDEX for label in r["labels"][:-1]))
    ids = instruction["input_ids"]
    assert ids.count(bos) == 1 and ids[0] == bos and ids.count(eos) == 1 and ids[-1] == eos
    assert "<s>this</s>" in dm.tokenizer.decode(ids).replace(" ", "")
    document = [i for r in rows if r is not instruction for i in r["input_ids"] if i not in (0,)]
    assert document.count(bos) == 1 and document.count(eos) == 1
    # A Jinja template tokenizes its text whole: such records are reported.
    templated = make(
        tokenizer_dir,
        instruction_tuning_data_dir=str(tmp_path / "it"),
        pretraining_data_dir=None,
        cache_dir=str(tmp_path / "cache"),
        template="llama-2",
    )
    with caplog.at_level("WARNING"):
        templated.prepare_data()
    assert any("1 conversation(s) hold special-token text" in r.getMessage() for r in caplog.records)


def test_template_auto_and_none_are_cached_apart(tmp_path: Path) -> None:
    from tests.data.test_template import CHATML, SHAREGPT, rows
    from tests.data.word_tokenizer import save_word_tokenizer

    tokenizer = save_word_tokenizer(tmp_path / "words", chat_template=CHATML)
    (auto,) = rows(tmp_path, [SHAREGPT], tokenizer, template="auto")  # the tokenizer's chat template
    (plain,) = rows(tmp_path, [SHAREGPT], tokenizer, template="none")  # the same files and cache directory
    assert auto["input_ids"] != plain["input_ids"]


def test_settings_that_cannot_work_are_refused_at_start(tokenizer_dir: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="max_seq_length must be at least 3"):
        make(tokenizer_dir, pretraining_data_dir=str(tmp_path), max_seq_length=2)
    with pytest.raises(DatasetError, match="streaming .* cannot skip malformed"):
        make(
            tokenizer_dir,
            instruction_tuning_data_dir=None,
            pretraining_data_dir=str(tmp_path),
            streaming=True,
            bad_records="skip",
        )


def test_test_and_predict_need_no_training_data(tmp_path: Path, tokenizer_dir: str) -> None:
    """Evaluating or predicting from a checkpoint, on a machine without the training data."""
    write_jsonl(tmp_path / "test.jsonl", INSTRUCTIONS)
    write_jsonl(tmp_path / "prompts.jsonl", [{"input": "Hi"}])
    settings = {
        "instruction_tuning_data_dir": str(tmp_path / "not_here"),  # the recipe's, absent on this machine
        "pretraining_data_dir": None,
        "cache_dir": str(tmp_path / "cache"),
        "test_files": [str(tmp_path / "test.jsonl")],
        "predict_files": [str(tmp_path / "prompts.jsonl")],
    }

    def under_trainer(stage: TrainerFn) -> PandaDataModule:
        dm = make(tokenizer_dir, **settings)
        dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
        dm.trainer.state.fn = stage  # what `trainer.test` / `trainer.predict` set before `prepare_data`
        dm.prepare_data()
        dm.setup(stage.value)
        return dm

    tested = under_trainer(TrainerFn.TESTING)
    assert len(tested.datasets["test"]) == len(INSTRUCTIONS) and len(tested.datasets["train"]) == 0
    assert len(under_trainer(TrainerFn.PREDICTING).predict_dataloader().dataset) == 1
    with pytest.raises(DatasetError, match="instruction_tuning_data_dir '.*not_here' is not a directory"):
        under_trainer(TrainerFn.FITTING)


def test_packing_a_source_whose_records_were_all_dropped_leaves_it_empty(tmp_path: Path, tokenizer_dir: str) -> None:
    write_jsonl(tmp_path / "it" / "a.jsonl", INSTRUCTIONS)
    long = write_jsonl(tmp_path / "long.jsonl", [{"input": "word " * 200, "target": "reply " * 200}] * 3)
    dm = ready(
        make(
            tokenizer_dir,
            instruction_tuning_data_dir=str(tmp_path / "it"),
            pretraining_data_dir=None,
            train_files=[str(long)],
            val_files=[str(long)],
            overlong_records="drop",
            packing=True,
            cache_dir=str(tmp_path / "cache"),
        )
    )
    assert dm.train_source_sizes[1] == 0 and len(dm.datasets["validation"]) == 0 and dm.train_source_sizes[0] > 0


def test_a_mix_share_under_one_row_per_epoch_is_reported(tmp_path: Path, tokenizer_dir: str, caplog) -> None:
    write_jsonl(tmp_path / "a.jsonl", INSTRUCTIONS)
    write_jsonl(tmp_path / "b.jsonl", INSTRUCTIONS)
    files = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    dm = make(
        tokenizer_dir,
        instruction_tuning_data_dir=None,
        pretraining_data_dir=None,
        train_files=files,
        mix_ratios={files[0]: 9.0, files[1]: 1.0},
        epoch_rows=5,  # half a row of b.jsonl per epoch
        per_device_train_batch_size=1,
        cache_dir=str(tmp_path / "cache"),
    )
    with caplog.at_level("WARNING"):
        ready(dm)
    warned = "is 0.50 of the 5 rows of an epoch: it gives a row to about 50% of"
    assert any(warned in r.getMessage() for r in caplog.records)
