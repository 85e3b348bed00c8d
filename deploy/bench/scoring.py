"""Task scores of an answer against a reference: exact, contains, ROUGE-L (chars for Chinese)."""

from __future__ import annotations

import re
import unicodedata

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().strip()
    return re.sub(r"[\s\.,!?;:'\"()\[\]。，！？；：“”‘’（）]+", " ", text).strip()


def units(text: str) -> list[str]:
    """Words for Latin text; single characters for Chinese, which has no spaces between words."""
    text = normalize(text)
    return [c for c in text if not c.isspace()] if CJK.search(text) else text.split()


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of words (characters for Chinese)."""
    a, r = units(answer), units(reference)
    if not a or not r:
        return 0.0
    previous = [0] * (len(r) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(r):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def score(answer: str, reference: str) -> dict[str, float]:
    return {
        "exact": float(normalize(answer) == normalize(reference)),
        "contains": float(normalize(reference) in normalize(answer)),
        "rouge_l": rouge_l(answer, reference),
    }
