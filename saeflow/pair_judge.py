"""An optional LLM judge of matched feature pairs ("Mechanistic Permutability", Balagansky et
al., ICLR 2025, sec. 4.2: an LLM rates whether two matched features mean the SAME, MAYBE the
same, or a DIFFERENT thing, scored 3 / 2 / 1).

The paper shows the judge the two features' Neuronpedia explanations. saeflow has no
explanations, so the judge sees each feature's top activating contexts from the held-out text,
the peak token marked [[like this]], and answers with one word. Any OpenAI-compatible chat
endpoint works (``url`` such as http://127.0.0.1:8000/v1; the API key, if any, from
``$SAEFLOW_JUDGE_API_KEY``). Nothing is sent unless a judge is configured.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

SCORES = {"SAME": 3.0, "MAYBE": 2.0, "DIFFERENT": 1.0}
PROMPT = ("Two features of a language model are shown by the text snippets where each fires "
          "most strongly; the token where it fires is marked [[like this]].\n\n"
          "Feature A:\n{a}\n\nFeature B:\n{b}\n\n"
          "Do A and B detect the same concept? Answer with one word: SAME, MAYBE or DIFFERENT.")
PairJudge = Callable[[Sequence[str], Sequence[str]], float]


def parse_verdict(reply: str) -> float:
    """3 / 2 / 1 for the first SAME / MAYBE / DIFFERENT in the reply; ValueError otherwise."""
    m = re.search(r"\b(SAME|MAYBE|DIFFERENT)\b", reply.upper())
    if not m:
        raise ValueError(f"the pair judge answered neither SAME, MAYBE nor DIFFERENT: "
                         f"{reply[:200]!r}")
    return SCORES[m.group(1)]


def judge_pair(url: str, model: str, contexts_a: Sequence[str], contexts_b: Sequence[str],
               api_key: str | None = None, timeout: float = 60.0) -> float:
    """The judge's score of one pair (3 SAME, 2 MAYBE, 1 DIFFERENT); nan when a feature has no
    contexts (it never fired)."""
    if not contexts_a or not contexts_b:
        return float("nan")
    from saeflow.scoring import chat_completion
    text = PROMPT.format(a="\n".join(f"- {c}" for c in contexts_a),
                         b="\n".join(f"- {c}" for c in contexts_b))
    return parse_verdict(chat_completion(url, model, text, api_key, timeout))


def make_pair_judge(url: str | None, model: str | None) -> PairJudge | None:
    """``(contexts_a, contexts_b) -> score`` through the endpoint, or None when not configured."""
    if not url and not model:
        return None
    if not url or not model:
        raise ValueError("the pair judge needs both --judge-url and --judge-model")
    key = os.environ.get("SAEFLOW_JUDGE_API_KEY")
    return lambda a, b: judge_pair(url, model, a, b, key)
