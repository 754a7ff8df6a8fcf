"""Tokenizing validated records into rows with Hugging Face `datasets` (batched, in `num_proc` processes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset, Features, Sequence, Value
from transformers import PreTrainedTokenizerBase

from pandallm.data.encode import document_ids, instruction_row, pack_documents
from pandallm.data.packing import pack_rows, plan_packs
from pandallm.data.records import Record

ROW_FEATURES = Features(
    {
        "input_ids": Sequence(Value("int32")),
        "labels": Sequence(Value("int32")),
        "position_ids": Sequence(Value("int32")),
    }
)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int]:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token; pandallm trains EOS")
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def document_text(record: Record) -> str:
    """Title and content as one text; an empty title adds nothing."""
    title, content = record.fields["title"].strip(), record.fields["content"]
    return f"{title}\n{content}" if title else content


def _encode_instructions(batch: dict, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> dict:
    bos_id, eos_id = special_ids(tokenizer)
    # Prompt and target are tokenized separately so that the label boundary is exact, whatever the tokenizer
    # would have merged across it.
    prompts = tokenizer(batch["input"], add_special_tokens=False)["input_ids"]
    targets = tokenizer(batch["target"], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "truncated": []}
    for prompt_ids, target_ids in zip(prompts, targets, strict=True):
        row, truncated = instruction_row(prompt_ids, target_ids, bos_id, eos_id, max_seq_length)
        out["input_ids"].append(row.input_ids)
        out["labels"].append(row.labels)
        out["position_ids"].append(row.position_ids)
        out["truncated"].append(truncated)
    return out


def tokenize_instructions(
    records: list[Record], tokenizer: PreTrainedTokenizerBase, max_seq_length: int, num_proc: int, drop_overlong: bool
) -> tuple[Dataset, int]:
    """Instruction rows, and how many records did not fit `max_seq_length` (truncated, or with `drop_overlong`
    left out)."""
    texts = Dataset.from_dict(
        {"input": [r.fields["input"] for r in records], "target": [r.fields["target"] for r in records]}
    )
    rows = texts.map(
        _encode_instructions,
        batched=True,
        num_proc=_procs(num_proc, len(records)),
        remove_columns=["input", "target"],
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length},
        features=Features({**ROW_FEATURES, "truncated": Value("bool")}),
        desc="Tokenizing instruction records",
    )
    num_overlong = sum(rows["truncated"])
    if drop_overlong and num_overlong:
        rows = rows.filter(lambda truncated: not truncated, input_columns="truncated")
    return rows.remove_columns("truncated"), num_overlong


def _encode_documents(batch: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    bos_id, eos_id = special_ids(tokenizer)
    texts = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    return {"ids": [document_ids(ids, bos_id, eos_id) for ids in texts]}


def _blocks(documents: Dataset, max_seq_length: int) -> Iterator[dict]:
    def ids() -> Iterator[list[int]]:
        for batch in documents.iter(batch_size=1000):
            yield from batch["ids"]

    for row in pack_documents(ids(), max_seq_length):
        yield {"input_ids": row.input_ids, "labels": row.labels, "position_ids": row.position_ids}


def tokenize_documents(
    records: list[Record], tokenizer: PreTrainedTokenizerBase, max_seq_length: int, num_proc: int, scratch: Path
) -> Dataset:
    """Pretraining blocks of `max_seq_length` tokens.

    Tokenizing runs in parallel; packing is one sequential pass over the token ids (cheap next to tokenizing),
    so that only the corpus' very last block is short, rather than one per map batch and per process as with
    the usual `group_texts` map.
    """
    documents = Dataset.from_dict({"text": [document_text(r) for r in records]}).map(
        _encode_documents,
        batched=True,
        num_proc=_procs(num_proc, len(records)),
        remove_columns=["text"],
        fn_kwargs={"tokenizer": tokenizer},
        desc="Tokenizing documents",
    )
    return Dataset.from_generator(
        _blocks,
        gen_kwargs={"documents": documents, "max_seq_length": max_seq_length},
        features=ROW_FEATURES,
        cache_dir=str(scratch),
    )


def _procs(num_proc: int, num_records: int) -> int | None:
    # Starting processes costs more than tokenizing a few thousand records.
    return num_proc if num_proc > 1 and num_records >= 4 * 1000 else None


def pack_instructions(rows: Dataset, max_seq_length: int, scratch: Path) -> Dataset:
    """Instruction rows packed whole into blocks of at most `max_seq_length` tokens."""
    plan = plan_packs([len(ids) for ids in rows["input_ids"]], max_seq_length)
    return Dataset.from_generator(
        _packed, gen_kwargs={"rows": rows, "plan": plan}, features=ROW_FEATURES, cache_dir=str(scratch)
    )


def _packed(rows: Dataset, plan: list[list[int]]) -> Iterator[dict]:
    yield from pack_rows(rows, plan)
