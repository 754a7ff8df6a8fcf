"""The LightningDataModule: record files in, padded batches of `input_ids` / `labels` / `position_ids` out."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import lightning as L
import numpy as np
import torch
from datasets import Dataset, DatasetDict, concatenate_datasets
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Subset
from transformers import PreTrainedTokenizerBase

from pandallm.data.cache import cache_key, load_or_build_with_notes, source_digest, tokenizer_digest
from pandallm.data.collate import collate_prompts, collate_rows
from pandallm.data.formats import OBJECTIVE_HINTS, RowKind, format_option
from pandallm.data.pairs import (
    PAIR_FEATURES,
    UNPAIRED_FEATURES,
    collate_pairs,
    pair_tokens,
    render_pair,
    tokenize_pairs,
)
from pandallm.data.position import ResumableDataLoader, StreamLoader, trained_position
from pandallm.data.prompts import PROMPT_FEATURES, collate_rl_prompts, read_rl_prompts, tokenize_rl_prompts
from pandallm.data.records import Record, RecordKind, TxtSplit, find_data_files, read_prompts, read_records
from pandallm.data.sampling import EpochSampler, Repeat, TrainingOrder
from pandallm.data.seed_formats import OasstPaths
from pandallm.data.sharding import rank_positions
from pandallm.data.sources import Files, evaluation_files, ordered_ratios, row_ratios, training_sources
from pandallm.data.streaming import POSITION_KEY, DocumentStream, Position, StreamLayout
from pandallm.data.summary import evaluation_line, training_lines, warning_lines
from pandallm.data.template import (
    ChatTemplate,
    render_record,
    resolve_template,
    tokenizer_template,
)
from pandallm.data.template_choice import draw
from pandallm.data.tokenize import (
    ROW_FEATURES,
    pack_instructions,
    prompt_rows,
    tokenize_documents,
    tokenize_instructions,
)
from pandallm.data.workers import ignore_stop_signals, worker_context
from pandallm.distributed import gather_from_ranks
from pandallm.errors import ConfigError, DataFormatError, DatasetError
from pandallm.special_tokens import SpecialTokens
from pandallm.tokenizer import load_tokenizer, padding_id

log = logging.getLogger(__name__)

T = TypeVar("T")
# The record kind each objective's rows are built from (`data.rows`); `sequences` take these two:
ROW_KINDS: dict[str, RecordKind] = {"pairs": "preference", "unpaired": "unpaired"}
SEQUENCE_KINDS = ("instruction", "pretraining")
InstructionFormat = format_option("instruction")
PretrainingFormat = format_option("pretraining")


class PandaDataModule(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: str | None = None,
        special_tokens: SpecialTokens | None = None,
        rows: RowKind = "sequences",
        rollout_passes: int = 1,
        instruction_tuning_data_dir: str | None = "dataset/instruction_tuning",
        pretraining_data_dir: str | None = "dataset/pretraining",
        train_files: list[str] | None = None,
        mix_ratios: dict[str, float] | None = None,
        mix_unit: Literal["rows", "records", "tokens"] = "rows",
        epoch_rows: int | None = None,
        streaming: bool = False,
        val_files: list[str] | None = None,
        val_fraction: float = 0.0,
        test_files: list[str] | None = None,
        predict_files: list[str] | None = None,
        instruction_format: InstructionFormat = "auto",
        pretraining_format: PretrainingFormat = "auto",
        txt_split: TxtSplit = "file",
        oasst_paths: OasstPaths = "all",
        template: str = "auto",
        template_dir: str | None = None,
        template_choices: list[str] | None = None,
        max_seq_length: int = 2048,
        packing: bool = False,
        overlong_records: Literal["truncate", "drop"] = "truncate",
        bad_records: Literal["error", "skip"] = "error",
        max_bad_fraction: float = 0.01,
        per_device_train_batch_size: int = 1,
        per_device_eval_batch_size: int = 2,
        shuffle: bool = True,
        num_workers: int = 2,
        prefetch_factor: int = 2,
        preprocessing_num_workers: int = 1,
        cache_dir: str = ".cache/pandallm",
        seed: int = 42,
    ) -> None:
        """
        Args:
            tokenizer: Linked from the model's tokenizer (`model.tokenizer`, else `model.model_name_or_path`).
            special_tokens: Linked from `model.special_tokens`: the tokenizer's special-token overrides.
            rows: Linked from `model.objective`: what every training and validation record must be and becomes:
                `sequences` (instruction records and documents), `pairs` (preference pairs), `unpaired` (KTO) or
                `prompts` (instruction or `{"prompt"}` records read as prompts: GRPO; pandallm.data.prompts).
            rollout_passes: Linked from `model.objective` (PPO's `ppo_epochs`, GRPO's `num_iterations`): optimizer
                steps taken over each rollout; above 1, every optimizer step's rows of a rank are read that many times
                in a row (pandallm.data.sampling, "Repetition").
            instruction_tuning_data_dir: Instruction / chat records (`.json` arrays, `.jsonl`, directories saved by
                `Dataset.save_to_disk`) in any instruction format (README, "Data formats"); null: none.
            pretraining_data_dir: Documents (`{"title", "content"}` or `{"text"}` records, `.txt` files, saved
                datasets), packed into `max_seq_length` blocks; null: none.
            train_files: More training sources: files or directories of either kind (detected from their fields).
            mix_ratios: Share of each epoch's rows drawn from each training source, keyed by the source as written
                in `instruction_tuning_data_dir`, `pretraining_data_dir` or `train_files` (normalized; every source
                needs one). A source is read whole over the epochs before a row repeats. Null: every row once per
                epoch.
            mix_unit: What `mix_ratios` are shares of: `rows` (training rows: with `packing`, and for pretraining
                documents, packed blocks), `records` (the records the rows hold) or `tokens`. Each epoch still draws
                whole rows, as many as `records` or `tokens` shares need on average.
            epoch_rows: Rows per epoch with `mix_ratios`; default the rows of all sources together.
            streaming: Read, tokenize and pack `pretraining_data_dir` on the fly instead of through the Arrow
                cache, for corpora too large for it (pandallm.data.streaming). The stream is endless: set
                `trainer.max_steps`, and `trainer.val_check_interval` to a number of batches.
            val_files: Validation sources of either kind (detected from their fields).
            val_fraction: Share of the training records (of each source and kind, seeded by `seed`) held out for
                validation.
            test_files: Sources for `pandallm test`, of either kind.
            predict_files: Records `pandallm predict` replies to, in any instruction format (README,
                "Predicting"); the reply may be left out, and is kept as the reference when it is there.
            instruction_format: Format of every instruction-tuning file: `auto` detects it from each file's first
                record (`pandallm`, `alpaca`, `dolly`, `belle`, `sharegpt`, `openai`), or name one.
            pretraining_format: Format of every pretraining `.json` / `.jsonl` file: `auto`, `pretraining`
                (`title`/`content`) or `text`.
            txt_split: A `.txt` file is one document (`file`) or one document per blank-line-separated paragraph.
            oasst_paths: The conversations of an OpenAssistant message tree (format `oasst`): `all`, one per path
                from the root to each leaf, or `best`, the one path that follows the best-ranked reply at each turn.
            template: How conversations become text: `auto` (PandaLLM `input/target` records keep
                `[BOS] input target [EOS]`; other formats use the tokenizer's chat template if it has one), `none`
                (that plain layout for all), `tokenizer`, a built-in (`alpaca`, `llama-2`, `chatml`), a name in
                `template_dir`, or a Jinja file or directory.
            template_dir: A directory of `NAME.jinja` templates that `template: NAME` selects.
            template_choices: More templates (as `template` names them) for augmentation: each training and
                validation record is rendered with one of `template` and these, drawn from `seed` and the record
                itself (pandallm.data.template_choice). Prediction and the export use `template`.
            max_seq_length: Tokens per row: the pretraining block size and the instruction truncation length.
            packing: Pack whole instruction rows into `max_seq_length` blocks (best-fit decreasing); attention
                and positions stay per row. Pretraining documents are always packed.
            overlong_records: Instruction records longer than `max_seq_length`: `truncate` cuts the prompt from
                the left so that the target and EOS fit (README, "Data formats"); `drop` leaves them out. Either
                way they are counted and reported.
            bad_records: `error` stops at the first malformed record; `skip` leaves malformed records out,
                reports each with its file and line, and fails if they exceed `max_bad_fraction`.
            max_bad_fraction: Largest share of malformed records `skip` accepts.
            per_device_train_batch_size: Rows per training batch on each device.
            per_device_eval_batch_size: Rows per validation / test / predict batch on each device.
            shuffle: Shuffle the training rows every epoch (seeded by `seed`); false reads them in order, so that
                runs with different numbers of ranks see the same global batches (see `pandallm.data.sharding`).
            num_workers: Data-loader worker processes.
            prefetch_factor: Batches each worker loads ahead.
            preprocessing_num_workers: Processes that tokenize (`datasets.map(num_proc=...)`).
            cache_dir: Where tokenized datasets are kept, keyed by the files' content, the tokenizer and settings.
            seed: Seed of the `val_fraction` hold-out and of the training data order.
        """
        super().__init__()
        # Stored in checkpoints, to name what changed when a run resumes. The tokenizer is linked from the model
        # (and checked by digest); Lightning refuses module and data hparams that share a key with other values.
        self.save_hyperparameters(ignore=["tokenizer"])
        if not 0.0 <= val_fraction < 1.0:
            raise DatasetError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if max_seq_length < 3:
            raise DatasetError(
                f"data.max_seq_length must be at least 3 (BOS, a prompt token and a target token), got {max_seq_length}"
            )
        self.tokenizer_name = tokenizer
        self.special_tokens = special_tokens
        self.rows = rows
        if rollout_passes < 1 or (rollout_passes > 1 and rows != "prompts"):
            raise DatasetError(
                f"data.rollout_passes must be 1, or above 1 for prompt rows (online RL) only, got {rollout_passes} "
                f"for {rows}"
            )
        self.rollout_passes = rollout_passes
        self.data_dirs: dict[RecordKind, str | None] = {
            "instruction": instruction_tuning_data_dir,
            "pretraining": pretraining_data_dir,
        }
        self.train_files = list(train_files or [])
        if epoch_rows is not None and (mix_ratios is None or epoch_rows < 1):
            raise DatasetError("data.epoch_rows needs data.mix_ratios and must be at least 1")
        self.mix_ratios = mix_ratios
        self.mix_unit = mix_unit
        self.epoch_rows = epoch_rows
        self.streaming = streaming
        if streaming and (pretraining_data_dir is None or instruction_tuning_data_dir is not None or train_files):
            raise DatasetError(
                "data.streaming streams pretraining_data_dir alone: set it, and set instruction_tuning_data_dir to "
                "null and leave train_files empty"
            )
        if streaming and (val_fraction > 0 or mix_ratios is not None):
            raise DatasetError("data.streaming holds nothing out and mixes nothing: use data.val_files, no mix_ratios")
        if streaming and bad_records == "skip":
            # A stream meets a bad record mid-training, on one worker of one rank, with no total to take a fraction
            # of: it stops there, naming the file and line, as `bad_records: error` does.
            raise DatasetError(
                "data.streaming reads records while it trains and cannot skip malformed ones: check the corpus first "
                "(`pandallm data check`) and leave data.bad_records at 'error'"
            )
        if instruction_tuning_data_dir is not None and instruction_tuning_data_dir == pretraining_data_dir:
            raise DatasetError(
                f"data.instruction_tuning_data_dir and data.pretraining_data_dir are both '{pretraining_data_dir}'"
            )
        self.val_files = list(val_files or [])
        self.val_fraction = val_fraction
        self.test_files = list(test_files or [])
        self.predict_files = list(predict_files or [])
        self.formats: dict[RecordKind, str] = {"instruction": instruction_format, "pretraining": pretraining_format}
        self.txt_split = txt_split
        self.oasst_paths = oasst_paths
        self.template = template
        self.template_dir = template_dir
        self.template_choices = list(template_choices or [])
        self.max_seq_length = max_seq_length
        self.packing = packing
        self.overlong_records = overlong_records
        self.bad_records = bad_records
        self.max_bad_fraction = max_bad_fraction
        self.train_batch_size = per_device_train_batch_size
        self.eval_batch_size = per_device_eval_batch_size
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.preprocessing_num_workers = preprocessing_num_workers
        self.cache_dir = cache_dir
        self.seed = seed
        self.datasets: DatasetDict | None = None
        self._has_training_data = False
        # The training sources (as `mix_ratios` names them) and their rows, known once the data is loaded.
        self.train_source_names: list[str] = []
        self.train_source_sizes: tuple[int, ...] = ()
        # The counts stored with the cache entry (`pandallm.data.summary`), reported by every run that uses it.
        self.data_notes: dict = {}
        self.train_source_files: dict[str, list[str]] = {}
        self.cache_entry: Path | None = None
        self._built_here = False
        # (epoch, rows of it read) from the checkpoint being resumed (see `train_dataloader`).
        self._resume_position: tuple[int, int] | None = None
        # Streaming: this rank's consumers' positions after the last batch trained, and its batches trained.
        self._stream_positions: dict[int, Position] = {}
        self._stream_batches = 0

    # ---- preparing -------------------------------------------------------------------------------------------

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self.tokenizer_name is None:
            raise DatasetError("data.tokenizer is not set (it is linked from model.tokenizer / model_name_or_path)")
        return load_tokenizer(self.tokenizer_name, self.special_tokens)

    @cached_property
    def chat_template(self) -> ChatTemplate | None:
        """`data.template` resolved; None for `auto`, which chooses per record format."""
        return resolve_template(self.template, self.tokenizer, self.template_dir)

    @cached_property
    def chat_templates(self) -> list[ChatTemplate | None]:
        """`data.template`, then each of `data.template_choices`, resolved."""
        resolved = [self.chat_template]
        for index, name in enumerate(self.template_choices):
            try:
                resolved.append(resolve_template(name, self.tokenizer, self.template_dir))
            except ConfigError as error:
                message = str(error).replace("data.template ", f"data.template_choices[{index}] ", 1)
                raise ConfigError(message) from error
        return resolved

    def _template_of(self, record: Record) -> ChatTemplate | None:
        return draw(record, self.chat_templates, self.seed) if self.template_choices else self.chat_template

    @property
    def pad_id(self) -> int:
        return padding_id(self.tokenizer)

    def prepare_data(self) -> None:
        # Lightning runs this once per node before `setup`: malformed data fails here, before any training.
        stage = self.trainer.state.fn if self.trainer is not None else None
        if stage != TrainerFn.PREDICTING:
            self._load(self._needs_training_data(stage))

    def _needs_training_data(self, stage: str | None) -> bool:
        """`fit` trains on it, and `validate` holds its `val_fraction` out of it; `test` and `predict` run from a
        checkpoint with their own files, on a machine that may not have the training data."""
        return stage in (None, TrainerFn.FITTING) or (stage == TrainerFn.VALIDATING and self.val_fraction > 0)

    def setup(self, stage: str) -> None:
        if stage == TrainerFn.PREDICTING:
            if not self.predict_files:
                raise DatasetError("no prompts: set data.predict_files")
            return  # the prompts are read by `predict_dataloader`; nothing else is needed
        needs_training_data = self._needs_training_data(stage)
        # Loaded for `validate` or `test` without the training split, then asked to `fit`: load again, with it.
        if self.datasets is None or (needs_training_data and not self._has_training_data):
            self.datasets = self._load(needs_training_data)
            self._has_training_data = needs_training_data
            self.__dict__.pop("training_order", None)  # a cached_property of the rows loaded before
            self._report(stage)
        if stage == "fit" and self.streaming:
            if self.trainer is not None and self.trainer.max_steps < 0:
                raise DatasetError("data.streaming reads an endless stream: set trainer.max_steps")
        elif stage == "fit":
            _, world_size = self._rank_and_world()
            needed = world_size * self.train_batch_size
            if self.training_order.length < needed:
                raise DatasetError(
                    f"the training data has {self.training_order.length} rows per epoch, fewer than one batch across "
                    "ranks "
                    f"({world_size} x data.per_device_train_batch_size={self.train_batch_size}); add data or "
                    "lower the batch size"
                )
        if stage == "validate" and len(self.datasets["validation"]) == 0:
            raise DatasetError("no validation data: set data.val_files or data.val_fraction")
        if stage == "test" and len(self.datasets["test"]) == 0:
            raise DatasetError("no test data: set data.test_files")

    def _report(self, stage: str) -> None:
        """What the data became (`pandallm.data.summary`): on every run, from the notes of the cache entry."""
        names = self.train_source_names
        how = "built by this run" if self._built_here else "reused"
        log.info("pandallm data: tokenized data in %s (%s)", self.cache_entry, how)
        for line in warning_lines(self.data_notes, names, self.max_seq_length, self.overlong_records):
            log.warning(line)
        if self._has_training_data and len(self.datasets["train"]):
            _, world_size = self._rank_and_world()
            batch_rows = world_size * self.train_batch_size
            for line in training_lines(
                self.data_notes,
                self.train_source_files,
                self.training_order,
                self.max_seq_length,
                self.packing,
                batch_rows,
                self.mix_unit,
            ):
                log.info(line)
        for split in ("validation", "test"):
            line = evaluation_line(self.data_notes, split)
            if line:
                log.info(line)

    @property
    def _collate(self) -> Callable:
        if self.rows == "prompts":
            return collate_rl_prompts
        return collate_rows if self.rows == "sequences" else collate_pairs

    def train_sources(self) -> dict[str, Files]:
        """The training sources by name; a streamed pretraining directory is not one (it bypasses the cache)."""
        dirs = {kind: d for kind, d in self.data_dirs.items() if not (self.streaming and kind == "pretraining")}
        return training_sources(dirs, self.train_files)

    def _sources(self, train: dict[str, Files]) -> dict[str, list[Files]]:
        """The files of each split, grouped by source (validation and test: one group)."""
        return {
            "train": list(train.values()),
            "validation": [evaluation_files("val_files", self.val_files)],
            "test": [evaluation_files("test_files", self.test_files)],
        }

    @cached_property
    def training_order(self) -> TrainingOrder:
        names = self.train_source_names
        groups = [self.data_notes.get("groups", {}).get(group_split("train", i), {}) for i in range(len(names))]
        given = ordered_ratios(self.mix_ratios, names)
        if given is not None:
            sizes = zip(names, self.train_source_sizes, given, strict=True)
            empty = [name for name, size, ratio in sizes if ratio > 0 and size == 0]
            if empty:
                raise DatasetError(
                    f"data.mix_ratios: training source(s) {empty} have a positive ratio but no rows left (every record "
                    "dropped as over-long, or skipped as malformed)"
                )
        ratios = row_ratios(given, self.mix_unit, groups)  # what the order draws: rows
        order = TrainingOrder(self.train_source_sizes, ratios, self.epoch_rows, self.seed, self.shuffle)
        if order.ratios is not None:
            # Shares are whole rows in each epoch and exact only over epochs: one of less than a row is not read in
            # every epoch.
            total, weight = order.length, sum(order.ratios)
            for name, ratio in zip(names, order.ratios, strict=True):
                wanted = ratio / weight * total
                if 0 < wanted < 1:
                    log.warning(
                        "pandallm data: mix ratio %s of '%s' is %.2f of the %d rows of an epoch: it gives a row to "
                        "about %.0f%% of the epochs; raise data.epoch_rows to read it in every one",
                        ratio,
                        name,
                        wanted,
                        total,
                        100 * wanted,
                    )
        return order

    def _load(self, with_training_data: bool = True) -> DatasetDict:
        """The rows of every split, from the cache or built; without `with_training_data`, those of the validation
        and test files alone (the training split is empty)."""
        if not with_training_data:
            train = {}
        elif not any(self.data_dirs.values()) and not self.train_files:
            raise DatasetError(
                "no training data: set data.instruction_tuning_data_dir, data.pretraining_data_dir or data.train_files"
            )
        else:
            train = self.train_sources()
        # Which files were found (a directory may hold more, or fewer, than meant): reported by `_report`.
        self.train_source_files = {name: [str(path) for _, path in files] for name, files in train.items()}
        sources = self._sources(train)
        key = cache_key(
            {
                "files": {
                    split: [[(kind, source_digest(path)) for kind, path in group] for group in groups]
                    for split, groups in sources.items()
                },
                "tokenizer": tokenizer_digest(self.tokenizer),
                "formats": [self.formats, self.txt_split, self.oasst_paths],
                "template": [
                    # `auto` (None) and `none` (the plain layout, whose source is None too) lay records out differently
                    "auto" if self.chat_template is None else self.chat_template.name,
                    None if self.chat_template is None else self.chat_template.source,
                    tokenizer_template(self.tokenizer),  # what `auto` uses
                ],
                "template_choices": [(t.name, t.source) if t else "auto" for t in self.chat_templates[1:]],
                "max_seq_length": self.max_seq_length,
                "val_fraction": self.val_fraction,
                "seed": self.seed,
                "overlong_records": self.overlong_records,
                "packing": self.packing,
                "bad_records": [self.bad_records, self.max_bad_fraction],
                # Prompt rows are built from the same files as SFT's rows: keyed apart (other keys stay as they were).
                **({"rows": self.rows} if self.rows == "prompts" else {}),
            }
        )
        stored, self.data_notes = load_or_build_with_notes(self.cache_dir, key, partial(self._build, sources))
        self.cache_entry = Path(self.cache_dir) / key
        self._built_here = self._built_here or bool(self.data_notes.get("built"))
        # Empty splits are not stored (`datasets` cannot load a split of zero shards back).
        features = {"pairs": PAIR_FEATURES, "unpaired": UNPAIRED_FEATURES, "prompts": PROMPT_FEATURES}.get(
            self.rows, ROW_FEATURES
        )
        empty = Dataset.from_dict({name: [] for name in features}, features=features)
        train_parts = [stored.get(group_split("train", i), empty) for i in range(len(sources["train"]))]
        self.train_source_names = list(train)
        self.train_source_sizes = tuple(len(part) for part in train_parts)
        datasets = DatasetDict({"train": concatenate_datasets(train_parts) if train_parts else empty})
        for split in ("validation", "test"):
            datasets[split] = stored.get(group_split(split, 0), empty)
        if self.rows != "sequences":
            # Each pair's row number, by which reference log-probabilities computed before training are looked up.
            for split, rows in datasets.items():
                datasets[split] = rows.add_column("index", list(range(len(rows))))
        return datasets

    def _tokens(self, rows: Dataset) -> int:
        if self.rows == "prompts":
            return sum(len(ids) for ids in rows["input_ids"])
        return pair_tokens(rows) if self.rows != "sequences" else sum(len(ids) for ids in rows["input_ids"])

    def _expected_kind(self, kind: RecordKind | None) -> RecordKind | None:
        """The kind every record of a source must be: the objective's, or where it trains on sequences, the kind its
        option names (None: instruction or pretraining, detected)."""
        return ROW_KINDS.get(self.rows, kind)

    def _build(self, sources: dict[str, list[Files]], scratch: Path) -> tuple[DatasetDict, dict]:
        if self.rows == "prompts":
            return self._build_prompts(sources)
        records: dict[str, list[dict[RecordKind, list]]] = {
            split: [{kind: [] for kind in get_args(RecordKind)} for _ in groups] for split, groups in sources.items()
        }
        skipped: list[DataFormatError] | None = [] if self.bad_records == "skip" else None
        for split, groups in sources.items():
            for group, files in zip(records[split], groups, strict=True):
                for kind, path in files:
                    fmt = self.formats.get(kind, "auto") if self.rows == "sequences" else "auto"
                    found_kind, found = read_records(
                        path, self._expected_kind(kind), skipped, fmt, self.txt_split, self.oasst_paths
                    )
                    if found and found_kind not in SEQUENCE_KINDS and self.rows == "sequences":
                        raise DataFormatError(
                            Path(found[0].path),
                            found[0].line,
                            None,
                            f"a {found_kind} record ({found[0].format}) where instruction or pretraining records are "
                            f"expected ({OBJECTIVE_HINTS[found_kind]})",
                        )
                    group[found_kind] += found
        # From here on, instruction records and pairs are their renderings (the text each template gives them).
        for groups in records.values():
            for group in groups:
                group["instruction"] = self._render(group["instruction"], skipped)
                group["preference"] = self._render(group["preference"], skipped, render_pair)
                group["unpaired"] = self._judged(group["unpaired"], skipped)
        num_valid = sum(len(r) for groups in records.values() for group in groups for r in group.values())
        left_out = skipped or []
        shown = [str(error) for error in left_out[:10]]
        notes: dict = {
            "groups": {},
            "records": num_valid + len(left_out),
            "skipped": len(left_out),
            "skipped_examples": shown,
        }
        if left_out:
            self._check_skipped(left_out, num_valid)
        if self.val_fraction > 0:
            for group in records["train"]:
                for kind, train in group.items():
                    group[kind], held_out = hold_out(train, self.val_fraction, self.seed)
                    records["validation"][0][kind] += held_out
        built = {}
        for split, groups in records.items():
            for index, by_kind in enumerate(groups):
                name = group_split(split, index)
                note = notes["groups"][name] = {"records": {k: len(v) for k, v in by_kind.items() if v}, "overlong": {}}
                rows = self._tokenize(name, by_kind, scratch / name, note)
                if rows is not None:
                    built[name] = rows
                    note["rows"], note["tokens"] = len(rows), self._tokens(rows)
        return DatasetDict(built), notes

    def _build_prompts(self, sources: dict[str, list[Files]]) -> tuple[DatasetDict, dict]:
        """Prompt rows (online RL, `pandallm.data.prompts`) of every split, with the notes `_build` keeps."""
        skipped: list[DataFormatError] | None = [] if self.bad_records == "skip" else None
        read = {
            split: [[found for _, path in files for found in read_rl_prompts(path, skipped)] for files in groups]
            for split, groups in sources.items()
        }
        left_out = skipped or []
        num_valid = sum(len(group) for groups in read.values() for group in groups)
        if left_out:
            self._check_skipped(left_out, num_valid)
        if self.val_fraction > 0:
            for index, group in enumerate(read["train"]):
                read["train"][index], held_out = hold_out(group, self.val_fraction, self.seed)
                read["validation"][0] += held_out
        notes: dict = {
            "groups": {},
            "records": num_valid + len(left_out),
            "skipped": len(left_out),
            "skipped_examples": [str(error) for error in left_out[:10]],
        }
        built = {}
        drop = self.overlong_records == "drop"
        for split, groups in read.items():
            for index, records in enumerate(groups):
                if not records:
                    continue
                name = group_split(split, index)
                rows, overlong = tokenize_rl_prompts(
                    records, self.chat_template, self.tokenizer, self.max_seq_length, drop
                )
                notes["groups"][name] = {
                    "records": {"prompts": len(records)},
                    "overlong": {"prompts": overlong},
                    "rows": len(rows),
                    "tokens": self._tokens(rows),
                }
                if len(rows):
                    built[name] = rows
        return DatasetDict(built), notes

    def _tokenize(self, name: str, by_kind: dict[RecordKind, list], scratch: Path, note: dict) -> Dataset | None:
        """The rows of one source: its instruction rows (packed if configured), its pairs, then its pretraining
        blocks; the number of over-long records of each kind goes to `note` (reported on every run: `_report`)."""
        parts = []
        if by_kind["instruction"]:
            drop = self.overlong_records == "drop"
            rows, note["overlong"]["instruction"] = tokenize_instructions(
                by_kind["instruction"], self.tokenizer, self.max_seq_length, self.preprocessing_num_workers, drop
            )
            if self.packing and len(rows):  # every record dropped as over-long: nothing to pack (an empty source)
                rows = pack_instructions(rows, self.max_seq_length, scratch / "packed")
            parts.append(rows)
        for kind in ("preference", "unpaired"):
            if by_kind[kind]:
                rows, note["overlong"][kind] = self._tokenize_pairs(name, kind, by_kind[kind])
                parts.append(rows)
        if by_kind["pretraining"]:
            parts.append(
                tokenize_documents(
                    by_kind["pretraining"],
                    self.tokenizer,
                    self.max_seq_length,
                    self.preprocessing_num_workers,
                    scratch / "documents",
                )
            )
        return concatenate_datasets(parts) if parts else None

    def _tokenize_pairs(self, name: str, kind: RecordKind, rendered: list) -> tuple[Dataset, int]:
        """Pair rows (`pandallm.data.pairs`) of a source's preference pairs, or of its judged completions (KTO), and
        how many were longer than `max_seq_length`."""
        drop = self.overlong_records == "drop"
        labels = [desirable for desirable, _ in rendered] if kind == "unpaired" else None
        sides = [pair for _, pair in rendered] if kind == "unpaired" else rendered
        return tokenize_pairs(
            sides, self.tokenizer, self.max_seq_length, self.preprocessing_num_workers, drop, name, labels
        )

    def _judged(self, records: list[Record], skipped: list[DataFormatError] | None) -> list[tuple[bool, list]]:
        """The judged completions that render, as (desirable, rendering): the label stays beside its rendering."""
        kept = []
        for record in records:
            rendered = self._render([record], skipped, render_pair)
            if rendered:
                kept.append((record.desirable, rendered[0]))
        return kept

    def _render(
        self, records: list[Record], skipped: list[DataFormatError] | None, renderer: Callable = render_record
    ) -> list:
        """Each conversation (with `render_pair`, each pair) as template text. A conversation its template cannot
        render (roles that do not alternate where the template needs it) is a malformed record: it raises, or with
        `skipped` is left out."""
        rendered = []
        # A Jinja template's text is tokenized whole, its own markers as special tokens: a "</s>" that a record's
        # text holds would be read as one too (an EOS inside a reply). Counted and reported; the plain layout
        # reads record text as text (`AS_TEXT`).
        specials = [t for t in self.tokenizer.all_special_tokens if t]
        marked: list[Record] = []
        for record in records:
            try:
                rendered.append(renderer(record, self._template_of(record), self.tokenizer))
            except DataFormatError as error:
                if skipped is None:
                    raise
                skipped.append(error)
                continue
            templated = (
                any(r.templated for r in rendered[-1]) if isinstance(rendered[-1], list) else rendered[-1].templated
            )
            if templated and any(t in text for text in record.texts for t in specials):
                marked.append(record)
        if marked:
            log.warning(
                "pandallm data: %d conversation(s) hold special-token text (%s) that the Jinja template's "
                "tokenization reads as special tokens, e.g. %s:%d; clean them, or use data.template: none",
                len(marked),
                ", ".join(specials),
                marked[0].path,
                marked[0].line,
            )
        return rendered

    def _check_skipped(self, skipped: list[DataFormatError], num_valid: int) -> None:
        # Reported (with the first ones) by `_report`, from the cache entry's notes, on every run.
        total = num_valid + len(skipped)
        if len(skipped) > self.max_bad_fraction * total:
            raise DatasetError(
                f"{len(skipped)} of {total} records ({len(skipped) / total:.1%}) are malformed, more than "
                f"data.max_bad_fraction={self.max_bad_fraction}; the first: {skipped[0]}"
            )

    # ---- loading ---------------------------------------------------------------------------------------------

    def num_train_batches(self, world_size: int) -> float:
        """Training batches per epoch on each rank."""
        assert self.datasets is not None, "setup('fit') must run first"
        if self.streaming:
            return math.inf
        return math.ceil(self._trained_rows_per_rank(world_size) / self.train_batch_size)

    def _trained_rows_per_rank(self, world_size: int) -> int:
        """Rows of an epoch each rank trains on: its share, padded as shards are, repetitions included."""
        rows = math.ceil(self.training_order.length / world_size)
        repeat = self._repeat()
        return repeat.rows(rows) if repeat is not None else rows

    def _repeat(self) -> Repeat | None:
        """How the training rows repeat for the optimizer steps of each rollout (`rollout_passes`), or None."""
        if self.rollout_passes == 1:
            return None
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        return Repeat(self.train_batch_size * accumulate, self.rollout_passes)

    def _trained_rows_per_epoch(self) -> int:
        """Rows of an epoch as training reads them, all ranks together (repetitions included)."""
        if self._repeat() is None:
            return self.training_order.length
        _, world_size = self._rank_and_world()
        return self._trained_rows_per_rank(world_size) * world_size

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:  # used on its own, outside a Trainer
            return 0, 1
        if trainer.world_size > 1 and trainer._accelerator_connector.use_distributed_sampler:
            raise DatasetError(
                "pandallm shards the data across ranks itself; set trainer.use_distributed_sampler: false "
                "(pandallm's default) so that Lightning does not shard it a second time"
            )
        return trainer.global_rank, trainer.world_size

    def _loader(self, rows, batch_size: int, collate, pad: bool = False) -> DataLoader:
        """An evaluation loader: every row exactly once over all ranks, in order; with `pad`, every rank gets as many
        rows (a few twice), so that all ranks run the same number of batches."""
        rank, world_size = self._rank_and_world()
        if world_size > 1:
            rows = Subset(rows, rank_positions(np.arange(len(rows)), rank, world_size, pad=pad).tolist())
        collate_fn = partial(collate, pad_id=self.pad_id)
        return DataLoader(rows, batch_size=batch_size, collate_fn=collate_fn, **self._workers())

    def _workers(self) -> dict[str, Any]:
        workers = self.num_workers
        return {
            "num_workers": workers,
            "prefetch_factor": self.prefetch_factor if workers > 0 else None,
            "persistent_workers": workers > 0,  # started once: a worker's start costs more than a fork's
            # Not forked from this process, which runs threads by now: `pandallm.data.workers`.
            "multiprocessing_context": worker_context() if workers > 0 else None,
            "worker_init_fn": ignore_stop_signals,
            # A loader draws its workers' seed when it creates an iterator: from the global RNG unless it has a
            # generator. A resumed run creates its iterators at other moments than the uninterrupted run (before
            # the restored RNG state, or once more), and every draw would shift its dropout masks.
            "generator": torch.Generator().manual_seed(self.seed),
        }

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world()
        if self.streaming:
            return self._stream_loader(rank, world_size)
        epoch, rows_read = (self.trainer.current_epoch if self.trainer is not None else 0), 0
        # The checkpoint's position, for as long as the run has not gone past it. Not consumed: whatever calls this
        # first (Lightning's loop, or an early `estimated_stepping_batches`), the loop's loader starts there.
        if self._resume_position is not None and self._resume_position[0] >= epoch:
            epoch, rows_read = self._resume_position
        sampler = EpochSampler(self.training_order, rank, world_size, epoch, rows_read, self._repeat())
        return ResumableDataLoader(
            self.datasets["train"],
            batch_size=self.train_batch_size,
            sampler=sampler,
            collate_fn=partial(self._collate, pad_id=self.pad_id),
            **self._workers(),
        )

    def _stream_loader(self, rank: int, world_size: int) -> DataLoader:
        def layout() -> StreamLayout:
            positions = dict(self._stream_positions)
            return StreamLayout(rank, world_size, self.num_workers, positions, self._stream_batches)

        stream = DocumentStream(
            find_data_files(self.data_dirs["pretraining"], "pretraining_data_dir", text=True),
            self.tokenizer_name,
            self.max_seq_length,
            self.train_batch_size,
            self.pad_id,
            layout(),
            self.formats["pretraining"],
            self.txt_split,
            special_tokens=self.special_tokens,
        )
        return StreamLoader(stream, layout, **self._workers())

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Runs for the batch about to be trained, after the loader's workers have fetched ahead.
        if isinstance(batch, dict) and POSITION_KEY in batch:
            consumer, *after = batch.pop(POSITION_KEY).tolist()
            self._stream_positions[consumer] = tuple(after)
            self._stream_batches += 1
        return batch

    # ---- the data position in checkpoints ------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data: the epoch, and the rows of its order read by all ranks together.

        Computed from the trainer's progress (batches the training loop has finished), not from the loader, whose
        workers have fetched batches ahead. Every rank computes the same values.
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        if self.streaming:
            return self._stream_state()
        epoch, batches = trained_position(trainer)
        batch_rows = self.train_batch_size * trainer.world_size
        return {
            "epoch": epoch,
            "rows_read": batches * batch_rows,
            "batch_rows": batch_rows,
            "rows_per_epoch": self._trained_rows_per_epoch(),
        }

    def _stream_state(self) -> dict[str, Any]:
        """Every consumer's position, gathered from all ranks (only rank 0 writes the checkpoint)."""
        gathered = gather_from_ranks({"positions": dict(self._stream_positions)})
        positions = {c: list(p) for state in gathered for c, p in state["positions"].items()}
        _, world_size = self._rank_and_world()
        return {
            "stream_positions": positions,
            "stream_batches": self._stream_batches,  # the same on every rank: one batch per step each
            "stream_consumers": [world_size, max(self.num_workers, 1)],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "stream_positions" in state_dict:
            self._load_stream_state(state_dict)
            return
        evaluating = self.trainer is not None and self.trainer.state.fn != TrainerFn.FITTING
        if "epoch" not in state_dict or evaluating:
            return  # only `fit` continues from the data position; validate / test / predict read their own files
        epoch, rows_read = int(state_dict["epoch"]), int(state_dict["rows_read"])
        _, world_size = self._rank_and_world()
        batch_rows = self.train_batch_size * world_size
        if rows_read and state_dict.get("batch_rows", batch_rows) != batch_rows:
            # Lightning counts the resumed epoch's batches in the checkpoint's batch size; another one would end
            # the epoch early or late. At an epoch boundary (rows_read 0) any batch size resumes.
            raise DatasetError(
                f"the checkpoint stopped mid-epoch with {state_dict['batch_rows']} rows per global batch (batch size "
                f"x ranks); this run has {batch_rows}. Resume it with the same, or from a checkpoint at an epoch's end"
            )
        rows_per_epoch = self._trained_rows_per_epoch()
        if self.mix_ratios is None and state_dict.get("rows_per_epoch") not in (None, rows_per_epoch):
            log.warning(
                "pandallm data: the checkpoint's epochs had %s rows, this run's have %d: the resumed epoch's order "
                "is not the one the run was in",
                state_dict["rows_per_epoch"],
                rows_per_epoch,
            )
        self._resume_position = (epoch, rows_read)
        log.info("pandallm data: resuming in epoch %d after %d rows", epoch, rows_read)

    def _load_stream_state(self, state_dict: dict[str, Any]) -> None:
        _, world_size = self._rank_and_world()
        saved = list(state_dict["stream_consumers"])
        if not self.streaming or saved != [world_size, max(self.num_workers, 1)]:
            raise DatasetError(
                f"the checkpoint streamed with {saved[0]} ranks x {saved[1]} data.num_workers; resume it with the same "
                f"(this run: {'no streaming' if not self.streaming else f'{world_size} x {max(self.num_workers, 1)}'})"
            )
        self._stream_positions = {int(c): tuple(p) for c, p in state_dict["stream_positions"].items()}
        self._stream_batches = int(state_dict["stream_batches"])

    def scoring_loader(self, split: str) -> DataLoader:
        """Every row of `split`, in order, shared by the ranks in equal parts: what a reference model scores before
        training (`pandallm.objectives.reference`), with every rank in each batch's collectives."""
        return self._loader(self.datasets[split], self.eval_batch_size, self._collate, pad=True)

    def val_dataloader(self) -> DataLoader | list:
        if len(self.datasets["validation"]) == 0:
            return []  # Lightning then skips validation
        return self._loader(self.datasets["validation"], self.eval_batch_size, self._collate)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.datasets["test"], self.eval_batch_size, self._collate)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.prompts(), self.eval_batch_size, collate_prompts)

    def prompts(self, files: list[str] | None = None) -> list[dict]:
        """The records of `predict_files` (or of `files`: the generation metrics' validation and test files) as
        prompts (`pandallm.data.tokenize.prompt_rows`): read through the format detection of training files (an
        Alpaca record's prompt is its instruction and input, a chat record's its turns before the last reply),
        rendered by the template its format was trained with, and tokenized as a training row begins."""
        files = self.predict_files if files is None else files
        prompts = [prompt for name in files for prompt in read_prompts(name)]
        return prompt_rows(prompts, self.chat_template, self.tokenizer, self.max_seq_length)


def hold_out(records: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split off a seeded random `fraction` of `records` (at least one when there are two or more)."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    num_held = min(max(round(fraction * len(records)), 1), len(records) - 1)
    held = set(random.Random(seed).sample(range(len(records)), num_held))
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def group_split(split: str, group: int) -> str:
    """The name a source group of a split is stored under in the cache (`train_0`, `train_1`, `validation`)."""
    return f"{split}_{group}" if split == "train" else split
