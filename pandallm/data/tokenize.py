"""Tokenizing validated records into rows with Hugging Face `datasets` (batched, in `num_proc` processes)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset, Features, Sequence, Value
from transformers import PreTrainedTokenizerBase

from pandallm.console import no_progress_bars
from pandallm.data.encode import conversation_row, document_ids, pack_documents
from pandallm.data.packing import pack_rows, plan_packs
from pandallm.data.records import PromptRecord, Record
from pandallm.data.template import ChatTemplate, Rendered, render_record

log = logging.getLogger(__name__)

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


# How user text is tokenized where pandallm adds the special tokens itself (the plain layout, pretraining
# documents): no BOS / EOS added, and none read from the text either. A literal "<s>" or "</s>" in a record
# (HTML strike-through tags are common in scraped text) stays text, rather than becoming a BOS inside a row or an
# EOS trained in the middle of a reply.
AS_TEXT = {"add_special_tokens": False, "split_special_tokens": True}

Encoded = tuple[list[int], list[tuple[list[int], bool]], int]


def encode_segments(rendered: list[Rendered], tokenizer: PreTrainedTokenizerBase) -> list[Encoded]:
    """Token ids of rendered conversations, as `(head, segments)` for `conversation_row`, with the number of
    segment boundaries of each that fell inside a token (see below).

    Plain layout: head `[BOS]`; every segment is tokenized on its own and EOS follows every trained one. (A
    PandaLLM record is exactly `[BOS] input target [EOS]`, as before templates existed.)

    Jinja template: the text is tokenized as a whole, as at inference, with no special token added: the template
    writes BOS and EOS itself, so there is never a second BOS. A segment boundary is placed where the tokens of the
    text up to it end; the text up to each boundary is tokenized too, to verify that its tokens are exactly the
    first tokens of the whole (then the labels are exact). Where the tokenizer merges characters across a boundary,
    the merged token goes to the trained side of it (the reply it starts or ends), and the boundary is counted.
    """
    bos_id, eos_id = special_ids(tokenizer)
    head = [] if bos_id is None else [bos_id]
    plain = [r for r in rendered if not r.templated]
    plain_ids = iter(tokenizer([t for r in plain for t in r.texts], **AS_TEXT)["input_ids"]) if plain else iter(())
    templated = [r for r in rendered if r.templated]
    # For each templated conversation: its text up to every inner boundary, then the whole text.
    prefixes = [["".join(r.texts[: k + 1]) for k in range(len(r.texts))] for r in templated]
    flat = tokenizer([p for ps in prefixes for p in ps], add_special_tokens=False)["input_ids"] if templated else []
    out: list[Encoded] = []
    at = 0
    for r in rendered:
        if not r.templated:
            segments = [([*next(plain_ids), eos_id] if trained else next(plain_ids), trained) for trained in r.trained]
            out.append((head, segments, 0))
            continue
        ids = flat[at : at + len(r.texts)]
        at += len(r.texts)
        whole, start, segments, num_merged = ids[-1], 0, [], 0
        for prefix_ids, trained in zip(ids, r.trained, strict=True):
            end = len(prefix_ids)
            if whole[:end] != prefix_ids:
                # The token at the common prefix's end straddles the boundary: a reply keeps its last token (its end
                # marker, often), and a prompt gives its straddling token to the reply after it.
                end = min(_common_prefix(whole, prefix_ids) + (1 if trained else 0), len(whole))
                num_merged += 1
            segments.append((whole[start:end], trained))
            start = max(start, end)
        # A BOS the template wrote becomes the row's head, so that cutting an over-long prompt from the left keeps it.
        template_head = []
        if bos_id is not None and segments and segments[0][0][:1] == [bos_id]:
            template_head, segments[0] = [bos_id], (segments[0][0][1:], segments[0][1])
        out.append((template_head, segments, num_merged))
    return out


def prompt_rows(
    prompts: list[PromptRecord], chosen: ChatTemplate | None, tokenizer: PreTrainedTokenizerBase, max_seq_length: int
) -> list[dict]:
    """`pandallm predict`'s rows: each prompt's ids exactly as a training row of its record begins, up to its reply
    (the same template decision, `render_record`, and the same tokenization, `encode_segments`), with what
    `predictions.jsonl` shows of it and its reference reply. A prompt longer than `max_seq_length` is cut from the
    left, after its BOS, as training cuts an over-long prompt."""
    rendered = [render_record(prompt, chosen, tokenizer) for prompt in prompts]
    rows = []
    for index, (prompt, (head, segments, _)) in enumerate(
        zip(prompts, encode_segments(rendered, tokenizer), strict=True)
    ):
        ids = [token for piece, _ in segments for token in piece]
        ids = ids[max(len(ids) - (max_seq_length - len(head)), 0) :]
        rows.append({"input_ids": head + ids, "index": index, "prompt": prompt.shown, "reference": prompt.reference})
    return rows


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _encode_instructions(batch: dict, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> dict:
    rendered = [Rendered(*fields) for fields in zip(batch["texts"], batch["trained"], batch["templated"], strict=True)]
    out: dict[str, list] = {
        "input_ids": [],
        "labels": [],
        "position_ids": [],
        "truncated": [],
        "merged": [],
        "trains": [],
    }
    for head, segments, num_merged in encode_segments(rendered, tokenizer):
        row, truncated = conversation_row(head, segments, max_seq_length)
        out["trains"].append(any(trained and ids for ids, trained in segments))
        out["input_ids"].append(row.input_ids)
        out["labels"].append(row.labels)
        out["position_ids"].append(row.position_ids)
        out["truncated"].append(truncated)
        out["merged"].append(num_merged)
    return out


def tokenize_instructions(
    rendered: list[Rendered],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    num_proc: int,
    drop_overlong: bool,
) -> tuple[Dataset, int]:
    """Instruction rows, and how many conversations did not fit `max_seq_length` (truncated, or with
    `drop_overlong` left out)."""
    texts = Dataset.from_dict(
        {
            "texts": [r.texts for r in rendered],
            "trained": [r.trained for r in rendered],
            "templated": [r.templated for r in rendered],
        }
    )
    rows = texts.map(
        _encode_instructions,
        batched=True,
        num_proc=_procs(num_proc, len(rendered)),
        remove_columns=["texts", "trained", "templated"],
        fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length},
        features=Features(
            {**ROW_FEATURES, "truncated": Value("bool"), "merged": Value("int32"), "trains": Value("bool")}
        ),
        desc="Tokenizing instruction records",
    )
    num_merged = sum(rows["merged"])
    if num_merged:
        log.warning(
            "%d turn boundaries fell inside a token (the template's text and the tokenizer merge characters across "
            "them); each merged token was trained with the reply it belongs to in part",
            num_merged,
        )
    num_overlong = sum(rows["truncated"])
    if drop_overlong and num_overlong:
        rows = rows.filter(lambda truncated: not truncated, input_columns="truncated")
    # A conversation whose replies are all empty would become a row with every label masked: nothing to learn from,
    # and a zero token count in the loss. Left out and counted.
    num_untrained = rows.num_rows - sum(rows["trains"])
    if num_untrained:
        log.warning("%d conversations have no trained token (empty replies); they were left out", num_untrained)
        rows = rows.filter(lambda trains: trains, input_columns="trains")
    return rows.remove_columns(["truncated", "merged", "trains"]), num_overlong


def _encode_documents(batch: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    bos_id, eos_id = special_ids(tokenizer)
    texts = tokenizer(batch["text"], **AS_TEXT)["input_ids"]
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
    documents = Dataset.from_dict({"text": [r.text for r in records]}).map(
        _encode_documents,
        batched=True,
        num_proc=_procs(num_proc, len(records)),
        remove_columns=["text"],
        fn_kwargs={"tokenizer": tokenizer},
        desc="Tokenizing documents",
    )
    with no_progress_bars():  # "Generating train split": the packing pass, not worth a bar of its own
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
    with no_progress_bars():
        return Dataset.from_generator(
            _packed, gen_kwargs={"rows": rows, "plan": plan}, features=ROW_FEATURES, cache_dir=str(scratch)
        )


def _packed(rows: Dataset, plan: list[list[int]]) -> Iterator[dict]:
    yield from pack_rows(rows, plan)
