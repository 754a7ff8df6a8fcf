"""The generation metrics equal the reference libraries' own CLIs and functions on the same strings, and
hand-checked values; Chinese is scored by character."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pandallm.errors import ConfigError
from pandallm.eval import metrics
from pandallm.eval.metrics import check_names, score

OUTPUTS = ["The cat sat on the mat.", "It is raining today", "Paris is the capital of France."]
REFERENCES = ["The cat is sitting on the mat.", "It rains today.", "Paris is the capital of France."]
CHINESE_OUTPUTS = ["长城很长。", "黄河是中国第二长的河流"]
CHINESE_REFERENCES = ["长城全长两万多公里。", "黄河是中国第二长河。"]


def sacrebleu_cli(tmp_path: Path, outputs: list[str], references: list[str], *options: str) -> float:
    (tmp_path / "out.txt").write_text("\n".join(outputs) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(references) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i", str(tmp_path / "out.txt")]
    result = subprocess.run([*command, "-b", "-w", "6", *options], capture_output=True, text=True, check=True)
    return float(result.stdout.strip())


@pytest.mark.parametrize(
    ("outputs", "references", "tokenize"), [(OUTPUTS, REFERENCES, "13a"), (CHINESE_OUTPUTS, CHINESE_REFERENCES, "zh")]
)
def test_bleu_and_chrf_equal_the_sacrebleu_command(tmp_path: Path, outputs, references, tokenize) -> None:
    scores = score(["bleu", "chrf"], outputs, references)
    assert round(scores["bleu"], 6) == sacrebleu_cli(
        tmp_path, outputs, references, "-m", "bleu", "--tokenize", tokenize
    )
    assert round(scores["chrf"], 6) == sacrebleu_cli(tmp_path, outputs, references, "-m", "chrf")
    assert score(["exact_match"], outputs, references)["exact_match"] == (1 / 3 if tokenize == "13a" else 0.0)


def test_rouge_equals_rouge_score_on_english() -> None:
    from rouge_score.rouge_scorer import RougeScorer

    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"])
    expected = {name: 0.0 for name in ("rouge1", "rouge2", "rougeL")}
    for output, reference in zip(OUTPUTS, REFERENCES, strict=True):
        for name, value in scorer.score(reference, output).items():
            expected[name] += value.fmeasure / len(OUTPUTS)
    assert score(["rouge"], OUTPUTS, REFERENCES) == pytest.approx(expected, abs=1e-12)


def test_rouge_scores_chinese_by_character() -> None:
    from rouge_score.rouge_scorer import RougeScorer

    # rouge-score's own tokenizer keeps [a-z0-9] only: Chinese text is empty to it, and scores 0.
    assert RougeScorer(["rouge1"]).score("长城全长两万多公里。", "长城很长。")["rouge1"].fmeasure == 0.0
    # By character: output 长 城 很 长, reference 长 城 全 长 两 万 多 公 里; 3 in common (长 twice, 城).
    # P = 3/4, R = 3/9, F = 2PR / (P + R) = 6/13. Longest common subsequence 长 城 长: the same.
    scores = score(["rouge"], ["长城很长。"], ["长城全长两万多公里。"])
    assert scores["rouge1"] == pytest.approx(6 / 13) and scores["rougeL"] == pytest.approx(6 / 13)
    # Bigrams: output 长城 城很 很长; reference 长城 城全 全长 长两 ...: 1 in common, P = 1/3, R = 1/8.
    assert scores["rouge2"] == pytest.approx(2 * (1 / 3) * (1 / 8) / (1 / 3 + 1 / 8))
    # Mixed text: words as rouge-score tokenizes them, each CJK character a token.
    assert metrics.CJKTokenizer().tokenize("LoRA 训练, fast!") == ["lora", "训", "练", "fast"]


def test_meteor_equals_nltk_and_its_documented_value() -> None:
    from nltk.translate.meteor_score import meteor_score

    # NLTK's own documented example (nltk.translate.meteor_score): 0.6944.
    hypothesis = "It is a guide to action which ensures that the military always obeys the commands of the party"
    reference = "It is a guide to action that ensures that the military will forever heed Party commands"
    assert round(score(["meteor"], [hypothesis], [reference])["meteor"], 4) == 0.6944
    wordnet = metrics.wordnet_reader()
    expected = sum(
        meteor_score([metrics.meteor_tokens(r)], metrics.meteor_tokens(o), wordnet=wordnet)
        for o, r in zip(OUTPUTS, REFERENCES, strict=True)
    ) / len(OUTPUTS)
    assert score(["meteor"], OUTPUTS, REFERENCES)["meteor"] == pytest.approx(expected, abs=1e-12)
    assert metrics.meteor_tokens("长城, long!") == ["长", "城", ",", "long", "!"]


def test_edit_distance_is_normalised_levenshtein() -> None:
    # kitten -> sitting: 3 edits over the longer length, 7; identical strings: 0.
    assert score(["edit_distance"], ["kitten", "same"], ["sitting", "same"])["edit_distance"] == pytest.approx(3 / 14)


def test_an_unknown_metric_is_refused_with_the_valid_names() -> None:
    with pytest.raises(ConfigError) as error:
        check_names(["bleu", "blue"], "evaluation.metrics")
    assert str(error.value) == (
        "evaluation.metrics: unknown metric(s) ['blue']; the metrics are "
        "['ppl', 'bleu', 'chrf', 'rouge', 'meteor', 'edit_distance', 'exact_match']"
    )
