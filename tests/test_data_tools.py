"""`pandallm data check` and `pandallm data stats` through the command line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pandallm.cli import main
from pandallm.errors import ConfigError
from tests.conftest import REPO, write_jsonl
from tests.data.word_tokenizer import save_word_tokenizer


def test_check_lists_every_error_and_fails(tmp_path: Path, capsys) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": "Hi", "output": "Hello"}] * 3)
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hello"}]},
            {"conversations": [{"from": "human", "value": "Hi"}]},
            {"input": "Hi", "target": "Hello"},
        ],
    )
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"title": "t", "content": "c"},\n  {"title": "t"\n]\n')
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", str(good), str(bad), str(broken)])
    assert exit_.value.code == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        f"{bad}:2: field 'conversations[1].from': expected one of ['assistant', 'chatgpt', 'gpt', 'human', 'system', "
        "'user'], got 'robot'",
        f"{bad}:3: field 'conversations': has no non-empty assistant turn to train on",
        f"{bad}:4: a pandallm record ['input', 'target'] in a file of sharegpt records (detected from line 1); a file "
        "holds one format",
        f"{broken}:4: invalid JSON: Expecting ',' delimiter (column 1)",
    ]
    assert f"{good}: 3 valid records (alpaca 3), 0 errors" in out.err
    main(["data", "check", str(good)])  # no error: returns normally, exit status 0


def test_check_with_a_kind_finds_records_in_the_wrong_data_directory(tmp_path: Path, capsys) -> None:
    documents = write_jsonl(tmp_path / "it" / "docs.jsonl", [{"title": "t", "content": "c"}])
    write_jsonl(tmp_path / "it" / "qa.jsonl", [{"input": "Hi", "target": "Hello"}])
    main(["data", "check", str(tmp_path / "it")])  # either kind is fine without --kind
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", "--kind", "instruction", str(tmp_path / "it")])
    assert exit_.value.code == 1
    assert capsys.readouterr().out.splitlines() == [  # what training says of it
        f"{documents}:1: a pretraining record (pretraining) where instruction records are expected",
    ]


def test_check_with_a_tokenizer_also_renders_every_conversation(tmp_path: Path, capsys) -> None:
    two_users = {"messages": [{"role": "user", "content": "Hi"}] * 2 + [{"role": "assistant", "content": "Hello"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [two_users])
    main(["data", "check", str(path)])
    with pytest.raises(SystemExit):
        main(["data", "check", str(path), "--tokenizer", save_word_tokenizer(tmp_path / "w"), "--template", "llama-2"])
    assert f"{path}:1: template 'llama-2'" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--template and --template_dir render records with a tokenizer"):
        main(["data", "check", str(path), "--template", "llama-2"])  # not a silent pass


def test_stats_reports_formats_and_lengths_and_saves_a_histogram(tmp_path: Path, capsys) -> None:
    words = save_word_tokenizer(tmp_path / "words")
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"instruction": "Hi", "output": "Hello"}] * 3)
    # Plain layout: [BOS] Hi Hello [EOS] is 4 tokens; [BOS] Hi Hello [EOS] Capital? Paris [EOS] is 7.
    write_jsonl(
        tmp_path / "d" / "b.jsonl",
        [
            {
                "messages": [
                    {"role": r, "content": c}
                    for r, c in [("user", "Hi"), ("assistant", "Hello"), ("user", "Capital?"), ("assistant", "Paris")]
                ]
            }
        ],
    )
    (tmp_path / "d" / "c.txt").write_text("Hi Hello Hi Hello Hi Hello Hi Hello")  # [BOS] 8 words [EOS]
    histogram = tmp_path / "out" / "lengths.png"
    args = ["data", "stats", str(tmp_path / "d"), "--tokenizer", words, "--template", "none", "--max_seq_length", "6"]
    main([*args, "--histogram", str(histogram)])
    out = capsys.readouterr().out
    assert "records: 5 (alpaca 3, openai 1, text 1)" in out
    assert "tokens per record: min 4, mean 5.8, median 4, p95 10, max 10" in out  # 4 4 4 7 10
    # Instruction records over the limit are cut; a document over it is packed across blocks: reported apart.
    assert "instruction records over max_seq_length=6: 1 of 4 (25.0%); training cuts their prompts" in out
    assert "documents over max_seq_length=6: 1 of 1 (100.0%); documents are packed into blocks" in out
    assert histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stats_reports_the_valid_records_lists_the_errors_and_writes_no_file_unasked(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    words = save_word_tokenizer(tmp_path / "words")
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello"}, {"instruction": "Hi", "output": ""}] * 2
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["data", "stats", str(data), str(tmp_path / "missing.jsonl"), "--tokenizer", words])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "records: 2 (alpaca 2)" in out and "tokens per record: min 4," in out
    assert f"{data}:2: field 'output': is empty" in out and f"{data}:4: field 'output'" in out
    assert f"{tmp_path / 'missing.jsonl'}: no such file or directory" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "words"]  # no token_lengths.png here


def test_a_missing_path_is_listed_among_the_errors(tmp_path: Path, capsys) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"input": "Hi", "target": "Hello"}])
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", str(tmp_path / "nothing.jsonl"), str(good), str(tmp_path / "gone")])
    assert exit_.value.code == 1
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        f"{tmp_path / 'nothing.jsonl'}: no such file or directory",
        f"{tmp_path / 'gone'}: no such file or directory",
    ]
    assert f"{good}: 1 valid records (pandallm 1), 0 errors" in out.err  # read after the first missing path


def test_a_directory_without_readable_sources_is_listed_among_the_errors(tmp_path: Path, capsys) -> None:
    # It ended the check (exit 2) before the other paths were read.
    (tmp_path / "empty").mkdir()
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "b.jsonl.bz2").write_bytes(b"")
    good = write_jsonl(tmp_path / "good.jsonl", [{"input": "Hi", "target": "Hello"}])
    with pytest.raises(SystemExit) as exit_:
        main(["data", "check", str(tmp_path / "empty"), str(tmp_path / "shards"), str(good)])
    assert exit_.value.code == 1
    out = capsys.readouterr()
    assert [line.split(" holds")[0].split(": cannot")[0] for line in out.out.splitlines()] == [
        f"data '{tmp_path / 'empty'}'",
        f"data '{tmp_path / 'shards'}'",
    ]
    assert f"{good}: 1 valid records (pandallm 1), 0 errors" in out.err


def test_a_user_error_of_a_tool_is_one_line_on_the_command_line(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": "Hi", "target": "Hello"}])
    done = subprocess.run(
        [sys.executable, "-m", "pandallm", "data", "check", str(data), "--template", "chatml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "pandallm data: error: --template and --template_dir render records with a tokenizer" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name", ["lengths", "lengths.txt", "."])
def test_a_histogram_path_that_is_not_a_png_file_is_refused(tmp_path: Path, monkeypatch, name: str) -> None:
    # `lengths` was written as `lengths.png` while `lengths` was printed; `.txt` was a traceback after the reading.
    words = save_word_tokenizer(tmp_path / "words")
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", [{"input": "Hi", "target": "Hello"}])
    with pytest.raises(ConfigError, match=rf"--histogram '{re.escape(name)}': give the path of a .png file"):
        main(["data", "stats", str(data), "--tokenizer", words, "--histogram", name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "words"]
