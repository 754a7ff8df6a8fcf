"""Several templates per data set: each record rendered with one drawn from the seed and the record itself, so the
choice is reproducible, independent of the rest of the data, and resumes as it was."""

from __future__ import annotations

from pathlib import Path

import pytest

from pandallm.data import PandaDataModule
from pandallm.errors import ConfigError
from tests.conftest import TOKENIZER_DIR, write_jsonl

RECORDS = [{"input": f"Question number {i}?", "target": f"Answer {i}."} for i in range(40)]


def rendered(tmp_path: Path, records: list, name: str, **options) -> dict[str, str]:
    """Each record's row, decoded, by its question."""
    write_jsonl(tmp_path / name / "a.jsonl", records)
    dm = PandaDataModule(
        tokenizer=str(TOKENIZER_DIR),
        instruction_tuning_data_dir=str(tmp_path / name),
        pretraining_data_dir=None,
        template="chatml",
        num_workers=0,
        max_seq_length=96,
        cache_dir=str(tmp_path / "cache"),
        **options,
    )
    dm.prepare_data()
    dm.setup("fit")
    texts = [dm.tokenizer.decode(ids) for ids in dm.datasets["train"]["input_ids"]]
    return {next((r["input"] for r in records if r["input"] in t), t): t for t in texts}


def test_each_record_draws_a_template_by_the_seed_and_itself(tmp_path: Path) -> None:
    both = rendered(tmp_path, RECORDS, "all", template_choices=["alpaca"])
    chatml = {q for q, text in both.items() if "<|im_start|>" in text}
    alpaca = {q for q, text in both.items() if "### Instruction:" in text}
    assert chatml | alpaca == set(both) and not chatml & alpaca
    assert 10 <= len(chatml) <= 30  # both drawn, about evenly
    # Read again beside another source, in another directory: every record keeps its template and its row.
    others = [{"input": f"Other question {i}?", "target": "Other."} for i in range(9)]
    write_jsonl(tmp_path / "more" / "0_first.jsonl", others)
    more = rendered(tmp_path, RECORDS, "more", template_choices=["alpaca"])
    assert all(more[q] == both[q] for q in both)
    # Another seed draws otherwise; without choices, every row is data.template's.
    reseeded = rendered(tmp_path, RECORDS, "all", template_choices=["alpaca"], seed=7)
    assert {q for q, text in reseeded.items() if "<|im_start|>" in text} != chatml
    assert all("<|im_start|>" in text for text in rendered(tmp_path, RECORDS, "all").values())


def test_an_unknown_choice_names_its_place_in_the_list(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.template_choices\[1\] 'nope': expected one of"):
        rendered(tmp_path, RECORDS, "all", template_choices=["alpaca", "nope"])
