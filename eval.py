"""eval.py: the clinical evaluation protocol of SkinFlow (arXiv 2601.09136, Sec. "Evaluation").

SkinFlow reports Top-1 / Top-6 on 1,000 Fitzpatrick17k images (29.19 / 71.16), scored by an LLM judge
(Gemini 2.5 Pro, three runs) that applies a *permissive clinical hierarchy*: a ranked differential of up
to six diagnoses counts as a hit when its first clinically correct entry -- the same condition, a synonym,
or a valid subtype -- sits at rank 1 (Top-1) or anywhere in the list (Top-6). The judge prompt, the
hierarchy and the safety rules were not released, so this module rebuilds the protocol as a
*deterministic, offline* judge that anyone can rerun, and keeps an LLM judge as an option.

Map of the file (the numbered banners below follow this order, top to bottom). The paper's protocol
comes first and stands together (sections 1-4: answer -> label -> verdict -> Top-k); the plumbing
follows the marker "below: plumbing (not in the paper)". This module stands on skinflow.py, dve.py
(the one checkpoint loader, dve.load) and data.py, never on rl.py (rl.py's rewards call this judge).

1. Parsers.   `parse_ranked_list` / `parse_caption` turn a raw generation into the Stage II ranked list
              (<= 6 entries) and the Stage I caption fields. They never raise; the `_ex` companions also
              return a flag saying whether the text followed the requested format.
2. Vocabulary. `canonical(text)` maps free text ("BCC", "Kaposi's sarcoma", "naevi") to one of the 114
              Fitzpatrick17k labels (data.TAXONOMY keys) or None. The alias table ALIASES is the single
              home of synonyms in this repo (rl.py's rewards call `canonical`).
3. Judge.     `judge(prediction, truth)` -> correct | subtype | near_miss | safety_critical | wrong |
              unknown, using SYNONYMS, SUBTYPES, the near-miss families (data.FAMILY) and the
              three-partition of Fitzpatrick17k.
4. Metrics.   `clinical_metrics(cases)`: clinical and strict Top-1/Top-6, MRR, near-miss, safety-critical
              and format-failure rates, each with a bootstrap 95 % interval, by skin type and partition.
   ----- below: plumbing (not in the paper) -----
5. Report.    `write_report` -> report.md + metrics.json + cases.jsonl + a pillow bar chart.
6. Summary.   `python eval.py summary RUN_DIR`: the results table of a train.sh run (paired-bootstrap
              gain over the warm start), the ablation table next to the paper's, and curves.png.
7. Seeing.    `attention_maps`, `draw_heatmap`, `lesion_focus` (final-token attention on the lesion) and
              `diagnose`, run as `python eval.py diagnose IMAGE` (it was `skinflow.py diagnose`).
8. LLM judge. `LLMJudge`: an OpenAI-compatible chat endpoint over urllib, majority of N runs.
9. CLI.       `python eval.py --model ... | --predictions preds.jsonl ... --out DIR`, and the subcommands
              `summary`, `diagnose`, `generate` (the backbone demo that was `python skinflow.py`).

Every rule below is a *choice* where the paper is silent; each one is written next to an example.

Reading this next to the paper's evaluation section, four things are worth comparing:

* What is scored. The paper credits "correct + valid subclass" and says its protocol "prioritizes
  diagnostic safety and hierarchical relevance over rigid label matching". Here that is the `correct` +
  `subtype` verdicts (clinical Top-k). The strict columns (exact Fitzpatrick17k label) are printed next to
  them so you can see how much of a score comes from the lenient hierarchy alone.
* What is unknown. The judge prompt, the hierarchy it used (ICD-11? the dataset's partitions?), how its
  three runs were combined and whether safety errors lowered the score were not published. Our hierarchy
  is the dataset's own 114 -> 9 -> 3 tree plus the short SYNONYMS / SUBTYPES tables below; safety errors
  are reported as a rate, never subtracted from Top-k.
* Which images. The paper's 1,000 Fitzpatrick17k images were never listed; data.eval_sample draws a
  fixed stand-in of the same size. Numbers are comparable in kind, not image for image.
* How precise a number is. At n = 1,000 a rate near 29 % has a 95 % half-width of about
  1.96 * sqrt(0.29 * 0.71 / 1000) = 2.8 points, so 29.19 vs 24.45 (the paper's DVE ablation) is a gap
  beyond that noise, while a 1-point change is not. A skin-type-VI bucket of ~40 images has a half-width
  of ~14 points: read the fairness table for large gaps only. Every rate below carries a bootstrap interval.
"""
from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import os
import re
import string
import sys
import unicodedata
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np

import dve  # the one checkpoint loader (dve.load, dve.load_checkpoint); eval.py never imports rl.py
from data import CAPTION_FIELDS, FAMILY, TAXONOMY

# A dermatologist's differential is a short ranked list; SkinFlow scores six entries (Top-6), so a seventh
# entry can never earn credit and the parsers stop at six. Changing this changes what "Top-6" means.
MAX_ITEMS = 6
VERDICTS = ("correct", "subtype", "near_miss", "safety_critical", "wrong", "unknown")
CREDITED = ("correct", "subtype")  # the verdicts that count as a hit for clinical Top-k (paper: correct + subclass)

# ===================================================================================================
# 1. Parsers (never raise)
# ===================================================================================================
# Canonical Stage II format (data.format_differential):   "1. psoriasis\n2. eczema\n..."  (<= 6 lines)
# Canonical Stage I format  (data.format_caption):        "colour: erythematous, salmon\nlocation: trunk\n..."
# Real generations drift from both. Chat and VLM models answer a "give a ranked differential" prompt in
# a handful of recurring styles, and the Stage II parser reads each of them (one test case or more per
# style in test_skinflow.py's answer corpus):
#
#   style                               example                                         how it is read
#   numbered list                       "1. X\n2) Y\n(3) Z\n4.W"  "**1.** X"            one entry per marker
#   one-line numbering                  "1. X 2. Y 3. Z"                                split at the markers
#   bullets, any glyph                  "- X" "* X" "• X" "· X" "▪ X" "→ X"             one entry per bullet
#   sub-bullets / indented lines        "1. X\n   - silvery scale"                     explanation, skipped
#   header with the first item          "Differential: - X\n- Y"  "Most likely: X"       header dropped, X kept
#   header with a list                  "Other possibilities: Y, Z; W"                   split at , ; and/or
#   decorations after a name            "X – 60 %"  "X (because ...)"  "X: ..."  "X. Y"  the name only
#   markdown                            "## Differential", "**X**", "_X_", "`X`"         markup dropped
#   markdown table with a rank column   "| Rank | Diagnosis |\n|---|---|\n| 1 | X |"   rows sorted by rank
#   JSON                                '["X", "Y"]'  '{"differential": [{"name": "X"}]}'   the list inside
#   tags and fences                     "<answer>...</answer>"  "```json ...```"         the inside only
#   reasoning blocks                    "<think>... not X ...</think> 1. Y"             the block is dropped
#   lead-ins and disclaimers            "Based on the image: ...", "Please see a doctor" no diagnosis, ignored
#   plain prose                         "most consistent with X; the differential includes Y and Z"
#                                       vocabulary mentions in text order, negated ones ("not X") dropped
#
# Header words (differential, diagnosis, most likely, other possibilities, top 3, final answer, ...) are
# never entries, and a repeated diagnosis keeps its first rank. Only lists (numbered, bulleted, a table,
# JSON) count as "the requested format" (flag True); a header with a comma list and prose still yield
# scoreable entries, with the flag False.
#
# Why "never raise": rl.py calls these parsers on every sampled completion during GRPO. Early in
# training those are often garbage (half a word, a repeated token, no newline at all); one exception in
# step 4,000 would kill a run that took hours. Garbage must become "empty list, format flag False", which
# the reward turns into zero and the report counts as a format failure.
# Why a separate format flag: a model that answers "psoriasis, eczema" gets the diagnosis scored (a user
# cares whether it is right) but the flag shows the Stage II output format was not learnt.

# A reasoning block names many diagnoses it then rejects ("not melanoma because ..."); scoring them would
# reward rambling, so <think>...</think> is removed and an <answer> block, when present, is all we read.
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S | re.I)           # an unterminated think block eats the rest
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S | re.I)
# Bullet glyphs models use: ASCII - * +, and the unicode bullets, middle dot, squares, arrows, en/em dash.
_GLYPHS = ("-*+\u2022\u00b7\u25aa\u25ab\u25cf\u25cb\u25e6\u2023\u2043\u25a0\u25a1\u27a4\u2192\u2013\u2014\u25ba\u2219"
           "\u2714\u2705\u25c6\u25c7\u2756\u2794\U0001F539\U0001F538")        # + check marks, diamonds, emoji
_G = "[" + re.escape(_GLYPHS) + "]"
# A list number: "1." "1)" "(1)" "[1]" "#1" "1:" "**1.**". The marker must be followed by a space, the line
# end, or a letter/markup ("1.Psoriasis", a style seen in the wild), never by a digit: "1.5 cm" is no entry.
_NUM = r"(?:\(\s*\d{1,2}\s*\)|\[\s*\d{1,2}\s*\]|#\s*\d{1,2}\s*[.):]?|\d{1,2}\s*[.):\]])"
# _LEAD: a list number at the start of a line, optionally after a bullet or bold markers: "1. x", "- 2) x".
# A letter marker ("a) psoriasis", "B. nevus") also counts at line start, but only before a space, so that
# "e.g. psoriasis" is no entry "g".
_LEAD = re.compile(r"^\s*(?:" + _G + r"\s*)?[*_]{0,2}\s*(?:" + _NUM + r"[*_]{0,2}(?=\s|$|[^\W\d_]|[*_])|"
                   r"[a-hA-H][.)][*_]{0,2}(?=\s))\s*(.*)$")
# _INLINE: the same markers inside a line ("1. psoriasis 2. eczema"), used to split such a line. Inline
# markers need a space (or line start / comma) before them, so "type 2 diabetes" or "v1.2" never split.
_INLINE = re.compile(r"(?:^|(?<=\s)|(?<=[,;]))(?:\(\d{1,2}\)|\d{1,2}[.)])(?=\s|$|[^\W\d_])\s*")
_BULLET = re.compile(r"^(\s*)" + _G + r"\s+(.*)$")
# Words that make up a header line ("**Most likely diagnosis:**", "Other possibilities", "Top 3", "DDx",
# "Here is my ranked differential"). A phrase made ONLY of these words is a header, never an entry; none
# of them is a content word of any label, so no diagnosis can be mistaken for a header (a test checks it).
_HEADER_WORDS = frozenset("""
    differential differentials diagnosis diagnoses diagnostic dx ddx answer answers final most likely least less
    more likelihood probable probability possible possibly possibilities possibility potential consideration
    considerations consider considered other others alternative alternatives top rank ranked ranking ranks
    list primary secondary main leading working clinical impression impressions assessment conclusion
    include includes including condition conditions options option suspected suspicion suspect favored
    favoured preferred best guess guesses second third top3 top5 top6
    """.split())
# Filler words a header may also hold ("Here are the most likely diagnoses for this image"); a phrase of
# filler alone ("a", "the", "is") is not a header, so a one-letter entry survives.
_HEADER_FILLER = frozenset("""
    are could be would might may i my our the a an of for this these here based on image photo picture lesion
    in order by decreasing descending highest lowest to and or also with your following as s next then is
    """.split())
# Section headings that introduce something other than a diagnosis: their bullets are findings, not entries.
_OTHER_SECTIONS = frozenset("""
    observation observations finding features feature description morphology reasoning rationale explanation
    recommendation recommendations next steps treatment management note notes disclaimer key
    workup work up investigations tests plan advice summary of why because
    """.split())
# Words no diagnosis name contains but disclaimers, lead-ins and descriptions do: a short phrase holding
# one of them and naming no label ("I am not a doctor", "please consult a dermatologist", "1.5 cm plaque
# on the shin") is not an entry.
_DISCLAIMER = re.compile(r"\b(?:i|i'm|im|me|my|we|you|your|please|consult|doctor|dermatologist|physician|"
                         r"professional|advice|image|photo|picture|cannot|can't|sure|hard|difficult|seems?|"
                         r"appears?|looks?|think|believe|would|should|based|hope|help|note|here|it|this|that|"
                         r"is|are|see|seek|medical|evaluation|examination|biopsy|confirm|"
                         r"plaques?|papules?|macules?|patch|patches|nodules?|vesicles?|lesions?|cm|mm|"
                         r"erythematous|scaly|scale|shows?|showing|located|on the)\b", re.I)
_END_PUNCT = string.punctuation + " \u2013\u2014\u2022\u00b7"
_MAX_ITEM_CHARS = 120


def _words(s: str) -> list[str]:
    """Lower-case alphanumeric words of s: "**Most likely:**" -> ["most", "likely"] (header tests only)."""
    return re.findall(r"[a-z0-9]+", unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode().lower())


def _is_header(s: str) -> bool:
    """True when s is made only of header words (and digits): "Differential Diagnosis", "Top 3", "Final answer".

    An empty phrase is not a header (there is nothing to drop); a phrase with one content word
    ("Most likely psoriasis") is not a header either: it holds an entry.
    """
    w = _words(s)
    return any(x in _HEADER_WORDS for x in w) and all(x in _HEADER_WORDS or x in _HEADER_FILLER or x.isdigit()
                                                      for x in w)


def _clean_item_once(s: str) -> str:
    """One pass of entry cleaning; each line below removes one kind of decoration a model adds.

    Example: "**Psoriasis** (70%) - silvery scale." -> "psoriasis"; "Eczema. Itchy, ill-defined" -> "eczema".
    """
    s = _THINK.sub(" ", s)
    s = re.sub(r"[<>*_`#|{}]", " ", s)                                   # markdown / tags / JSON braces
    s = re.sub(r"\([^)]*\)?|\[[^\]]*\]?", " ", s)                       # parentheticals "(BCC)", "(70%)"
    s = re.sub(r"\d+(?:\.\d+)?\s*%", " ", s)                           # confidences "70 %"
    s = re.sub(r"\b(?:p|prob|probability|confidence|likelihood)\s*[=:]?\s*0?\.\d+", " ", s, flags=re.I)  # "p=0.6"
    s = re.split(r"\s[-\u2013\u2014]+\s|\s*[\u2013\u2014]\s*", s)[0]     # "psoriasis - silvery scale" -> psoriasis
    if ":" in s:                                                         # "Dx: psoriasis" vs "psoriasis: because..."
        head, tail = s.split(":", 1)
        s = tail if _is_header(head) else head
    s = re.split(r"[.!?]\s+", s)[0]                                      # first sentence: "Eczema. Itchy." -> eczema
    s = re.sub(r"^\s*(?:\(\d{1,2}\)|\d{1,2}[.)])(?=\s|$|[^\W\d_])", " ", s)   # a list marker left at the start
    m = _INLINE.search(s)
    if m and m.start() > 0:                                              # an inline marker left inside: cut there
        s = s[:m.start()]
    if "," in s:                                                         # "psoriasis, given the scale" -> psoriasis
        head = s.split(",", 1)[0]
        if canonical(head) is not None or _is_header(s.split(",", 1)[1]):
            s = head
    s = " ".join(s.lower().split())
    s = s.strip(_END_PUNCT + _GLYPHS)
    if len(s) > _MAX_ITEM_CHARS:
        s = s[:_MAX_ITEM_CHARS].rsplit(" ", 1)[0].strip(_END_PUNCT)
    return s


def _clean_item(s: str) -> str:
    """Clean one entry to a fixed point: clean(clean(x)) == clean(x) by construction (idempotent parser)."""
    for _ in range(10):
        t = _clean_item_once(s)
        if t == s:
            break
        s = t
    return s


def _dedupe(items, limit: int = MAX_ITEMS) -> list[str]:
    """Drop empty entries, header phrases and repeats of one diagnosis (same label, or same text when unknown).

    Keeps <= limit entries, each at the rank of its FIRST mention: ["nevus", "mole", "melanoma"] ->
    ["nevus", "melanoma"] because "mole" is the same label as "nevus". "Differential diagnosis" -> dropped.
    """
    out, seen = [], set()
    for it in items:
        if not it or _is_header(it):
            continue
        label = canonical(it)
        k = "label:" + label if label else (_key(_tokens(it)) or " ".join(_tokens(it)) or it.strip())
        if not k or k in seen:
            continue
        seen.add(k)
        out.append(it)
        if len(out) == limit:
            break
    return out


def _is_name(s: str) -> bool:
    """True when the whole of s is one vocabulary name (label or alias), not just a name inside a phrase.

    "confluent and reticulated papillomatosis" -> True (so the list splitter keeps its "and");
    "eczema and psoriasis" -> False.
    """
    by_seq, by_key, _, _ = _index()
    toks = _expand(_tokens(s))
    return tuple(t for t in toks if t not in _STOP) in by_seq or _key(toks) in by_key


def _split_list(s: str) -> list[str]:
    """A comma / semicolon / 'and' / 'or' / 'vs' list -> its parts: "Y, Z and W" -> ["Y", "Z", "W"].

    Only for text already known to hold a list (after a header, a JSON string); an entry inside a numbered
    line is never split this way. A part that is one vocabulary name keeps its "and"/"or": "confluent and
    reticulated papillomatosis" stays one entry.
    """
    out = []
    for part in re.split(r"[;,]", s):
        if _is_name(part):
            out.append(part)
        else:
            out += re.split(r"\s(?:and|or|vs\.?|versus|as well as|and/or)\s", part)
    return [p for p in out if p.strip()]


_JSON_NAME_KEYS = ("diagnosis", "name", "label", "condition", "disease", "dx", "differential", "entity", "item")
_JSON_RANK_KEYS = ("rank", "position", "order", "#", "no", "number")


def _json_span(text: str) -> int:
    """Length of the outermost [...] / {...} span that `_from_json` reads (0 when there is none)."""
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    if not starts:
        return 0
    i = min(starts)
    return max(0, text.rfind("]" if text[i] == "[" else "}") - i + 1)


def _from_json(text: str):
    """The ranked entries of a JSON answer, or None when the text holds no JSON list.

    Accepts a list of names ('["psoriasis", "eczema"]'), a list of objects ('[{"rank": 2, "diagnosis":
    "eczema"}, {"rank": 1, "diagnosis": "psoriasis"}]', sorted by rank when every object has one), an
    object holding such a list under any key ('{"differential": [...]}', the first list-valued key wins),
    or an object of rank -> name ('{"1": "psoriasis", "2": "eczema"}'). The JSON may sit inside prose or a
    code fence: the outermost [...] or {...} span is tried.
    """
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    if not starts:
        return None
    i = min(starts)
    j = text.rfind("]" if text[i] == "[" else "}")
    if j <= i:
        return None
    try:
        obj = json.loads(text[i:j + 1])
    except ValueError:
        return None

    def entry(x):
        # one list element: a name, or an object whose name is under a known key (else its first string)
        if isinstance(x, str):
            return x
        if isinstance(x, dict):
            for k, v in x.items():
                if str(k).lower().strip() in _JSON_NAME_KEYS and isinstance(v, str):
                    return v
            return next((v for v in x.values() if isinstance(v, str)), None)
        return None

    def rank_of(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if str(k).lower().strip() in _JSON_RANK_KEYS and isinstance(v, (int, float)):
                    return v
        return None

    if isinstance(obj, dict):
        if obj and all(str(k).strip().isdigit() for k in obj):               # {"1": "psoriasis", "2": ...}
            return [str(obj[k]) for k in sorted(obj, key=lambda k: int(str(k).strip()))]
        lists = [v for v in obj.values() if isinstance(v, list)]
        firsts = [v for k, v in obj.items() if isinstance(v, str) and not _is_header(v) and _is_header(str(k))]
        obj = firsts + (lists[0] if lists else [])                          # {"most_likely": X, "others": [...]}
    if not isinstance(obj, list):
        return None
    ranks = [rank_of(x) for x in obj]
    if obj and all(r is not None for r in ranks):                           # objects with ranks: sort by them
        obj = [x for _, _, x in sorted(zip(ranks, range(len(obj)), obj), key=lambda t: (t[0], t[1]))]
    out = []
    for x in obj:
        e = entry(x)
        if e is not None:
            out.append(e)
    return out


def _from_table(lines: list[str]):
    """Entries of a markdown table, or None when there is none: the name column, sorted by a rank column.

    "| Rank | Diagnosis | Likelihood |\\n|---|---|---|\\n| 2 | eczema | 20 % |\\n| 1 | psoriasis | 70 % |"
    -> ["psoriasis", "eczema"]. The header row and the |---| rule are never entries; the name column is the
    one whose header names a diagnosis, else the first column that is not a rank number.
    """
    rows = [ln.strip().strip("|").split("|") for ln in lines if ln.strip().startswith("|") and ln.count("|") >= 2]
    rows = [[c.strip() for c in r] for r in rows]
    rule = next((i for i, r in enumerate(rows) if r and all(re.fullmatch(r":?-+:?", c) for c in r if c)), None)
    if rule is None or rule == 0:
        return None
    header, body = [c.lower() for c in rows[rule - 1]], [r for r in rows[rule + 1:] if any(r)]
    name_col = next((i for i, h in enumerate(header) if re.search(r"diagnos|condition|disease|name|dx|"
                                                                     r"differential|entity", h)), None)
    rank_col = next((i for i, h in enumerate(header) if re.search(r"rank|#|^no\.?$|order|position|^n$", h)), None)
    if name_col is None:
        name_col = next((i for i in range(len(header)) if i != rank_col and
                         not all(re.fullmatch(r"\W*\d+\W*", r[i] if i < len(r) else "") for r in body)), None)
    if name_col is None:
        return None

    def rank(r, k):
        m = re.search(r"\d+", r[rank_col]) if rank_col is not None and rank_col < len(r) else None
        return (int(m.group()) if m else 10 ** 6, k)

    body = sorted(body, key=lambda r: rank(r, body.index(r)))
    return [r[name_col] for r in body if name_col < len(r)]


@functools.lru_cache(maxsize=1)
def _first_words() -> dict[str, list[tuple[str, ...]]]:
    """Vocabulary phrases indexed by their first token, longest first (the first hit at a position wins)."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for phrase, _ in _index()[2]:
        out.setdefault(phrase[0], []).append(phrase)
    return out


def _prose_mentions(text: str) -> list[str]:
    """Diagnoses named in free prose, in text order: the vocabulary's phrases found in each sentence.

    "This is most consistent with psoriasis; the differential includes eczema and lichen planus." ->
    ["psoriasis", "eczema", "lichen planus"]. A mention right after a negation ("not", "unlikely",
    "rather than", "unlike", "without", "excluded") or followed by "is unlikely / ruled out" is dropped:
    "this is not melanoma" names no candidate. Out-of-vocabulary names are lost here (they would be
    judged `unknown` anyway); the returned strings are the matched vocabulary phrases, which `canonical`
    maps back to their labels.
    """
    first_word = _first_words()
    out = []
    for sentence in re.split(r"[.!?;\n]+", text):
        # the same content tokens canonical() matches on ("porokeratosis of mibelli" -> porokeratosis mibelli)
        toks = [t for t in _expand(_tokens(sentence)) if t not in _STOP]
        i = 0
        while i < len(toks):
            hit = next((p for p in first_word.get(toks[i], ()) if tuple(toks[i:i + len(p)]) == p), None)
            if hit is None:
                i += 1
                continue
            before = " ".join(toks[max(0, i - 4):i])          # "doesn t look like" -> "doesn" is in reach
            after = " ".join(toks[i + len(hit):i + len(hit) + 3])
            negated = re.search(r"\b(?:not|no|never|unlikely|unlike|without|excluded|rather|instead|isn|doesn|"
                                r"aren|wasn|don|against)\b", before) or \
                re.match(r"(?:is |are |seems? |be |was )?(?:unlikely|ruled|excluded|not|improbable)\b", after)
            if not negated:
                out.append(" ".join(hit))
            i += len(hit)
    return out


def _line_items(text: str) -> tuple[list[str], bool]:
    """The line scanner: numbered entries, bullets and header lines, in document order.

    Returns (raw entries, listed) where listed says a numbered or bulleted entry was seen. Context rules,
    with the style each one exists for:
      * a numbered line is an entry; several inline markers split it ("1. a 2. b 3. c");
      * a bullet is an entry unless it is indented deeper than the entry above it, or sits under a
        numbered entry with no header in between (then it explains that entry: "1. X\\n- scaly");
      * a header line ("Most likely diagnosis: X", "Differential: - X") holds entries after its colon,
        split at , ; and/or; a header of another kind ("Findings:", "Recommendation:") starts a section
        whose bullets are findings, dropped when any diagnosis entry exists elsewhere;
      * a bold heading that names a diagnosis ("**Psoriasis:**") is an entry; its bullets explain it.
    Everything else (lead-ins, disclaimers, explanation lines) is ignored here.
    """
    main: list[str] = []            # entries outside "other" sections
    other: list[str] = []           # entries under a findings / recommendation heading
    listed = False
    ctx, ctx_indent, section = None, -1, "dx"
    for raw in text.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip(" \t"))
        line = re.sub(r"^\s*(?:#{1,6}\s+|>\s*)", "", raw)          # markdown heading / quote markers
        dest = main if section == "dx" else other
        lead = _LEAD.match(line)
        if lead and ctx in ("num", "bullet", "item") and indent > ctx_indent:
            continue                                                 # a numbered sub-list under an entry
        if lead:
            # numbered entry; a "1. **Findings:**" style heading inside a list is still an entry (cleaned later)
            parts = _INLINE.split(lead.group(1))
            dest += parts
            listed, ctx, ctx_indent = True, "num", indent
            continue
        bullet = _BULLET.match(line)
        head = re.sub(r"[*_`]", "", bullet.group(2) if bullet else "").partition(":")
        if bullet and head[1] and _is_header(head[0]):
            # "- Most likely:" / "- Others: nevus": a header written as a bullet; what follows is entries
            section, ctx, ctx_indent = "dx", "header", indent
            main += _split_list(head[2]) if head[2].strip() else []
            continue
        if bullet:
            if ctx in ("num", "bullet", "item") and indent > ctx_indent:
                continue                                             # an indented sub-bullet: explanation
            if ctx in ("num", "item"):
                continue                                             # a bullet right under an entry explains it
            dest.append(bullet.group(2))
            listed, ctx, ctx_indent = True, "bullet", indent
            continue
        if ctx in ("num", "bullet", "item") and indent > ctx_indent:
            continue                                                 # an indented continuation line
        plain = re.sub(r"[*_`]", "", line).strip()
        head, colon, tail = plain.partition(":")
        bold_only = bool(re.fullmatch(r"\s*(?:\*\*|__).+?(?:\*\*|__)\s*:?\s*", line))
        if colon and _is_header(head) or not colon and _is_header(plain):
            # "Most likely diagnosis: X." / "Other possibilities: Y, Z" / "Differential: - X" / "Differential"
            section, ctx, ctx_indent = "dx", "header", indent
            tail = tail.strip()
            inner = _LEAD.match(tail) or _BULLET.match(tail)
            if inner:
                main += _INLINE.split(inner.group(inner.lastindex)) if _LEAD.match(tail) else [inner.group(2)]
                listed = True
            elif tail:
                main += _split_list(tail)
            continue
        if (colon and not tail.strip() or bold_only) and len(_words(head)) <= 6:
            # a heading line: a diagnosis ("**Psoriasis:**") or a section of another kind ("Findings:")
            if canonical(head) is not None:
                dest.append(head)
                ctx, ctx_indent = "item", indent
            elif set(_words(head)) & _OTHER_SECTIONS or not _is_header(head):
                section, ctx, ctx_indent = "other", "header", indent
            continue
        if ctx == "header" and section == "dx" and colon and canonical(head) is not None:
            main.append(head)                                         # "Psoriasis: silvery plaques" under a header
            continue
        if section == "other" and colon and set(_words(head)) & _OTHER_SECTIONS:
            continue
        if _is_header(head) and colon:
            continue
    return (main if any(_clean_item(m) and not _is_header(_clean_item(m)) for m in main) else main + other), listed


def _parse_ranked_core(text) -> tuple[list[str], bool]:
    """The parser proper (may raise on inputs nobody foresaw; `parse_ranked_list_ex` guards it).

    Order of attempts, the first that yields entries wins: a list given as a Python list; JSON; a
    markdown table; the line scanner (numbered entries, bullets, header lines); short phrases separated
    by newlines / commas / semicolons; vocabulary mentions in prose.
    """
    if text is None:
        return [], False
    if isinstance(text, (list, tuple)):                      # already a list (e.g. a JSONL prediction)
        items = _dedupe(_clean_item(str(x)) for x in text)
        return items, bool(items)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = _THINK.sub(" ", str(text))
    m = _ANSWER.search(text)
    if m:
        text = m.group(1)
    text = re.sub(r"```[a-zA-Z]*", "\n", text)                # code fences: keep what is inside
    # "Final answer:" after free reasoning: only what follows the last such marker is the answer
    finals = list(re.finditer(r"^\W*final\s+(?:answer|diagnosis|differential|diagnoses)\W*:", text, re.I | re.M))
    if finals:
        text = text[finals[-1].start():]
    js = _from_json(text)
    if js is not None:
        # a JSON string may itself hold a list ({"answer": "1. psoriasis 2. eczema"}, ["psoriasis, eczema"])
        flat = []
        for e in js:
            if "\n" in e or len(_INLINE.findall(e)) >= 2:
                flat += _line_items(e)[0]
            elif canonical(e) is None and re.search(r"[,;]", e):
                flat += _split_list(e)
            else:
                flat.append(e)
        items = _dedupe(_clean_item(x) for x in flat)
        # JSON is the answer when it names a diagnosis or is most of the text; a stray '["high", "low"]'
        # after a numbered list ("Confidence: [...]") is not
        if items and (any(canonical(x) for x in items) or 2 * _json_span(text) >= len(text.strip())):
            return items, True
    lines = text.splitlines()
    table = _from_table(lines)
    if table:
        items = _dedupe(_clean_item(x) for x in table)
        if items:
            return items, True
    raw, listed = _line_items(text)
    items = _dedupe(_clean_item(x) for x in raw)
    if items:
        return items, listed
    # fallback, in document order: a short phrase (<= 8 words, between newlines / commas / semicolons /
    # or / vs) is an entry as written ("tinea corporis" stays, to be judged unknown at its rank), unless it
    # names nothing and reads like a disclaimer ("I am not a doctor"); a longer run is prose, which gives
    # its vocabulary mentions ("... most consistent with psoriasis ..." -> psoriasis).
    # A short phrase that is not one name but mentions some ("the differential includes eczema and lichen
    # planus") gives its mentions too.
    found: list[str] = []
    for part in re.split(r"[\n;,]|\s(?:or|vs\.?|versus)\s", text):
        n = len(part.split())
        if not n:
            continue
        mentions = [] if _is_name(_clean_item(part)) else _prose_mentions(part)
        if n > 8 or mentions:
            found += mentions
        elif _is_name(_clean_item(part)) or not _DISCLAIMER.search(part):
            found.append(part)
    return _dedupe(_clean_item(p) for p in found), False


def parse_ranked_list_ex(text) -> tuple[list[str], bool]:
    """Parse a ranked differential: (entries most likely first, <= 6, lower case; format_ok).

    format_ok is True when the text used a list: numbered or bulleted entries (the requested format,
    possibly truncated), a markdown table or JSON; False for an empty result, a header with a comma list,
    a bare comma/line list or prose. Never raises. The styles read are listed at the top of section 1.
    Examples:
      "Most likely:\\n1. **Psoriasis** (70%)\\n2) Eczema - itchy\\n3. psoriasis" -> (["psoriasis", "eczema"], True)
      "Most likely diagnosis: Psoriasis.\\nOther possibilities: eczema, tinea." -> (["psoriasis", "eczema", "tinea"], False)
    """
    try:
        return _parse_ranked_core(text)
    except Exception:  # noqa: BLE001 - the contract is "never raise"; the core is property-tested to not raise
        return [], False


def parse_ranked_list(text) -> list[str]:
    """The entries of `parse_ranked_list_ex` (see there)."""
    return parse_ranked_list_ex(text)[0]


def format_ranked_list(items) -> str:
    """Write entries in the canonical Stage II format ("1. a\\n2. b"); data.format_differential is the
    training-side twin. The tests use it to check that parsing is idempotent:
    parse(format(parse(x))) == parse(x), i.e. our own output format is a fixed point of the parser."""
    return "\n".join(f"{i}. {x}" for i, x in enumerate(list(items)[:MAX_ITEMS], 1))


# Stage I (the paper's "explicit medical captioning") asks for 8 fields; rl.py's caption reward compares
# them one by one with the truth, so the parser's job is to find each field however it was written.
# Caption field names a model may use instead of the schema's; the schema (CAPTION_FIELDS) is data.py's.
# American spelling ("color") and clinical synonyms ("morphology" for lesion type, "margin" for border)
# are the common drifts of a model pretrained on US medical text.
FIELD_ALIASES = {
    "color": "colour", "colours": "colour", "colors": "colour", "site": "location", "body site": "location",
    "anatomic site": "location", "anatomical site": "location", "lesion": "lesion type", "lesion types": "lesion type",
    "morphology": "lesion type", "primary morphology": "lesion type", "borders": "border", "margin": "border",
    "margins": "border", "texture": "surface", "surface features": "surface", "arrangement": "distribution",
    "shapes": "shape", "sizes": "size", "type of lesion": "lesion type", "lesion morphology": "lesion type",
    "body location": "location", "body part": "location", "surface texture": "surface", "boundary": "border",
    "pattern": "distribution", "dimensions": "size", "diameter": "size",
}


def _caption_lines(text: str) -> str:
    """Rewrite the layouts a chat model uses for fields into "name: value" lines the marker regex reads.

    Three layouts, each with its example:
      * a markdown table row "| Colour | red, pink |"      -> "Colour: red, pink" (header and |---| rows drop out);
      * a heading that is only a field name ("## Colour", "**Shape**") -> "Colour:", so the value on the
        next line is read as that field's value;
      * a dash separator "Colour - red" / "Colour \u2013 red"  -> "Colour: red".
    Other lines are kept as they are. Field names are matched case-free, with markdown stripped.
    """
    names = set(CAPTION_FIELDS) | set(FIELD_ALIASES)

    def field(name: str) -> str | None:
        n = " ".join(re.sub(r"[*_#`\"']", " ", name).lower().replace("-", " ").replace("_", " ").split())
        return n if n in names else None

    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.strip().startswith("|") else []
        if len(cells) >= 2 and field(cells[0]):
            out.append(f"{cells[0]}: {', '.join(c for c in cells[1:] if c)}")
            continue
        bare = re.sub(r"[\s*_`:]+$", "", re.sub(r"^[\s*_#`>-]+", "", line))   # "## **Colour:**" -> "Colour"
        if field(bare):
            out.append(bare + ":")                                   # a heading: the value follows on the next line
            continue
        m = re.match(r"^\s*(?:[-*\u2022]\s+)?([\w *_#-]+?)\s+[-\u2013\u2014]\s+(.*)$", line)
        if m and field(m.group(1)):
            out.append(f"{m.group(1)}: {m.group(2)}")
            continue
        out.append(line)
    return "\n".join(out)


@functools.lru_cache(maxsize=1)
def _field_regex():
    """One regex that finds every field marker: a field name (or alias) then ":" or "=".

    Names match longest first ("lesion type" before "lesion"), with any of space / "_" / "-" between
    words ("lesion_type:", "Lesion-Type ="), and optional quotes or markdown bold around the name.
    """
    names = sorted(set(CAPTION_FIELDS) | set(FIELD_ALIASES), key=len, reverse=True)   # longest first
    alt = "|".join(r"\s*[\s_-]\s*".join(map(re.escape, n.split())) for n in names)
    # a field marker starts a line or follows a separator; "skin type: IV" does not match "type"
    return re.compile(r"(?:^|(?<=[\s;,|*\u2022\-{\"']))[\"']?(" + alt + r")[\"']?\s*\**\s*[:=]\s*", re.I | re.M)


def _clean_value(v: str) -> str:
    """"Erythematous ,  Salmon." -> "erythematous, salmon"; empty -> "none" (the schema's empty value).

    Cleaned to a fixed point, and cut before any field marker that cleaning exposed ("[colour: a" ->
    "colour: a" would read as a new field), so that parse(format(parse(x))) == parse(x).
    """
    for _ in range(10):
        parts = [" ".join(p.lower().split()).strip(" .:;!?\"'*`{}[]") for p in re.split(r"[,;]", v)]
        out = ", ".join(p for p in parts if p)
        m = _field_regex().search(out)
        if m:
            out = out[:m.start()]
        if out == v:
            break
        v = out
    return out or "none"


def _parse_caption_core(text) -> tuple[dict[str, str], bool]:
    """The caption parser proper: a JSON object if the text holds one, else field markers in the text."""
    if text is None:
        return {}, False
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = _THINK.sub(" ", str(text))
    fields: dict[str, str] = {}
    blob = re.search(r"\{.*\}", text, re.S)
    if blob:                                                   # a JSON caption {"colour": [...], ...}
        try:
            obj = json.loads(blob.group(0))
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            for name, val in obj.items():
                f = " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())
                f = FIELD_ALIASES.get(f, f)
                if f in CAPTION_FIELDS and f not in fields:
                    if isinstance(val, dict):
                        val = list(val.values())
                    val = ", ".join(map(str, val)) if isinstance(val, (list, tuple)) else str(val)
                    fields[f] = _clean_value(val.replace("\n", " "))
            if fields:
                return fields, len(fields) == len(CAPTION_FIELDS)
    # line or inline format: a value runs from its field marker to the next marker or the end of the line
    text = _caption_lines(text)
    marks = list(_field_regex().finditer(text))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        value = text[m.end():end].split("\n")[0]
        f = " ".join(re.split(r"[\s_-]+", m.group(1).lower()))
        f = FIELD_ALIASES.get(f, f)
        if f not in fields:                                     # first occurrence wins
            fields[f] = _clean_value(value)
    return fields, len(fields) == len(CAPTION_FIELDS)


def parse_caption_ex(text) -> tuple[dict[str, str], bool]:
    """Parse a Stage I caption into {field: value} for the fields found; ok = all 8 CAPTION_FIELDS present.

    Accepts "field: value" lines (the canonical format), inline "colour: red; shape: round", markdown
    ("**Colour**: red"), field-name variants ("color", "site", "morphology") and a JSON object. Values are
    lower-cased, items joined by ", ", an empty value becomes "none". Missing fields are absent from the
    dict (so a reward can tell "missing" from "none"). Never raises.
    """
    try:
        return _parse_caption_core(text)
    except Exception:  # noqa: BLE001
        return {}, False


def parse_caption(text) -> dict[str, str]:
    """The fields of `parse_caption_ex` (see there)."""
    return parse_caption_ex(text)[0]


def format_caption_fields(fields: dict) -> str:
    """Canonical "field: value" lines in CAPTION_FIELDS order (data.format_caption is the training-side twin)."""
    return "\n".join(f"{f}: {fields[f]}" for f in CAPTION_FIELDS if f in fields)


# ===================================================================================================
# 2. Vocabulary: normalisation, aliases, abbreviations
# ===================================================================================================
# Why a hand-written vocabulary and not an embedding model or an LLM? A judge that changes when a model
# server is upgraded cannot be rerun next year; a table under version control can, and every decision it
# makes can be read and argued with (see the tests for one hand-checked example per rule). The price is
# coverage: a diagnosis outside the 114 Fitzpatrick17k labels ("tinea corporis") is `unknown`, even when
# a dermatologist would call it a reasonable differential. The optional LLM judge (section 8) is the
# escape hatch for that.
#
# Every label and every alias goes through the same `_tokens` normalisation, so the rules only need to be
# consistent, not linguistically perfect: "Darier's disease", "dariers disease" and "DARIER DISEASE"
# all become the tokens ["darier", "disease"]. A normalisation step that mangles a word ("aerosol" ->
# "erosol") is harmless as long as it mangles the label and the prediction the same way.

# Lesion names are noun phrases, so a tiny stop list is enough. Hedge words ("probable melanoma") are
# dropped too: the differential's rank already carries the uncertainty.
_STOP = frozenset("a an the of and or with in on to for likely probable probably possible possibly suspected "
                  "suspicious suspect consider considering query rule out r/o dx diagnosis differential "
                  "type form variant".split())
# A negated entry ("not melanoma") must not be read as a melanoma answer: it maps to None (unknown).
_NEGATIONS = frozenset("not no without excluded unlikely non".split())

# Abbreviations expanded token by token *before* matching, so "nodular BCC" reads as "nodular basal cell
# carcinoma". Only abbreviations that are unambiguous in a dermatology differential are listed here;
# riskier ones ("ga") exist only as whole-entry aliases below, and some are left out on purpose: "EM" is
# erythema multiforme to one clinician and erythema migrans (Lyme disease) to another, two labels with
# different treatments (supportive care vs antibiotics), so "EM" stays `unknown` rather than a guess.
ABBREVIATIONS = {
    "bcc": "basal cell carcinoma", "scc": "squamous cell carcinoma", "cscc": "squamous cell carcinoma",
    "sk": "seborrheic keratosis", "ak": "actinic keratosis", "mf": "mycosis fungoides",
    "ks": "kaposi sarcoma", "ssm": "superficial spreading melanoma", "lmm": "lentigo maligna melanoma",
    "ctcl": "cutaneous t cell lymphoma", "sjs": "stevens johnson syndrome", "dsap": "disseminated superficial "
    "actinic porokeratosis", "lch": "langerhans cell histiocytosis", "jxg": "juvenile xanthogranuloma",
    "prp": "pityriasis rubra pilaris", "cmn": "congenital melanocytic nevus", "nf1": "neurofibromatosis",
}

# Synonyms and display variants for all 114 Fitzpatrick17k labels (keys = data.TAXONOMY keys, spelled as
# in the CSV, typos included). Sources: standard dermatology synonyms, the DermaAmin atlas categories that
# were folded into each label (e.g. keratoacanthoma and Bowen's disease under squamous cell carcinoma,
# pyoderma gangrenosum and Sweet syndrome under neutrophilic dermatoses), and common abbreviations.
# A name that is a *kind of* a label with no finer label of its own ("nodular melanoma") is an alias of
# that label; kinds that ARE labels ("lentigo maligna") live in SUBTYPES instead.
# Two folds deserve a note because they decide verdicts on common answers:
#   * "nevus" / "mole" -> nevocytic nevus, the dataset's generic melanocytic-nevus label. So the classic
#     dangerous answer to a melanoma image, "benign mole", is recognised and judged safety_critical
#     instead of slipping through as `unknown`.
#   * "keratoacanthoma" and "Bowen's disease" -> squamous cell carcinoma, because the atlas put those
#     images under that label and because both are managed as (low-grade / in-situ) SCC. A reader who
#     disagrees can move them; the alias-consistency test will say whether the table still holds.
ALIASES: dict[str, tuple[str, ...]] = {
    # -- genodermatoses --
    "acrodermatitis enteropathica": ("zinc deficiency dermatitis", "zinc deficiency"),
    "dariers disease": ("darier disease", "darier's disease", "keratosis follicularis", "darier white disease"),
    "ehlers danlos syndrome": ("ehlers-danlos", "eds", "cutis hyperelastica"),
    "epidermolysis bullosa": ("eb", "epidermolysis bullosa simplex", "dystrophic epidermolysis bullosa",
                              "junctional epidermolysis bullosa"),
    "hailey hailey disease": ("hailey-hailey", "familial benign pemphigus", "benign familial pemphigus",
                              "familial benign chronic pemphigus"),
    "ichthyosis vulgaris": ("ichthyosis", "fish scale disease"),
    "incontinentia pigmenti": ("bloch sulzberger syndrome",),
    "neurofibromatosis": ("von recklinghausen disease", "neurofibromatosis type 1", "neurofibroma",
                          "plexiform neurofibroma"),
    "tuberous sclerosis": ("tuberous sclerosis complex", "tsc", "adenoma sebaceum", "facial angiofibroma",
                           "angiofibroma", "shagreen patch"),
    "xeroderma pigmentosum": ("xp",),
    # -- inflammatory (the Fitzpatrick17k 'inflammatory' group also holds keloid, xanthomas, striae ...) --
    "acanthosis nigricans": ("acanthosis nigrican",),
    "acne": ("acne simplex",),
    "acne vulgaris": ("comedonal acne", "cystic acne", "nodulocystic acne", "inflammatory acne",
                      "acne conglobata", "papulopustular acne", "common acne"),
    "acquired autoimmune bullous diseaseherpes gestationis": (
        "acquired autoimmune bullous disease", "autoimmune bullous disease", "herpes gestationis",
        "pemphigoid gestationis", "bullous pemphigoid", "pemphigoid", "pemphigus vulgaris", "pemphigus",
        "pemphigus foliaceus", "dermatitis herpetiformis", "linear iga disease", "linear iga bullous dermatosis",
        "epidermolysis bullosa acquisita", "immunobullous disease"),
    "allergic contact dermatitis": ("contact dermatitis", "acd", "contact eczema", "allergic contact eczema",
                                    "poison ivy dermatitis", "rhus dermatitis"),
    "aplasia cutis": ("aplasia cutis congenita",),
    "behcets disease": ("behcet disease", "behcet syndrome", "behcet's syndrome"),
    "calcinosis cutis": ("cutaneous calcinosis", "calcinosis"),
    "cheilitis": ("angular cheilitis", "actinic cheilitis", "cheilitis granulomatosa", "perleche"),
    "dermatomyositis": ("juvenile dermatomyositis", "heliotrope rash", "gottron papules"),
    "drug eruption": ("drug rash", "drug reaction", "morbilliform drug eruption", "exanthematous drug eruption",
                      "adverse drug reaction", "drug induced rash", "dress", "dress syndrome"),
    "drug induced pigmentary changes": ("drug induced hyperpigmentation", "drug induced pigmentation",
                                        "minocycline pigmentation", "minocycline induced hyperpigmentation"),
    "dyshidrotic eczema": ("dyshidrosis", "pompholyx", "dyshidrotic dermatitis", "vesicular hand eczema"),
    "eczema": ("atopic dermatitis", "atopic eczema", "dermatitis", "nummular eczema", "nummular dermatitis",
               "discoid eczema", "eczematous dermatitis", "hand eczema"),
    "erythema annulare centrifigum": ("erythema annulare centrifugum", "eac"),
    "erythema elevatum diutinum": ("eed",),
    "erythema multiforme": ("erythema multiforme minor", "erythema multiforme major", "target lesions"),
    "erythema nodosum": ("nodular erythema",),
    "factitial dermatitis": ("dermatitis artefacta", "factitious dermatitis", "dermatitis factitia"),
    "fixed eruptions": ("fixed drug eruption", "fde", "fixed drug reaction"),
    "folliculitis": ("bacterial folliculitis", "pseudofolliculitis barbae", "hot tub folliculitis",
                     "pityrosporum folliculitis"),
    "granuloma annulare": ("ga",),
    "hidradenitis": ("hidradenitis suppurativa", "hs", "acne inversa"),
    "juvenile xanthogranuloma": ("xanthogranuloma",),
    "keloid": ("keloid scar",),
    "keratosis pilaris": ("kp",),
    "langerhans cell histiocytosis": ("histiocytosis x",),
    "lichen amyloidosis": ("cutaneous amyloidosis", "lichen amyloidosus", "macular amyloidosis",
                           "primary cutaneous amyloidosis", "amyloidosis cutis"),
    "lichen planus": ("lp", "oral lichen planus", "hypertrophic lichen planus", "lichen planus pigmentosus"),
    "lichen simplex": ("lichen simplex chronicus", "lsc"),
    "livedo reticularis": ("livedo", "livedo racemosa"),
    "lupus erythematosus": ("lupus", "sle", "systemic lupus erythematosus", "discoid lupus",
                            "discoid lupus erythematosus", "dle", "cutaneous lupus",
                            "cutaneous lupus erythematosus", "malar rash"),
    "lupus subacute": ("subacute cutaneous lupus erythematosus", "subacute lupus", "scle",
                       "subacute cutaneous lupus", "subacute lupus erythematosus"),
    "lyme disease": ("lyme", "erythema migrans", "erythema chronicum migrans", "lyme borreliosis",
                     "borreliosis"),
    "mucinosis": ("follicular mucinosis", "alopecia mucinosa", "cutaneous mucinosis"),
    "myiasis": ("cutaneous myiasis", "furuncular myiasis", "botfly infestation"),
    "necrobiosis lipoidica": ("necrobiosis lipoidica diabeticorum", "nld"),
    "nematode infection": ("cutaneous larva migrans", "larva migrans", "creeping eruption", "hookworm infection",
                           "helminth infection", "strongyloidiasis", "onchocerciasis"),
    "neurodermatitis": ("circumscribed neurodermatitis",),
    "neurotic excoriations": ("psychogenic excoriation", "skin picking", "excoriation disorder",
                              "dermatillomania"),
    "neutrophilic dermatoses": ("neutrophilic dermatosis", "pyoderma gangrenosum", "sweet syndrome",
                                "sweet's syndrome", "acute febrile neutrophilic dermatosis"),
    "papilomatosis confluentes and reticulate": (
        "confluent and reticulated papillomatosis", "confluent reticulated papillomatosis", "crp",
        "papillomatosis confluens et reticularis", "gougerot carteaud syndrome",
        "papillomatosis confluentes and reticulate"),
    "paronychia": ("acute paronychia", "chronic paronychia"),
    "pediculosis lids": ("pediculosis", "pediculosis palpebrarum", "phthiriasis palpebrarum", "lice",
                         "louse infestation", "pediculosis capitis", "head lice"),
    "perioral dermatitis": ("periorificial dermatitis",),
    "photodermatoses": ("photodermatosis", "polymorphic light eruption", "polymorphous light eruption", "pmle",
                        "phytophotodermatitis", "photosensitivity", "photosensitive dermatitis",
                        "solar urticaria", "actinic prurigo", "photoallergic dermatitis", "phototoxic reaction"),
    "pityriasis lichenoides chronica": ("plc", "pityriasis lichenoides",
                                        "pityriasis lichenoides et varioliformis acuta", "pleva"),
    "pityriasis rosea": ("pityriasis rosea gibert",),
    "pityriasis rubra pilaris": ("devergie disease",),
    "porphyria": ("porphyria cutanea tarda", "pct", "erythropoietic protoporphyria", "cutaneous porphyria"),
    "psoriasis": ("plaque psoriasis", "psoriasis vulgaris", "chronic plaque psoriasis", "guttate psoriasis",
                  "inverse psoriasis", "scalp psoriasis", "nail psoriasis", "erythrodermic psoriasis"),
    "pustular psoriasis": ("generalized pustular psoriasis", "palmoplantar pustulosis", "von zumbusch psoriasis",
                           "palmoplantar pustular psoriasis", "gpp"),
    "rhinophyma": ("phymatous rosacea",),
    "rosacea": ("acne rosacea", "papulopustular rosacea", "erythematotelangiectatic rosacea", "ocular rosacea"),
    "sarcoidosis": ("sarcoid", "cutaneous sarcoidosis", "lupus pernio"),
    "scabies": ("sarcoptes scabiei", "crusted scabies", "norwegian scabies", "scabies infestation"),
    "scleroderma": ("morphea", "morphoea", "systemic sclerosis", "localized scleroderma", "scleredema", "ssc",
                    "en coup de sabre", "crest syndrome"),
    "scleromyxedema": ("lichen myxedematosus", "papular mucinosis"),
    "seborrheic dermatitis": ("seb derm", "seborrheic eczema", "dandruff", "cradle cap"),
    "stasis edema": ("stasis dermatitis", "venous stasis dermatitis", "venous eczema", "gravitational eczema",
                     "stasis eczema", "venous insufficiency", "chronic venous insufficiency", "venous stasis"),
    "stevens johnson syndrome": ("toxic epidermal necrolysis", "ten", "sjs ten",
                                 "stevens johnson syndrome toxic epidermal necrolysis"),
    "striae": ("striae distensae", "stretch marks", "striae gravidarum", "striae rubra", "striae alba"),
    "sun damaged skin": ("photoaging", "photodamage", "solar elastosis", "actinic damage", "sunburn", "sun burn",
                         "dermatoheliosis", "photoaged skin", "actinic elastosis", "poikiloderma of civatte"),
    "tick bite": ("insect bite", "arthropod bite", "bug bite", "flea bite", "insect bite reaction"),
    "tungiasis": ("tunga penetrans", "jigger flea", "sand flea infestation", "chigoe"),
    "urticaria": ("hives", "chronic urticaria", "acute urticaria", "urticarial rash", "wheals"),
    "urticaria pigmentosa": ("cutaneous mastocytosis", "mastocytosis", "maculopapular cutaneous mastocytosis",
                             "mastocytoma"),
    "vitiligo": ("vitiligo vulgaris", "segmental vitiligo", "acrofacial vitiligo"),
    "xanthomas": ("xanthelasma", "xanthelasma palpebrarum", "eruptive xanthoma", "tuberous xanthoma",
                  "tendinous xanthoma"),
    # -- benign dermal --
    "becker nevus": ("becker's nevus", "becker melanosis", "beckers nevus"),
    "dermatofibroma": ("df", "benign fibrous histiocytoma", "fibrous histiocytoma", "histiocytoma"),
    "fordyce spots": ("fordyce granules", "ectopic sebaceous glands"),
    "granuloma pyogenic": ("granuloma telangiectaticum",),
    "lymphangioma": ("lymphangioma circumscriptum", "lymphatic malformation", "cystic hygroma"),
    "mucous cyst": ("mucocele", "digital mucous cyst", "myxoid cyst", "digital myxoid cyst", "mucoid cyst",
                    "oral mucocele"),
    "pilar cyst": ("trichilemmal cyst", "sebaceous cyst"),
    "pilomatricoma": ("pilomatrixoma", "calcifying epithelioma of malherbe", "calcifying epithelioma"),
    "port wine stain": ("nevus flammeus", "capillary malformation", "port wine birthmark"),
    "pyogenic granuloma": ("lobular capillary hemangioma",),
    "syringoma": ("eruptive syringoma",),
    "telangiectases": ("telangiectasia", "spider veins", "spider angioma", "spider nevus",
                       "hereditary hemorrhagic telangiectasia", "hht", "broken capillaries"),
    # -- benign epidermal --
    "disseminated actinic porokeratosis": ("disseminated superficial actinic porokeratosis",),
    "epidermal nevus": ("verrucous epidermal nevus", "linear epidermal nevus",
                        "inflammatory linear verrucous epidermal nevus", "ilven"),
    "milia": ("milium", "milia en plaque"),
    "naevus comedonicus": ("comedo nevus",),
    "nevus sebaceous of jadassohn": ("nevus sebaceous", "sebaceous nevus", "organoid nevus", "naevus sebaceus"),
    # generic "porokeratosis" -> the largest porokeratosis label; Mibelli then scores near_miss (same group)
    "porokeratosis actinic": ("porokeratosis", "actinic porokeratosis"),
    "porokeratosis of mibelli": ("mibelli porokeratosis", "plaque porokeratosis", "classic porokeratosis"),
    "prurigo nodularis": ("nodular prurigo", "picker nodules"),
    "seborrheic keratosis": ("seborrheic wart", "basal cell papilloma", "senile wart", "dermatosis papulosa nigra",
                             "stucco keratosis", "seb k"),
    # -- benign melanocyte --
    "congenital nevus": ("congenital melanocytic nevus", "giant congenital nevus", "congenital nevomelanocytic "
                         "nevus", "giant hairy nevus"),
    "halo nevus": ("sutton nevus", "leukoderma acquisitum centrifugum"),
    "nevocytic nevus": ("nevus", "mole", "melanocytic nevus", "benign nevus", "compound nevus", "junctional nevus",
                        "intradermal nevus", "dermal nevus", "nevomelanocytic nevus", "common nevus",
                        "acquired melanocytic nevus", "dysplastic nevus", "atypical nevus", "blue nevus",
                        "spitz nevus", "benign melanocytic nevus", "pigmented nevus", "nevus cell nevus",
                        "beauty mark"),
    # -- malignant --
    "mycosis fungoides": ("cutaneous t cell lymphoma", "sezary syndrome", "cutaneous lymphoma", "t cell lymphoma"),
    "kaposi sarcoma": ("kaposi's sarcoma", "kaposis sarcoma"),
    "actinic keratosis": ("solar keratosis", "senile keratosis"),
    "basal cell carcinoma": ("basal cell epithelioma", "rodent ulcer", "superficial basal cell carcinoma",
                             "pigmented basal cell carcinoma", "basalioma", "basal cell cancer"),
    "basal cell carcinoma morpheiform": ("morpheaform basal cell carcinoma", "morphoeic basal cell carcinoma",
                                         "morpheic basal cell carcinoma", "sclerosing basal cell carcinoma",
                                         "infiltrative basal cell carcinoma"),
    "solid cystic basal cell carcinoma": ("cystic basal cell carcinoma", "solid basal cell carcinoma",
                                          "nodular basal cell carcinoma", "nodulocystic basal cell carcinoma"),
    "squamous cell carcinoma": ("cutaneous squamous cell carcinoma", "keratoacanthoma", "ka", "bowen disease",
                                "bowen's disease", "squamous cell carcinoma in situ", "epidermoid carcinoma",
                                "squamous cell cancer", "invasive squamous cell carcinoma"),
    "lentigo maligna": ("lentigo maligna melanoma", "hutchinson melanotic freckle", "hutchinson freckle"),
    "malignant melanoma": ("malignant melanoma of skin",),
    "melanoma": ("cutaneous melanoma", "invasive melanoma", "melanoma in situ", "nodular melanoma",
                 "amelanotic melanoma", "acral lentiginous melanoma"),
    "superficial spreading melanoma ssm": ("superficial spreading melanoma",),
}

# Near-duplicate labels of the CSV: different strings for the same disease, collected from two atlases
# that named things differently. A prediction of any member is `correct` for a truth that is any other
# member. Example: truth "granuloma pyogenic", prediction "pyogenic granuloma" -> correct. Without this
# table a model would be marked wrong on 75 + 113 pyogenic-granuloma images for choosing a word order.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("melanoma", "malignant melanoma"),
    ("pyogenic granuloma", "granuloma pyogenic"),
    ("acne vulgaris", "acne"),                      # 'acne' in the atlases means acne vulgaris
    ("lichen simplex", "neurodermatitis"),          # lichen simplex chronicus = circumscribed neurodermatitis
    ("porokeratosis actinic", "disseminated actinic porokeratosis"),  # DSAP is *the* actinic porokeratosis
)

# Parent -> subtypes, among labels that both exist in Fitzpatrick17k: the paper's "valid subclass". The
# relation is used in both directions (see `judge`). Clinically: answering "melanoma" for a lentigo
# maligna image is the right diagnosis at a coarser grain (same urgent excision), and answering "lentigo
# maligna" for an image labelled only "melanoma" is a finer guess on the same branch, which the label
# cannot refute. Kept deliberately short and textbook-level; every other same-family pair is a near miss,
# so a generous reading of this table would inflate clinical Top-k (check the strict columns).
# Children must share the parent's nine-partition group and near-miss family (a test checks this).
SUBTYPES: dict[str, tuple[str, ...]] = {
    "melanoma": ("superficial spreading melanoma ssm", "lentigo maligna"),   # also reached via "malignant melanoma"
    "basal cell carcinoma": ("basal cell carcinoma morpheiform", "solid cystic basal cell carcinoma"),
    "psoriasis": ("pustular psoriasis",),
    "eczema": ("dyshidrotic eczema",),
    "lupus erythematosus": ("lupus subacute",),
    "nevocytic nevus": ("congenital nevus", "halo nevus"),                   # melanocytic nevus subtypes
    "rosacea": ("rhinophyma",),                                              # phymatous rosacea
    "drug eruption": ("fixed eruptions",),                                   # fixed drug eruption
    "epidermal nevus": ("naevus comedonicus", "nevus sebaceous of jadassohn"),  # Happle's epidermal nevi
}


def _tokens(text: str) -> list[str]:
    """Normalise free text into a token list: the one rule applied to labels, aliases and predictions.

    Steps, each with an example: unicode folding ("Behçet" -> "behcet"); lower case; possessive
    ("kaposi's" -> "kaposi"); punctuation -> space ("ehlers-danlos" -> "ehlers danlos"); British spelling
    ("naevus" -> "nevus", "seborrhoeic" -> "seborrheic", "tumour" -> "tumor"); plural -> singular
    ("nevi" -> "nevus", "keratoses" -> "keratosis", "xanthomas" -> "xanthoma", "spots" -> "spot").

    The plural rule is deliberately crude (strip one "s") and guarded against the Latin/Greek endings that
    dermatology is full of: "psoriasis", "pemphigus", "erythematosus" and "mucinosis" must survive
    untouched, which is why words ending in -ss, -us, -is, -ous keep their "s". Where it still misfires
    ("scabies" -> "scabie", "herpes" -> "herpe") it does so on both sides of every comparison.
    """
    text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"(\w)'s\b", r"\1", text)                  # possessive: darier's -> darier
    text = re.sub(r"[^a-z0-9]+", " ", text)
    out = []
    for t in text.split():
        t = t.replace("ae", "e").replace("oe", "e")          # naevus, haem-, oedema, seborrhoeic, morphoea
        if t.endswith("our") and len(t) > 4:
            t = t[:-3] + "or"                                 # tumour, colour
        if t in ("nevi", "naevi"):
            t = "nevus"
        elif t.endswith("oses") and len(t) > 5:
            t = t[:-2] + "is"                                 # keratoses -> keratosis, dermatoses
        elif t.endswith("omata"):
            t = t[:-2]                                        # xanthomata -> xanthoma
        elif len(t) > 3 and t.endswith("s") and not t.endswith(("ss", "us", "is", "ous")):
            t = t[:-1]                                        # xanthomas, spots, eruptions, bites, dariers
        out.append(t)
    return out


def _key(tokens: list[str]) -> str:
    """Order-free key: the sorted set of content tokens ("granuloma pyogenic" == "pyogenic granuloma").

    Clinicians invert names freely ("carcinoma, basal cell" in an index, "basal cell carcinoma" in a
    note), so word order must not decide a verdict; `_index` keeps an ordered table next to this one
    only to tell the CSV's own near-duplicate labels apart.
    """
    return " ".join(sorted({t for t in tokens if t not in _STOP}))


def _expand(tokens: list[str]) -> list[str]:
    """Expand ABBREVIATIONS token by token: ["nodular", "bcc"] -> ["nodular", "basal", "cell", "carcinoma"]."""
    out: list[str] = []
    for t in tokens:
        out.extend(ABBREVIATIONS[t].split() if t in ABBREVIATIONS else [t])
    return out


@functools.lru_cache(maxsize=1)
def _index():
    """Build the lookup tables once.

    Returns (ordered token tuple -> label, order-free key -> label, [(token phrase, label)] longest first,
    sorted keys for fuzzy matching). The ordered table decides between near-duplicate labels that share
    an order-free key ("pyogenic granuloma" vs "granuloma pyogenic"). Two names may share a key only when
    their labels are synonyms (same SYNONYMS group); anything else is a bug in the table and raises.
    """
    # Example entries after the loop:
    #   by_seq[("pyogenic", "granuloma")] = "pyogenic granuloma"   by_key["granuloma pyogenic"] = (either)
    #   phrases: (("basal", "cell", "carcinoma", "morpheiform"), ...) before (("basal", "cell", "carcinoma"), ...)
    by_seq: dict[tuple[str, ...], str] = {}
    by_key: dict[str, str] = {}
    phrases: list[tuple[tuple[str, ...], str]] = []
    names = [(label, label) for label in TAXONOMY]                      # labels first: they win ties
    names += [(alias, label) for label, aliases in ALIASES.items() for alias in aliases]
    for name, label in names:
        seq = tuple(t for t in _expand(_tokens(name)) if t not in _STOP)
        k = _key(list(seq))
        if not k:
            continue
        if _CONCEPT[by_key.get(k, label)] != _CONCEPT[label]:
            raise ValueError(f"eval vocabulary: {name!r} ({label}) collides with {by_key[k]!r}")
        by_seq.setdefault(seq, label)
        by_key.setdefault(k, label)
        phrases.append((seq, label))
    phrases.sort(key=lambda p: -len(p[0]))  # longest phrase first (stable: labels before aliases)
    return by_seq, by_key, phrases, sorted(by_key)


@functools.lru_cache(maxsize=65536)
def canonical(text) -> str | None:
    """Map free text to a Fitzpatrick17k label (a data.TAXONOMY key), or None when it names none of them.

    Lookup order, first hit wins:
      1. exact order-free key of the whole entry after normalisation, abbreviation expansion and dropping
         hedge/stop words: "Seborrhoeic keratoses" -> "seborrheic keratosis"; "Probable BCC" ->
         "basal cell carcinoma"; "granuloma pyogenic" and "Pyogenic granuloma" -> their own labels;
      2. negation guard: "not melanoma" -> None;
      3. known phrases contained in the entry, after dropping those nested in a longer match; they must
         all name one concept: "chronic plaque-type psoriasis of the elbows" -> "psoriasis";
         "psoriasis vs eczema" -> None; "seborrheic keratosis or melanoma" -> None;
      4. fuzzy match (difflib ratio >= 0.88 on the key, entries of >= 5 letters, unambiguous):
         "psoraisis" -> "psoriasis".
    Anything else (empty text, "tinea corporis", prose) -> None, which the judge calls `unknown`.
    """
    if not isinstance(text, str):
        return None  # lists, numbers, None: not a diagnosis string
    # normalise once; `content` drops hedge/stop words so "probable BCC" and "BCC" look the same
    toks = _expand(_tokens(text))
    if not toks:
        return None
    by_seq, by_key, phrases, keys = _index()
    content = [t for t in toks if t not in _STOP]
    # 1a. ordered match first: it tells the near-duplicate labels apart (granuloma pyogenic / pyogenic granuloma)
    if tuple(content) in by_seq:
        return by_seq[tuple(content)]
    # 1b. order-free match: "carcinoma, basal cell" style inversions
    k = _key(toks)
    if k in by_key:
        return by_key[k]
    if any(t in _NEGATIONS for t in toks):
        return None
    # 3. phrase containment: every known phrase found in the entry, minus those that sit inside a longer
    #    match ("psoriasis" inside "pustular psoriasis"); exactly one concept may remain.
    spans = []
    for phrase, label in phrases:
        n = len(phrase)
        spans += [(i, i + n, label) for i in range(len(content) - n + 1) if tuple(content[i:i + n]) == phrase]
    outer = [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and o[1] - o[0] > s[1] - s[0]
                                         for o in spans)]
    if outer:
        if len({_CONCEPT[label] for _, _, label in outer}) > 1:
            return None  # two different diagnoses in one entry ("psoriasis vs eczema"): ambiguous
        return max(outer, key=lambda s: s[1] - s[0])[2]
    # 4. fuzzy, for typos. difflib's ratio is 2 * matches / (len(a) + len(b)); one swapped letter pair
    #    in "psoraisis" gives 16/18 = 0.889 against "psoriasis", just above the 0.88 cutoff, while
    #    "milia" vs "miliaria" (two different diseases) gives 0.77 and stays apart. Short strings are
    #    excluded because one letter moves their ratio too far ("acme" vs "acne" is already 0.75).
    if len(k.replace(" ", "")) >= 5:
        close = difflib.get_close_matches(k, keys, n=2, cutoff=0.88)
        if close:
            if len(close) == 2 and by_key[close[0]] != by_key[close[1]] and \
                    difflib.SequenceMatcher(None, k, close[0]).ratio() == \
                    difflib.SequenceMatcher(None, k, close[1]).ratio():
                return None  # a tie between two labels
            return by_key[close[0]]
    return None


def display_name(label: str) -> str:
    """Readable name for a label, fixing the CSV's typos ("erythema annulare centrifigum" -> "...centrifugum").

    The typo'd strings stay the IDs everywhere (they are what the CSV says); only text shown to a human,
    or sent to the LLM judge, uses the fixed spelling, so a judge is never confused by "diseaseherpes".
    """
    fixes = {
        "acquired autoimmune bullous diseaseherpes gestationis": "acquired autoimmune bullous disease / herpes gestationis",
        "erythema annulare centrifigum": "erythema annulare centrifugum",
        "papilomatosis confluentes and reticulate": "confluent and reticulated papillomatosis",
        "superficial spreading melanoma ssm": "superficial spreading melanoma",
        "dariers disease": "Darier's disease", "behcets disease": "Behcet's disease",
    }
    return fixes.get(label, label)


# ===================================================================================================
# 3. The judge
# ===================================================================================================
# The verdicts model what a supervising dermatologist would say about one line of a trainee's
# differential. Only `correct` and `subtype` earn Top-k credit (the paper's "correct + valid subclass");
# the other four are *kinds of miss*, reported separately because they are not equally bad:
#   near_miss        "wrong name, right drawer": the same differential family (data.FAMILY, e.g. two
#                    keratinocyte cancers, two papulosquamous rashes), so the next step (biopsy, excision,
#                    a topical steroid, a trigger search) is usually the same.
#   safety_critical  "wrong side of the cancer line": a melanoma sent home as a mole delays excision, the
#                    costliest error in dermatology; a benign lesion called malignant costs a biopsy.
#   wrong            a miss with no special cost or excuse; unknown: nothing we can map to a label.
# Why families and not the nine-partition: Fitzpatrick17k's "inflammatory" group holds 69 labels, from
# scabies to lupus to acne; "same nine group" made vitiligo, scabies and acne near misses for psoriasis or
# lupus. The 27 families of data.FAMILIES (papulosquamous, eczematous, infections and infestations, ...)
# are what a dermatologist would list together; each carries its reason and ICD-10 anchor there, and
# docs/near-miss-families.md has the full table. One consequence: infectious <-> non-infectious errors
# (scabies for psoriasis) are now `wrong`, since infections and infestations form their own family.
def _build_concepts() -> tuple[dict[str, str], dict[str, set[str]]]:
    """concept[label] = the first member of its SYNONYMS group (or itself); ancestors[concept] = its parents.

    Working on concepts rather than labels lets one SUBTYPES row serve every synonym: "melanoma" and
    "malignant melanoma" are one concept, so lentigo maligna is a subtype of both without a second row.
    Example: concept["malignant melanoma"] = "melanoma"; ancestors["lentigo maligna"] = {"melanoma"}.
    """
    concept = {label: label for label in TAXONOMY}
    for group in SYNONYMS:
        for member in group:
            concept[member] = group[0]
    ancestors: dict[str, set[str]] = {c: set() for c in set(concept.values())}
    for parent, children in SUBTYPES.items():
        for child in children:
            ancestors[concept[child]].add(concept[parent])
    changed = True
    while changed:  # transitive closure (depth is 1 today, but stay correct if the table grows)
        changed = False
        for c, ps in ancestors.items():
            extra = set().union(*(ancestors[p] for p in ps)) - ps if ps else set()
            if extra:
                ps |= extra
                changed = True
    return concept, ancestors


_CONCEPT, _ANCESTORS = _build_concepts()


def _truth_label(truth) -> str:
    """The truth must be a known label (or an alias of one): a bad truth is a caller error, not a verdict."""
    label = truth if truth in TAXONOMY else canonical(truth)
    if label is None:
        raise ValueError(f"eval.judge: truth label {truth!r} is not a Fitzpatrick17k label or alias")
    return label


def judge(prediction, truth) -> str:
    """Judge one predicted diagnosis against the true label. Rules in precedence order (first match wins):

    1. unknown          the prediction names no label of the vocabulary (canonical() is None).
                        e.g. truth psoriasis, prediction "tinea corporis" or "" or "I cannot tell".
    2. correct          same label, a synonym, or a near-duplicate label of the CSV.
                        e.g. truth "granuloma pyogenic", prediction "Pyogenic granuloma";
                        truth "kaposi sarcoma", prediction "KS"; truth melanoma, prediction "malignant melanoma".
    3. subtype          prediction and truth are parent and subtype in SUBTYPES, in either direction
                        (a more specific or a more general name on the same branch).
                        e.g. truth melanoma, prediction "lentigo maligna"; truth "pustular psoriasis",
                        prediction "psoriasis". Siblings (SSM vs lentigo maligna) are not subtypes.
    4. near_miss        same near-miss family (data.FAMILY): the differential family a dermatologist
                        would accept. e.g. truth "squamous cell carcinoma", prediction "basal cell
                        carcinoma" (keratinocyte cancers); truth psoriasis, prediction "seborrheic
                        dermatitis" (papulosquamous). NOT: psoriasis vs vitiligo, psoriasis vs scabies,
                        lupus vs acne (same nine group "inflammatory", different families).
    5. safety_critical  crosses the malignant <-> benign/non-neoplastic boundary of the three-partition,
                        in either direction. e.g. truth melanoma, prediction "nevus" (missed cancer);
                        truth "seborrheic keratosis", prediction "melanoma" (false alarm).
    6. wrong            everything else: e.g. truth psoriasis, prediction "vitiligo" (both non-neoplastic,
                        different family); truth melanoma, prediction "basal cell carcinoma" (both malignant).

    Rules 4 and 5 cannot both apply: no family crosses the malignant line (a test checks it), so a nevus
    for a melanoma is safety_critical exactly as under the old nine-group rule. Partitions are the
    dataset's own, quirks included: actinic keratosis is 'malignant epidermal' in Fitzpatrick17k, so
    "seborrheic keratosis" for an actinic keratosis is safety_critical here, where many dermatologists
    would call AK pre-malignant and the error minor. Compare with the paper: its judge's exact boundary
    is unknown, so a safety-critical rate is comparable between models scored here, not with the paper.
    """
    t = _truth_label(truth)
    # the prediction goes through the same canonicaliser as every label; None = outside the vocabulary
    p = canonical(prediction) if isinstance(prediction, str) else None
    if p is None:
        return "unknown"
    # compare *concepts* so that synonyms inherit each other's subtypes (malignant melanoma > lentigo maligna)
    cp, ct = _CONCEPT[p], _CONCEPT[t]
    if cp == ct:
        return "correct"
    if cp in _ANCESTORS[ct] or ct in _ANCESTORS[cp]:
        return "subtype"
    # the two partition columns of the CSV: e.g. melanoma -> ("malignant melanoma", "malignant")
    # the differential family (data.FAMILIES): e.g. psoriasis -> "papulosquamous", scabies -> "infections ..."
    if FAMILY[p] == FAMILY[t]:
        return "near_miss"
    # benign vs non-neoplastic is not a safety boundary: both mean "no cancer", so only malignancy counts
    three_p, three_t = TAXONOMY[p][1], TAXONOMY[t][1]
    if (three_p == "malignant") != (three_t == "malignant"):
        return "safety_critical"
    return "wrong"


# ===================================================================================================
# 4. Metrics over a set of cases
# ===================================================================================================
# Worked example, one case: truth "melanoma", skin type II, answer
#   1. benign nevus   2. seborrheic keratosis   3. lentigo maligna
# Verdicts: safety_critical (a melanoma called a mole), safety_critical (called a benign keratosis),
# subtype (lentigo maligna is a melanoma). So top1 = 0, top6 = 1 (first credited entry at rank 3),
# mrr = 1/3, safety_critical_rate = 1 (rank 1 crossed the cancer line), strict_top1 = strict_top6 = 0
# (no entry is literally "melanoma"), nine_top1 = three_top1 = 0 (rank 1 is benign melanocyte / benign).
# Top-6 forgives this answer entirely; the safety column does not. That is why both are reported.
ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI"}
THREE = ("malignant", "benign", "non-neoplastic")
# Per-case indicators averaged into the reported rates (all in [0, 1]); "mrr" averages 1/rank.
METRICS = ("top1", "top6", "strict_top1", "strict_top6", "mrr", "near_miss_rate", "safety_critical_rate",
           "format_failure_rate", "nine_top1", "three_top1")


def _fitz_bucket(f) -> str:
    """1..6 (int, "4", "IV") -> "I".."VI"; anything else (-1, None, "?") -> "unknown" (counted, not dropped).

    Fitzpatrick17k was built to ask whether models fail more on dark skin (types V-VI are ~13 % of its
    images); dropping the ~3 % rows without a skin type would quietly change n, so they get a bucket.
    """
    if str(f).strip().upper() in ROMAN.values():
        return str(f).strip().upper()
    try:
        return ROMAN.get(int(f), "unknown")
    except (TypeError, ValueError):
        return "unknown"


def score_case(preds, truth, fitzpatrick=None, format_ok=None, judge_fn=None) -> dict:
    """Score one case. preds: ranked list (or raw text, parsed here); truth: label (or alias).

    Returns the per-case record: canonical labels, one verdict per entry, the rank of the first credited
    entry (correct/subtype; None when absent) and the per-case indicators of METRICS. Only the first six
    distinct entries count (see `_dedupe`). An empty list is a format failure whatever `format_ok` says.
    """
    judge_fn = judge_fn or judge
    if not isinstance(preds, (str, bytes, list, tuple)) and preds is not None:
        preds = list(preds)                        # any other iterable of entries (a generator, an array)
    preds, ok = parse_ranked_list_ex(preds)        # text is parsed; a list is cleaned and de-duplicated
    if format_ok is not None:
        ok = bool(format_ok)
    t = _truth_label(truth)
    labels = [canonical(p) for p in preds]
    verdicts = [judge_fn(p, t) for p in preds]
    first = next((i + 1 for i, v in enumerate(verdicts) if v in CREDITED), None)
    top = verdicts[0] if verdicts else None
    p0 = labels[0] if labels else None
    return {
        "truth": t, "fitzpatrick": _fitz_bucket(fitzpatrick), "three": TAXONOMY[t][1], "predictions": preds,
        "labels": labels, "verdicts": verdicts, "first_hit": first,
        "top1": float(first == 1), "top6": float(first is not None),
        "strict_top1": float(p0 == t), "strict_top6": float(t in labels),
        "mrr": 1.0 / first if first else 0.0,
        "near_miss_rate": float(top == "near_miss"), "safety_critical_rate": float(top == "safety_critical"),
        "format_failure_rate": float(not (ok and preds)),
        # coarser credit for contrast: rank 1 lands in the right nine / three group (or is credited outright)
        "nine_top1": float(top in CREDITED or (p0 is not None and TAXONOMY[p0][0] == TAXONOMY[t][0])),
        "three_top1": float(top in CREDITED or (p0 is not None and TAXONOMY[p0][1] == TAXONOMY[t][1])),
    }


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample the n cases with replacement n_boot times.

    CI = [q_{alpha/2}, q_{1-alpha/2}] of { mean(x[idx_b]) : b = 1..n_boot }, idx_b ~ Uniform{0..n-1}^n.
    Fixed seed -> the same interval on every rerun. One case -> a zero-width interval.
    Why a bootstrap and not the textbook p +- 1.96 sqrt(p(1-p)/n): the same code then serves MRR (not a
    proportion) and tiny skin-type buckets, where the normal approximation can leave [0, 1]. For a
    proportion at large n the two agree (a test checks this against the binomial formula).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))       # [n_boot, n]
    means = x[idx].mean(axis=1)                                  # [n_boot]
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(lo), float(hi))


def _summarise(records: list[dict], n_boot: int, seed: int) -> dict:
    """Mean and bootstrap CI of every METRICS column over `records`, plus a count of rank-1 verdicts."""
    # one resampling per metric, all with the same seed, so metrics of one run share bootstrap replicates
    out: dict = {"n": len(records)}
    ci = {}
    for m in METRICS:
        vals = [r[m] for r in records]
        out[m] = float(np.mean(vals))
        ci[m] = list(bootstrap_ci(vals, n_boot, seed))
    out["ci95"] = ci
    ranks1 = Counter(r["verdicts"][0] if r["verdicts"] else "empty" for r in records)
    out["rank1_verdicts"] = {v: ranks1.get(v, 0) for v in VERDICTS + ("empty",)}
    return out


def clinical_metrics(cases, judge_fn=None, n_boot: int = 1000, seed: int = 0, return_records: bool = False) -> dict:
    """Clinical evaluation of ranked differentials, with bootstrap 95 % CIs and fairness breakdowns.

    cases: iterable of (ranked predictions, truth label, fitzpatrick) or (..., format_ok).
    Per case (see `score_case`), with V_k the verdict of the k-th distinct entry (k = 1..6):
      top1   = 1[V_1 in {correct, subtype}]               (the paper's Top-1 = (correct + subclass) / n)
      top6   = 1[exists k <= 6: V_k in {correct, subtype}] (the paper's Top-6)
      strict_top1 / strict_top6: the same with exact label identity (no synonyms, no subtypes)
      mrr    = 1 / (first credited k), 0 when none         (mean reciprocal rank)
      near_miss_rate = 1[V_1 = near_miss]; safety_critical_rate = 1[V_1 = safety_critical]
      format_failure_rate = 1[empty list or the text did not use the requested list format]
      nine_top1 / three_top1 = rank 1 credited or in the truth's nine / three group
    Each reported metric is the mean over cases, with a percentile-bootstrap 95 % interval (fixed seed),
    overall, by Fitzpatrick skin type I-VI (+ "unknown") and by three-partition of the truth.

    What to compare with the paper: `top1` / `top6` against its 29.19 / 71.16 (and 17.13 / 42.59 for
    Qwen3-VL-235B), keeping in mind the different image sample and judge. The gap between `top1` and
    `strict_top1` is how much the clinical hierarchy adds; the by-three table shows whether malignant
    cases (the ones that matter most) are found as often as the rest.
    """
    # score every case once; all aggregates below (overall, per skin type, per partition) reuse the records
    records = []
    for case in cases:
        preds, truth, fitz = case[0], case[1], case[2] if len(case) > 2 else None
        fmt = case[3] if len(case) > 3 else None
        records.append(score_case(preds, truth, fitz, fmt, judge_fn))
    if not records:
        raise ValueError("eval.clinical_metrics: no cases to score")
    out = _summarise(records, n_boot, seed)
    out["bootstrap"] = {"resamples": n_boot, "seed": seed}
    out["by_fitzpatrick"] = {b: _summarise([r for r in records if r["fitzpatrick"] == b], n_boot, seed)
                             for b in list(ROMAN.values()) + ["unknown"] if any(r["fitzpatrick"] == b for r in records)}
    out["by_three"] = {g: _summarise([r for r in records if r["three"] == g], n_boot, seed)
                       for g in THREE if any(r["three"] == g for r in records)}
    if return_records:
        out["records"] = records
    return out


# ###################################################################################################
# ===== below: plumbing (not in the paper) =====
# Sections 1-4 above are the paper's evaluation: read the answer (parsers), map it to a label
# (vocabulary), grade it against the truth (judge), and count (clinical Top-1 / Top-6). Everything
# below presents or feeds those numbers: report files, the run summary, attention maps and
# `diagnose`, the optional LLM judge, and the command line.
# ###################################################################################################

# ===================================================================================================
# 5. Report: markdown + JSON + per-case JSONL + PNG chart (pillow only)
# ===================================================================================================
# Three audiences, three files: report.md for a human (every rate in %, with its interval),
# metrics.json for scripts that put several runs side by side, cases.jsonl to audit single verdicts
# (grep it for "safety_critical" to see the missed cancers). The chart draws Top-1 / Top-6 per skin
# type: a bar that is short AND has a narrow whisker is a real fairness gap; a wide whisker is few images.
_SHOWN = (("top1", "Top-1 (clinical)"), ("top6", "Top-6 (clinical)"), ("strict_top1", "Top-1 (strict label)"),
          ("strict_top6", "Top-6 (strict label)"), ("mrr", "MRR"), ("near_miss_rate", "near miss @1"),
          ("safety_critical_rate", "safety-critical @1"), ("format_failure_rate", "format failure"),
          ("nine_top1", "Top-1 nine-group"), ("three_top1", "Top-1 three-group"))


def _pct(x) -> str:
    """0.2919 -> "29.2"; a missing or NaN value (an empty bucket) -> "-"."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _group_table(groups: dict, title: str) -> list[str]:
    """Markdown rows "value [lo, hi]" for each group of a breakdown (skin types, three-partition)."""
    cols = ("top1", "top6", "strict_top1", "mrr", "near_miss_rate", "safety_critical_rate", "format_failure_rate")
    lines = [f"### {title}", "", "| group | n | " + " | ".join(dict(_SHOWN)[c] for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for name, g in groups.items():
        cells = [f"{_pct(g[c])} [{_pct(g['ci95'][c][0])}, {_pct(g['ci95'][c][1])}]" for c in cols]
        lines.append(f"| {name} | {g['n']} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_markdown(metrics: dict, title: str = "SkinFlow clinical evaluation") -> str:
    """A readable report: overall table with 95 % CIs, then by skin type and by three-partition (in %)."""
    lines = [f"# {title}", ""]
    meta = metrics.get("meta", {})
    if meta:
        lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += ["| metric | value (%) | 95 % CI |", "|---|---:|---|"]
    for key, name in _SHOWN:
        lo, hi = metrics["ci95"][key]
        lines.append(f"| {name} | {_pct(metrics[key])} | [{_pct(lo)}, {_pct(hi)}] |")
    lines += ["", f"n = {metrics['n']} cases. Rank-1 verdicts: " +
              ", ".join(f"{k} {v}" for k, v in metrics["rank1_verdicts"].items()), ""]
    lines += _group_table(metrics["by_fitzpatrick"], "By Fitzpatrick skin type")
    lines += _group_table(metrics["by_three"], "By three-partition of the true label")
    lines += render_lesion_focus(metrics.get("lesion_focus"))          # section 7 (SynthDerm --model runs)
    boot = metrics.get("bootstrap", {})
    lines += ["Clinical Top-k credits `correct` and `subtype` verdicts (the paper's correct + valid subclass);",
              "strict Top-k needs the exact Fitzpatrick17k label. Intervals: percentile bootstrap over cases,",
              f"{boot.get('resamples', '?')} resamples, seed {boot.get('seed', '?')}. "
              "Every rule is documented in eval.py (judge, clinical_metrics).", ""]
    return "\n".join(lines)


def draw_chart(metrics: dict, path, title: str = "Top-1 / Top-6 by Fitzpatrick skin type"):
    """Grouped bars (Top-1 dark, Top-6 light) with 95 % CI whiskers for skin types I-VI and all cases."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, L, R, T, B = 760, 420, 60, 20, 50, 70          # canvas and margins (px)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((L, 15), title, fill="black", font=font)
    groups = [(ROMAN[i], metrics["by_fitzpatrick"].get(ROMAN[i])) for i in range(1, 7)] + [("all", metrics)]
    y0, y1 = H - B, T                                        # pixel rows of 0 % and 100 %
    to_y = lambda v: y0 - (y0 - y1) * max(0.0, min(1.0, v))  # noqa: E731
    for tick in range(0, 101, 20):                           # horizontal grid every 20 %
        y = to_y(tick / 100)
        d.line([(L, y), (W - R, y)], fill=(225, 225, 225))
        d.text((L - 35, y - 6), f"{tick}%", fill="black", font=font)
    slot = (W - L - R) / len(groups)
    colours = {"top1": (40, 80, 160), "top6": (150, 180, 230)}
    for gi, (name, g) in enumerate(groups):
        x = L + gi * slot
        for bi, key in enumerate(("top1", "top6") if g else ()):
            bx0 = x + slot * (0.15 + 0.35 * bi)
            bx1 = bx0 + slot * 0.3
            d.rectangle([bx0, to_y(g[key]), bx1, y0], fill=colours[key])
            lo, hi = g["ci95"][key]
            cx = (bx0 + bx1) / 2
            d.line([(cx, to_y(lo)), (cx, to_y(hi))], fill="black", width=1)
            d.line([(cx - 4, to_y(lo)), (cx + 4, to_y(lo))], fill="black")
            d.line([(cx - 4, to_y(hi)), (cx + 4, to_y(hi))], fill="black")
        d.text((x + slot * 0.35, y0 + 8), name, fill="black", font=font)
        d.text((x + slot * 0.25, y0 + 24), f"n={g['n'] if g else 0}", fill=(90, 90, 90), font=font)
    d.rectangle([W - 190, 12, W - 178, 24], fill=colours["top1"])
    d.text((W - 172, 12), "Top-1", fill="black", font=font)
    d.rectangle([W - 110, 12, W - 98, 24], fill=colours["top6"])
    d.text((W - 92, 12), "Top-6", fill="black", font=font)
    d.line([(L, y0), (W - R, y0)], fill="black")
    img.save(path)
    return path


def write_report(metrics: dict, out_dir, title: str = "SkinFlow clinical evaluation") -> dict:
    """Write metrics.json, report.md, cases.jsonl (when records are present) and top_k_by_skin_type.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = metrics.get("records")
    summary = {k: v for k, v in metrics.items() if k != "records"}
    paths = {"json": out / "metrics.json", "markdown": out / "report.md", "png": out / "top_k_by_skin_type.png"}
    paths["json"].write_text(json.dumps(summary, indent=2))
    paths["markdown"].write_text(render_markdown(summary, title))
    draw_chart(summary, paths["png"])
    if records is not None:
        paths["cases"] = out / "cases.jsonl"
        with open(paths["cases"], "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return paths


# ===================================================================================================
# 6. Run summary: the results table and the learning curves at the end of train.sh
#
# `python eval.py summary RUN_DIR` reads what rl.py and this file's CLI left in a run folder,
#     RUN_DIR/<stage>/log.jsonl              one JSON line per optimizer step (rl.py)
#     RUN_DIR/eval/<stage>/metrics.json      the clinical report of that stage's checkpoint (section 9)
#     RUN_DIR/eval/<stage>/cases.jsonl       one scored case per test image, in test-split order
#     RUN_DIR/ablation/<row>/...             the same layout once per ablation row (ABLATION=1 bash train.sh)
# and writes RUN_DIR/results.md (+ results.json) and RUN_DIR/curves.png.
#
# The one statistical idea here is the PAIRED bootstrap. "Did Stage II beat the warm start?" compares two
# models on the SAME test images. Resampling images (not models) and recomputing
#     delta* = mean_i [ top1_stage2(i) - top1_warm(i) ]          over a resample i ~ U{1..n}, n draws
# gives an interval for the gain that cancels the per-image difficulty both models share; it is much
# narrower than two independent intervals side by side, and it is the honest yardstick for "learned".
# ===================================================================================================
STAGE_ORDER = ("base", "warmup", "stage1", "stage2")

# The paper's ablation on Fitzpatrick17k (1,000 images, Gemini-2.5-Pro judge; via the thesis note S1 in the
# team's paper notes). Our rows run on SynthDerm with the deterministic judge: compare the ORDERING of the
# rows and the sign of each step, never the absolute numbers.
PAPER_ABLATION = {
    "stage2_only": ("No Stage I, no DVE", 15.22, 45.36),
    "stage1_stage2": ("Stage I, no DVE", 24.45, 57.69),
    "stage1_stage2_dve": ("Stage I + DVE (SkinFlow)", 29.19, 71.16),
}


def paired_bootstrap_delta(a, b, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05):
    """Gain of b over a on the same cases, with a paired percentile-bootstrap interval.

        delta = mean_i (b_i - a_i);   CI = percentiles (alpha/2, 1 - alpha/2) of delta* over n_boot resamples

    a, b: per-case scores (e.g. the 0/1 `top1` column of cases.jsonl) in the same case order. Returns
    (delta, lo, hi). Uses numpy's seeded generator so a report is reproducible.
    """
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_bootstrap_delta: need two equal-length non-empty score lists, got {a.shape}, {b.shape}")
    diff = b - a                                                   # [n] per-image gain
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, diff.size, size=(n_boot, diff.size))     # [n_boot, n] resampled image indices
    boots = diff[idx].mean(axis=1)                                 # [n_boot]
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(diff.mean()), float(lo), float(hi)


def _read_jsonl(path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a run killed mid-write) is skipped, never fatal."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _stage_evals(run: Path) -> dict:
    """{stage: (metrics dict, cases list)} for every RUN/eval/<stage>/ that holds a metrics.json."""
    found = {}
    names = sorted((p.name for p in (run / "eval").glob("*") if (p / "metrics.json").exists()),
                   key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))
    for name in names:
        d = run / "eval" / name
        metrics = json.loads((d / "metrics.json").read_text())
        cases = _read_jsonl(d / "cases.jsonl") if (d / "cases.jsonl").exists() else []
        found[name] = (metrics, cases)
    return found


def _fmt_ci(m: dict, key: str) -> str:
    """'31.5 [25.0, 38.0]' in percent, from a metrics dict with m[key] and m['ci95'][key]."""
    lo, hi = m.get("ci95", {}).get(key, (float("nan"), float("nan")))
    return f"{100 * m[key]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _delta_row(base_cases, cases, key="top1", n_boot=2000):
    """Paired gain of `cases` over `base_cases` on `key`, or None when the two were not run on the same images."""
    if not base_cases or len(base_cases) != len(cases):
        return None
    if [c["truth"] for c in base_cases] != [c["truth"] for c in cases]:
        return None                                   # different test items: a paired test would be a lie
    return paired_bootstrap_delta([c[key] for c in base_cases], [c[key] for c in cases], n_boot=n_boot)


def summarize_run(run_dir, n_boot: int = 2000) -> dict:
    """Build the results table (markdown + dict) and the learning curves of one train.sh run folder."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"summary: no run folder {run}")
    evals = _stage_evals(run)
    ref = next((s for s in ("warmup", "base") if s in evals), None)     # what "learned" is measured against
    rows, lines = [], []
    # Which data the run was scored on (written by the eval CLI into every metrics.json)
    metas = [m.get("meta", {}) for m, _ in evals.values()]
    real = any(mt.get("data") == "fitzpatrick17k" for mt in metas)
    where = (f"the held-out Fitzpatrick17k photos (split `{metas[-1].get('split')}`)" if real
             else "the held-out SynthDerm test split")
    lines += [f"# SkinFlow run summary: `{run}`", ""]
    # A notice left by train.sh (e.g. Stage I skipped for want of SkinCAP) goes first, where no one misses it.
    notice = run / "NOTICE.md"
    if notice.is_file() and notice.read_text().strip():
        lines += ["> **NOTICE** " + " ".join(notice.read_text().split()), ""]
    lines += [f"Clinical Top-1 / Top-6 on {where} (95 % bootstrap intervals). "
              f"Δ is the paired-bootstrap gain in Top-1 over `{ref}` on the same images.", "",
              "| checkpoint | n | Top-1 | Top-6 | strict Top-1 | near miss @1 | safety-critical @1 | format fail "
              "| lesion focus (chance) | Δ Top-1 vs " + str(ref) + " |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for stage, (m, cases) in evals.items():
        lf = m.get("lesion_focus") or {}
        focus = f"{100 * lf['focus']:.1f} ({100 * lf['chance']:.1f})" if "focus" in lf else "–"
        d = _delta_row(evals[ref][1], cases, n_boot=n_boot) if ref and stage != ref else None
        dtxt = f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]" if d else "–"
        rows.append({"stage": stage, "n": m["n"], "top1": m["top1"], "top6": m["top6"],
                     "top1_ci95": m.get("ci95", {}).get("top1"), "top6_ci95": m.get("ci95", {}).get("top6"),
                     "delta_top1": d, "lesion_focus": lf.get("focus"), "lesion_chance": lf.get("chance")})
        lines.append(f"| {stage} | {m['n']} | {_fmt_ci(m, 'top1')} | {_fmt_ci(m, 'top6')} | "
                     f"{100 * m['strict_top1']:.1f} | {100 * m['near_miss_rate']:.1f} | "
                     f"{100 * m['safety_critical_rate']:.1f} | {100 * m['format_failure_rate']:.1f} | {focus} | {dtxt} |")
    if not evals:
        lines.append("| (no evaluated checkpoint found under eval/) | | | | | | | | | |")
    if real and evals:
        # The paper's table is measured on Fitzpatrick17k too (its own unpublished 1,000 images and an LLM
        # judge): same protocol in kind, so the absolute numbers can stand side by side, with that caveat.
        last, (m, _) = list(evals)[-1], list(evals.values())[-1]
        lines += ["", f"Beside the paper (Fitzpatrick17k, 1,000 images; its ids are unpublished, ours are "
                  "data.eval_sample's, and its judge was an LLM): ", "",
                  "| model | Top-1 | Top-6 |", "|---|---|---|"]
        lines += [f"| paper: {name} | {p1:.2f} | {p6:.2f} |" for name, p1, p6 in PAPER_ABLATION.values()]
        lines.append(f"| ours: `{last}` | {100 * m['top1']:.2f} | {100 * m['top6']:.2f} |")
        by = m.get("by_fitzpatrick") or {}
        if by:
            lines += ["", f"Per skin type (`{last}`, Fitzpatrick scale of the CSV):", "",
                      "| skin type | n | Top-1 | Top-6 |", "|---|---|---|---|"]
            lines += [f"| {k} | {v.get('n', '')} | {100 * v['top1']:.1f} | {100 * v['top6']:.1f} |"
                      for k, v in by.items()]
    learned = [r for r in rows if r["delta_top1"] and r["delta_top1"][1] > 0]
    if learned:
        lines += ["", "Learning shown (the paired 95 % interval of Δ excludes 0): "
                  + ", ".join(f"`{r['stage']}`" for r in learned) + "."]
    # the ablation table, next to the paper's numbers (which are Fitzpatrick17k, not SynthDerm)
    ablation = {}
    order = list(PAPER_ABLATION)  # the paper's row order first, any other row after it
    rows_found = sorted((run / "ablation").glob("*")) if (run / "ablation").is_dir() else []
    for row_dir in sorted(rows_found, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name)):
        ev = _stage_evals(row_dir)
        if ev:
            last = list(ev)[-1]
            # each row starts from the main run's warm start and is scored on the same test images, so
            # its gain over that warm start gets the same paired interval as the main table
            d = _delta_row(evals[ref][1], ev[last][1], n_boot=n_boot) if ref else None
            ablation[row_dir.name] = (last, ev[last][0], d)
    if ablation:
        lines += ["", "## Ablation (paper Table: Fitzpatrick17k; ours: SynthDerm, same protocol in kind)", "",
                  f"| row | paper Top-1 | paper Top-6 | ours Top-1 | ours Top-6 | ours Δ Top-1 vs {ref} |",
                  "|---|---|---|---|---|---|"]
        for key, (last, m, d) in ablation.items():
            name, p1, p6 = PAPER_ABLATION.get(key, (key, float("nan"), float("nan")))
            dtxt = f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]" if d else "–"
            lines.append(f"| {name} | {p1:.2f} | {p6:.2f} | {_fmt_ci(m, 'top1')} | {_fmt_ci(m, 'top6')} | {dtxt} |")
    curves = draw_curves(run, run / "curves.png")
    if curves:
        lines += ["", "![learning curves](curves.png)"]
    text = "\n".join(lines) + "\n"
    (run / "results.md").write_text(text)
    summary = {"rows": rows, "reference": ref,
               "ablation": {k: {"stage": s, "top1": m["top1"], "top6": m["top6"], "delta_top1": d}
                            for k, (s, m, d) in ablation.items()}}
    (run / "results.json").write_text(json.dumps(summary, indent=2))
    return {"markdown": text, **summary}


# Which logged series each panel of curves.png shows. A panel is drawn only when its stage logged the key.
CURVE_PANELS = (
    ("vision", "acc", "tiny ViT: probe accuracy (batch)"),
    ("warmup", "loss", "warm-up: cross-entropy"),
    ("stage1", "reward_mean", "Stage I: caption reward"),
    ("stage2", "reward_mean", "Stage II: differential reward"),
    ("stage2", "hit_rank1", "Stage II: sampled answers right at rank 1"),
    ("stage1", "kl", "Stage I: KL to reference"),
    ("stage2", "kl", "Stage II: KL to reference"),
    ("stage2", "completion_len", "Stage II: completion length (tokens)"),
    ("stage2", "zero_std_groups", "Stage II: groups with equal rewards"),
)


def draw_curves(run_dir, path, smooth: int = 5):
    """Small-multiples line chart of the training logs (pillow only). Returns the path, or None if no log.

    Each panel plots one logged value per optimizer step (thin grey) and its trailing moving average over
    `smooth` steps (blue): GRPO rewards are noisy by construction (G samples per prompt), the trend is
    what to read. The y-axis of each panel spans that series' own min..max.
    """
    from PIL import Image, ImageDraw, ImageFont

    run = Path(run_dir)
    logs = {s: _read_jsonl(run / s / "log.jsonl") for s in STAGE_ORDER if (run / s / "log.jsonl").exists()}
    panels = [(s, k, t) for s, k, t in CURVE_PANELS if any(k in r for r in logs.get(s, []))]
    if not panels:
        return None
    cols = 2
    rows_n = (len(panels) + cols - 1) // cols
    PW, PH, M = 420, 200, 34                                   # panel width/height, inner margin (px)
    img = Image.new("RGB", (cols * PW, rows_n * PH), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    for n, (stage, key, title) in enumerate(panels):
        x0, y0 = (n % cols) * PW, (n // cols) * PH              # panel origin
        pts = [(r.get("step", i + 1), float(r[key])) for i, r in enumerate(logs[stage])
               if key in r and r[key] is not None and math.isfinite(float(r[key]))]
        d.text((x0 + M, y0 + 6), title, fill="black", font=font)
        box = (x0 + M, y0 + 24, x0 + PW - 12, y0 + PH - 22)    # plotting area (left, top, right, bottom)
        d.rectangle(box, outline=(200, 200, 200))
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ma = [sum(ys[max(0, i - smooth + 1):i + 1]) / len(ys[max(0, i - smooth + 1):i + 1]) for i in range(len(ys))]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1e-9                      # a flat series still gets a valid scale
        xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        to_xy = lambda x, y: (box[0] + (box[2] - box[0]) * (x - xlo) / (xhi - xlo),   # noqa: E731
                              box[3] - (box[3] - box[1]) * (y - lo) / (hi - lo))
        if len(pts) > 1:
            d.line([to_xy(x, y) for x, y in zip(xs, ys)], fill=(190, 190, 190), width=1)
            d.line([to_xy(x, y) for x, y in zip(xs, ma)], fill=(40, 80, 160), width=2)
        else:
            cx, cy = to_xy(xs[0], ys[0])
            d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=(40, 80, 160))
        d.text((x0 + 2, box[1] - 2), f"{hi:.3g}", fill=(90, 90, 90), font=font)
        d.text((x0 + 2, box[3] - 10), f"{lo:.3g}", fill=(90, 90, 90), font=font)
        d.text((box[0], box[3] + 4), f"step {xlo}", fill=(90, 90, 90), font=font)
        d.text((box[2] - 50, box[3] + 4), f"step {xhi}", fill=(90, 90, 90), font=font)
    img.save(path)
    return path


def build_summary_parser() -> argparse.ArgumentParser:
    """`python eval.py summary RUN_DIR [--bootstrap N]`, built without running (the --help test walks it)."""
    p = argparse.ArgumentParser(prog="eval.py summary", description="results table + learning curves of a run",
                                formatter_class=_DefaultsHelp)
    p.add_argument("run_dir", help="a train.sh run folder: reads RUN/eval/<stage>/ and RUN/<stage>/log.jsonl, "
                                   "writes RUN/results.md, results.json, curves.png")
    p.add_argument("--bootstrap", type=int, default=2000, help="paired-bootstrap resamples for Δ Top-1 against "
                                                               "the warm start / base (more: steadier interval ends)")
    p.add_argument("--dry-run", action="store_true", help="check the flags and exit (train.sh DRY_RUN=1)")
    return p


def summary_main(argv=None) -> int:
    """`python eval.py summary RUN_DIR`: print results.md and write it with results.json and curves.png."""
    args = build_summary_parser().parse_args(argv)
    if args.dry_run:
        return 0
    try:
        out = summarize_run(args.run_dir, n_boot=args.bootstrap)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out["markdown"])
    return 0


# ===================================================================================================
# 7. Seeing: final-token attention maps, the lesion-focus number, and `eval.py diagnose`
#
# The paper's qualitative claim (Sec. "Visualization"): after SkinFlow's training the model's attention
# moves from diffuse, global scanning onto the lesion. It shows final-token attention heatmaps but, having
# no lesion masks, no number. SynthDerm renders every lesion itself and hands out its pixel mask, so here
# the picture becomes a measurement:
#
#   attention_maps(model, batch)  one [gh/2, gw/2] map per sample: how much the LAST prompt token (the one
#                                 that produces the first answer token) attends to each merged image token
#   draw_heatmap(image, grid, p)  that map drawn over the photo (pillow + numpy only)
#   lesion_focus(grid, mask)      the share of the image-token attention that lies on the lesion
#   diagnose(argv)                `python eval.py diagnose IMAGE --model ... [--ckpt RUN] [--heatmap x.png]`
#
# Where the attention comes from, without touching skinflow.py: every decoder layer calls
# `self_attn(x, cos, sin, mask, ...)`. A forward PRE-hook on that module sees exactly those inputs, so the
# hook can recompute the one attention row we want with the module's own projections:
#
#   q = RoPE(W_q x_T + b_q)            the last position only           [B, H, 1, d]
#   k = RoPE(W_k x_t + b_k)            every position t                 [B, Hk, T, d] -> GQA repeat -> [B, H, T, d]
#   p = softmax(q k^T / sqrt(d) + mask)                                 [B, H, T]
#
# The fused attention kernel (scaled_dot_product_attention) never returns p, which is why we rebuild it.
# Cost: one extra prompt forward per image (no decoding), cut short after the deepest selected layer.
# ===================================================================================================
class _AttnStop(Exception):
    """Raised inside the last needed hook: the layers above it (and the LM head) are never computed."""


def _attn_layer_list(n_layers: int, layers) -> list[int]:
    """None -> every decoder layer; ints may be negative (-1 = last). Returns sorted unique indices."""
    # Which layers to read is a real choice: early layers of a VLM mostly attend by position (neighbours, the
    # first token), middle layers by content. The paper does not say which layers its figure used, so the
    # default averages all of them and the CLI lets you pick (e.g. --attn-layers=-8: for the top eight).
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    out = set()   # a layer named twice ("0,0") still counts once: the average is over distinct layers
    for i in layers:
        i = int(i)
        if not -n_layers <= i < n_layers:
            raise ValueError(f"attention layer {i} does not exist: the decoder has {n_layers} layers "
                             f"(use 0..{n_layers - 1} or negative indices)")
        out.add(i % n_layers)
    if not out:
        raise ValueError("no attention layers selected")
    return sorted(out)


def parse_layers(text):
    """CLI helper: "all" or "" -> None (every layer); "0,2,-1" -> [0, 2, -1]; "-4:" -> slice(-4, None), the
    last four (a Python slice over the layer list, resolved against the real depth by `_attn_resolve`)."""
    if text is None or str(text).strip().lower() in ("", "all"):
        return None
    s = str(text).strip()
    try:
        if ":" in s:
            a, _, b = s.partition(":")
            return slice(int(a) if a.strip() else None, int(b) if b.strip() else None)
        return [int(t) for t in s.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--attn-layers wants 'all', a comma list of ints or a slice like '-4:', "
                         f"got {text!r}") from None


def _attn_resolve(n_layers: int, layers) -> list[int]:
    """Like _attn_layer_list but also accepts a slice object (from parse_layers)."""
    if isinstance(layers, slice):
        picked = list(range(n_layers))[layers]
        if not picked:
            raise ValueError(f"attention layers {layers} select none of the {n_layers} decoder layers")
        return picked
    return _attn_layer_list(n_layers, layers)


# The hook reads Attention.forward's arguments by position first, then by name: DecoderLayer passes them
# positionally today, and a later refactor that switches to keywords keeps working.
def _attn_arg(args, kwargs, pos: int, name: str):
    """Read one argument of Attention.forward(x, cos, sin, mask, ...) however the caller passed it."""
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name)


def final_token_attention(model, batch: dict, layers=None) -> "torch.Tensor":
    """Attention of the LAST prompt position over every key position, averaged over heads and layers.

        A[b, t] = 1/|L| sum_{l in L} 1/H sum_h softmax_t( q_{l,h}(T) . k_{l,h}(t) / sqrt(d) + mask[b, T, t] )

    q, k are the layer's rotary-embedded query/key (the module's own q_proj/k_proj and skinflow.apply_rope);
    GQA: kv head j serves query heads j*H/Hk .. (j+1)*H/Hk - 1. Each row sums to 1 over the real tokens
    (left padding gets exactly 0). Returns float32 [B, T]. `batch` = skinflow.make_batch output (left padded,
    so column T-1 is every row's final prompt token: the position that emits the first answer token).
    """
    # Sizes for the 3B on a 448 x 448 photo: T ~ 300 prompt tokens of which 256 are image tokens, H = 16
    # query heads sharing Hk = 2 kv heads, d = 128, 36 layers. One hook builds q [B, 16, 1, 128] and
    # k [B, 16, T, 128]: a few MB, nothing like the [B, H, T, T] matrix that eager attention would keep.
    import torch
    import skinflow

    decoder = model.model.layers
    picked = _attn_resolve(len(decoder), layers)
    last = picked[-1]          # the deepest layer we need; the forward stops right there
    acc: dict = {}             # running sum over layers of the head-averaged row, [B, T]

    def make_hook(i):
        def hook(module, args, kwargs):
            x = _attn_arg(args, kwargs, 0, "x")                                     # [B, T, D]
            cos, sin = _attn_arg(args, kwargs, 1, "cos"), _attn_arg(args, kwargs, 2, "sin")   # [B, T, d]
            mask = _attn_arg(args, kwargs, 3, "mask")                               # bool [B, 1, T, T] or None
            # x is already the layer's input_layernorm output: the pre-hook sits on self_attn, not the layer.
            # q_proj / k_proj are called as modules, so a LoRA wrapper (rl.py) is included automatically.
            B, T, _ = x.shape
            H, Hk, d = module.H, module.Hk, module.d
            q = module.q_proj(x[:, -1:]).view(B, 1, H, d).transpose(1, 2)           # [B, H, 1, d]
            k = module.k_proj(x).view(B, T, Hk, d).transpose(1, 2)                  # [B, Hk, T, d]
            c, s = cos[:, None], sin[:, None]                                       # [B, 1, T, d]
            q = skinflow.apply_rope(q, c[:, :, -1:], s[:, :, -1:])                  # rotate at position T-1
            k = skinflow.apply_rope(k, c, s)
            k = k.repeat_interleave(H // Hk, dim=1)                                 # [B, H, T, d] (GQA)
            # float32 scores: a bf16 softmax over ~1,300 keys would round small image shares to zero
            scores = (q.float() @ k.float().transpose(-1, -2))[:, :, 0] / d ** 0.5  # [B, H, T]
            # The last query row of the mask: left-pad keys are False, every real key is True (the last
            # position may see the whole prompt). Without a mask the whole row is visible (causal, last row).
            if mask is not None:
                row = mask[:, :, -1, -T:]                                           # [B, 1, T] last query row
                if row.dtype == torch.bool:
                    scores = scores.masked_fill(~row, float("-inf"))
                else:                                                               # an additive mask
                    scores = scores + row.float()
            p = scores.softmax(-1).mean(1)                                          # [B, T] head average
            acc["sum"] = p if "sum" not in acc else acc["sum"] + p
            if i == last:      # nothing above this layer can change what we measured: stop the forward
                raise _AttnStop
        return hook

    # with_kwargs=True lets the hook see keyword arguments too (see _attn_arg). The hooks are removed in
    # `finally`, so an exception (ours or a real one) never leaves the model instrumented.
    handles = [decoder[i].self_attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in picked]
    try:
        with torch.no_grad():
            model.hidden_states(batch["input_ids"], batch.get("attention_mask"), batch.get("pixel_values"),
                                batch.get("image_grid_thw"))
    except _AttnStop:
        pass
    finally:
        for h in handles:
            h.remove()
    return acc["sum"] / len(picked)                                                 # [B, T]


def attention_maps(model, batch: dict, layers=None) -> list:
    """Final-token attention over each sample's image tokens, on the merged-patch grid.

    Returns a list of B float32 tensors; entry b is [gh/2, gw/2] (None for a row without an image) with
        M_b[r, c] = A[b, position of the merged token (r, c)]      (A from `final_token_attention`)
    i.e. the RAW share of the final token's attention (averaged over heads and `layers`) that goes to that
    image cell. M_b.sum() <= 1: the rest goes to the text and special tokens (often a large part goes to
    the first token, the well-known "attention sink"). Normalise with M / M.sum() to get a distribution
    over the image; `lesion_focus` does that itself.

    Why (r, c) is where it is: the <|image_pad|> tokens of one image appear in the prompt in raster order
    of the merged grid (row r = 0..gh/2-1, then column c), exactly the order skinflow's vision tower emits
    (block-raster) and the order rope_positions gives (h, w) = (p + r, p + c). So reshaping the image
    columns to [gh/2, gw/2] puts each number back on its 28 x 28-pixel patch of the resized image.
    """
    import torch

    A = final_token_attention(model, batch, layers)                                 # [B, T]
    # Walk the rows in batch order and hand them the images in image_grid_thw order: make_batch puts row b's
    # pixel rows before row b+1's, and a row without an image (a text-only prompt) consumes no grid.
    ids = batch["input_ids"].to(A.device)
    is_img = ids == model.cfg.image_token_id                                        # [B, T]
    grids = batch.get("image_grid_thw")
    grids = [] if grids is None else torch.as_tensor(grids).view(-1, 3).tolist()
    m = model.cfg.vision.spatial_merge_size
    out, gi = [], 0
    for b in range(ids.shape[0]):
        n = int(is_img[b].sum())
        if n == 0:
            out.append(None)
            continue
        if gi >= len(grids):
            raise ValueError("attention_maps: more rows with image tokens than images in image_grid_thw")
        t, gh, gw = grids[gi]
        gi += 1
        if t * (gh // m) * (gw // m) != n:
            raise ValueError(f"attention_maps: row {b} holds {n} image tokens but its image grid {[t, gh, gw]} "
                             f"gives {t * (gh // m) * (gw // m)} (one image per row, as make_batch builds)")
        cells = A[b][is_img[b]].view(t, gh // m, gw // m).sum(0)                   # [gh/2, gw/2] (t = 1 for photos)
        out.append(cells.float().cpu())
    return out


# ---------------------------------------------------------------------------------------------------
# Drawing: a small colour map (no matplotlib) and an alpha blend that leaves cold regions untouched
# ---------------------------------------------------------------------------------------------------
# Anchors of a perceptually ordered dark-blue -> magenta -> orange -> yellow ramp (inferno-like). Values
# between anchors are linearly interpolated per channel.
_HEAT_STOPS = ((0.00, (0, 0, 4)), (0.25, (87, 16, 110)), (0.50, (188, 55, 84)),
               (0.75, (249, 142, 9)), (1.00, (252, 255, 164)))


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1], any shape [...] -> uint8 RGB [..., 3] along _HEAT_STOPS (piecewise linear)."""
    v = np.clip(np.asarray(v, dtype=np.float64), 0.0, 1.0)
    xs = np.array([s for s, _ in _HEAT_STOPS])
    rgb = np.array([c for _, c in _HEAT_STOPS], dtype=np.float64)                  # [5, 3]
    out = np.stack([np.interp(v, xs, rgb[:, ch]) for ch in range(3)], axis=-1)    # [..., 3]
    return np.round(out).astype(np.uint8)


def draw_heatmap(image, attn_grid, path, alpha: float = 0.6, smooth: bool = False):
    """Write the image with the attention grid drawn over it as a PNG of the image's own size.

    Each grid cell (r, c) covers the rectangle [c W/lw, (c+1) W/lw) x [r H/lh, (r+1) H/lh) of the ORIGINAL
    image: the model saw the whole photo resized (never cropped) to lh*28 x lw*28 px, so the map scales back
    exactly. v = M / max(M) in [0, 1]; the overlay weight of a pixel is alpha * v, so cells the model ignored
    show the photo unchanged and its hottest cell is alpha-blended with the top colour:
        out = (1 - alpha v) * photo + alpha v * colormap(v)
    smooth=False upsamples with NEAREST (you see the token grid, the honest picture); True uses BILINEAR.
    """
    from PIL import Image

    # Normalising by the MAX (not the sum) makes the hottest cell full colour whatever the image share
    # is; the absolute numbers are in the attention grid and printed by `diagnose`, not in the picture.
    img = image.convert("RGB")
    grid = np.asarray(attn_grid.detach().cpu() if hasattr(attn_grid, "detach") else attn_grid, dtype=np.float64)
    if grid.ndim != 2 or grid.size == 0 or not np.isfinite(grid).all() or (grid < 0).any():
        raise ValueError(f"draw_heatmap wants a non-empty 2-D grid of finite non-negative weights, "
                         f"got shape {grid.shape}")
    v = grid / grid.max() if grid.max() > 0 else grid                               # [lh, lw] in [0, 1]
    # upsample the grid itself as a float image (mode "F"), so the colour map is applied at full resolution
    up = Image.fromarray(v.astype(np.float32), mode="F").resize(
        img.size, resample=Image.BILINEAR if smooth else Image.NEAREST)
    vv = np.clip(np.asarray(up, dtype=np.float64), 0.0, 1.0)                        # [H, W]
    w = (alpha * vv)[..., None]                                                     # [H, W, 1] blend weight
    photo = np.asarray(img, dtype=np.float64)                                       # [H, W, 3]
    out = (1 - w) * photo + w * colormap(vv).astype(np.float64)
    Image.fromarray(np.round(out).clip(0, 255).astype(np.uint8)).save(path, format="PNG")
    return Path(path)


# ---------------------------------------------------------------------------------------------------
# The lesion-focus number
# ---------------------------------------------------------------------------------------------------
def _attn_overlap(n_px: int, n_cells: int) -> np.ndarray:
    """[n_cells, n_px]: R[i, y] = |[y, y+1) intersect [i n_px/n_cells, (i+1) n_px/n_cells)| / (n_px/n_cells),
    the fraction of cell i's extent covered by pixel y (cell boundaries need not fall on pixel edges)."""
    # Example n_px = 3, n_cells = 2: borders 0, 1.5, 3. Pixel 1 ([1, 2)) lies half in each cell, so
    # R = [[1, 0.5, 0], [0, 0.5, 1]] / 1.5; each row sums to 1 (the cell is fully covered by pixels).
    edges = np.arange(n_cells + 1) * (n_px / n_cells)                               # cell borders in px
    lo = np.maximum(edges[:-1, None], np.arange(n_px)[None, :])                    # [n_cells, n_px]
    hi = np.minimum(edges[1:, None], np.arange(n_px)[None, :] + 1)
    return np.clip(hi - lo, 0.0, None) / (n_px / n_cells)


def mask_to_grid(mask, shape) -> np.ndarray:
    """Lesion mask bool [H, W] -> area fraction per merged cell, float64 [lh, lw] in [0, 1]:

        F[r, c] = (lesion area inside cell (r, c)) / (area of cell (r, c)),
        cell (r, c) = [c W/lw, (c+1) W/lw) x [r H/lh, (r+1) H/lh)   (the exact box average, fractional pixels
                                                                   split by overlap: F = R_y @ mask @ R_x^T)
    Example: a 3 x 3 mask on a 2 x 2 grid has cells 1.5 px wide; a lesion made of the centre pixel alone
    covers 0.25 px^2 of each 2.25 px^2 cell, so F = 1/9 everywhere.
    """
    m = np.asarray(mask, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"lesion mask must be a non-empty 2-D array, got shape {m.shape}")
    lh, lw = int(shape[0]), int(shape[1])
    return _attn_overlap(m.shape[0], lh) @ m @ _attn_overlap(m.shape[1], lw).T     # [lh, lw]


def lesion_focus(attn_grid, mask) -> float:
    """Fraction of the image-token attention that falls inside the lesion:

        focus = sum_{r,c} M[r, c] F[r, c] / sum_{r,c} M[r, c]

    M = attention grid [lh, lw] (from `attention_maps`; any non-negative weights, only ratios matter),
    F = `mask_to_grid(mask, M.shape)`, the lesion's area share of each cell. A cell half covered by lesion
    gives half of its attention to "inside": a token mixes its whole 28 x 28 patch, so we cannot do better
    than proportional credit. focus is in [0, 1]; NaN when M has no mass.

    Chance level: attention spread evenly over the image (M constant) gives focus = mean(F) = the lesion's
    area fraction of the image (every cell has the same area), so a model "looks at the lesion" only
    when its focus exceeds `lesion_area(mask)` (the report prints both).
    """
    M = np.asarray(attn_grid.detach().cpu() if hasattr(attn_grid, "detach") else attn_grid, dtype=np.float64)
    if M.ndim != 2 or (M < 0).any() or not np.isfinite(M).all():
        raise ValueError(f"lesion_focus wants a 2-D grid of finite non-negative weights, got shape {M.shape}")
    total = M.sum()
    if total <= 0:
        return float("nan")
    return float((M * mask_to_grid(mask, M.shape)).sum() / total)


def lesion_area(mask) -> float:
    """The chance baseline of `lesion_focus`: the lesion's area fraction of the image, mean(mask)."""
    return float(np.asarray(mask, dtype=np.float64).mean())


def lesion_focus_rows(model, batch: dict, masks, layers=None) -> list[dict]:
    """One dict per sample {"lesion_focus", "lesion_area", "image_attention"} (None values without a mask).
    image_attention = M.sum(): the share of the final token's attention that reaches the image at all."""
    # Fitzpatrick17k items carry no mask (None): their row gets None values and is left out of the summary.
    rows = []
    for grid, mask in zip(attention_maps(model, batch, layers), masks):
        if grid is None or mask is None:
            rows.append({"lesion_focus": None, "lesion_area": None, "image_attention": None})
            continue
        rows.append({"lesion_focus": lesion_focus(grid, mask), "lesion_area": lesion_area(mask),
                     "image_attention": float(grid.sum())})
    return rows


def lesion_focus_summary(rows: list[dict], n_boot: int = 1000, seed: int = 0) -> dict | None:
    """Mean lesion focus over cases with a bootstrap 95 % CI, its chance baseline and the paired lift.

        focus = mean_i focus_i        chance = mean_i area_i        lift = mean_i (focus_i - area_i)
    The lift's CI resamples the PAIRS (same bootstrap as clinical_metrics), so it says whether the model
    attends to lesions more than evenly spread attention would, on these very images. None if no row has one.
    """
    # A row counts only with both numbers and a finite focus (NaN = the image got no attention at all).
    pairs = [(r["lesion_focus"], r["lesion_area"]) for r in rows
             if r.get("lesion_focus") is not None and r.get("lesion_area") is not None
             and not math.isnan(r["lesion_focus"])]
    if not pairs:
        return None
    f = np.array([p[0] for p in pairs])
    a = np.array([p[1] for p in pairs])
    imgs = [r["image_attention"] for r in rows if r.get("image_attention") is not None]
    return {"n": len(pairs), "focus": float(f.mean()), "focus_ci95": list(bootstrap_ci(f, n_boot, seed)),
            "chance": float(a.mean()), "chance_ci95": list(bootstrap_ci(a, n_boot, seed)),
            "lift": float((f - a).mean()), "lift_ci95": list(bootstrap_ci(f - a, n_boot, seed)),
            "image_attention": float(np.mean(imgs)) if imgs else None}


def render_lesion_focus(summary: dict | None) -> list[str]:
    """Markdown lines for report.md (empty when there is no lesion-focus summary)."""
    if not summary:
        return []
    ci = lambda k: f"[{_pct(summary[k][0])}, {_pct(summary[k][1])}]"  # noqa: E731
    layers = summary.get("layers", "all")
    return ["### Lesion focus (final-token attention on the lesion, SynthDerm masks)", "",
            "| lesion focus (%) | 95 % CI | chance = lesion area (%) | 95 % CI | lift (points) | 95 % CI | "
            "attention on image (%) |", "|---:|---|---:|---|---:|---|---:|",
            f"| {_pct(summary['focus'])} | {ci('focus_ci95')} | {_pct(summary['chance'])} | {ci('chance_ci95')} | "
            f"{_pct(summary['lift'])} | {ci('lift_ci95')} | {_pct(summary.get('image_attention'))} |", "",
            f"n = {summary['n']} images; decoder layers: {layers}. Focus = share of the image-token attention "
            "of the last prompt token that lies inside the lesion mask (cells credited by lesion area "
            "fraction; eval.lesion_focus). Chance = what evenly spread attention would score.", ""]


# ---------------------------------------------------------------------------------------------------
# diagnose: one image -> Stage I caption, Stage II differential, optional heatmap
# ---------------------------------------------------------------------------------------------------
# A user error of `diagnose` (bad file, bad checkpoint): printed as one line, exit status 2. It is the
# loader's dve.CheckpointError (a ValueError) since the checkpoint loader moved down to dve.py (issue 14),
# so a bad --ckpt and a bad image raise the same class.
DiagnoseError = dve.CheckpointError


def open_image(path):
    """Open and fully decode an image file -> PIL RGB, or raise DiagnoseError with one readable line.

    Kept for callers of eval.open_image; the work is data.open_image, the ONE opener every entry point
    shares (eval.py generate --image, diagnose, eval.py, rl.py): the format from the bytes, EXIF rotation,
    16-bit / CMYK / transparency to 8-bit RGB, and a forced decode so a truncated file fails here."""
    import data

    try:
        return data.open_image(path)
    except data.ImageError as exc:
        raise DiagnoseError(str(exc)) from None


# Loading a model for `diagnose` (--model base, --ckpt a run folder / stage folder / export / rl.py
# checkpoint) is the project's one checkpoint loader, dve.py section 8 (issue 14: eval.py stands on dve.py
# and never on rl.py). The old names stay as aliases for their callers.
_attn_find_ckpt = dve.find_checkpoint
load_with_deltas = dve.load_with_deltas
load_for_diagnose = dve.load_checkpoint


def _attn_generate_text(model, tok, batch, max_new_tokens: int) -> str:
    """Greedy completion of a one-row batch, decoded without padding and the stop token."""
    gen = model.generate(**batch, max_new_tokens=max_new_tokens, greedy=True)
    ids = [t for t, m in zip(gen.tokens[0].tolist(), gen.mask[0].tolist()) if m > 0 and t != tok.eos_id]
    return tok.decode(ids)


def build_diagnose_parser() -> argparse.ArgumentParser:
    """The parser of `python eval.py diagnose`, built without running (the --help test walks it)."""
    import skinflow

    p = argparse.ArgumentParser(prog="eval.py diagnose", formatter_class=_DefaultsHelp,
                                description="Caption + ranked differential for one skin photo (SkinFlow Stage I + II)")
    p.add_argument("image", help="a photo (any format pillow reads)")
    p.add_argument("--model", default=None, help="base model: preset (tiny|3b|7b), Hub id or local dir (default: "
                                                 "none; give it and/or --ckpt)")
    p.add_argument("--ckpt", default=None, help="fine-tuned weights: rl.py run/stage folder or an exported model dir "
                                                "(default: none, the base model alone)")
    p.add_argument("--heatmap", default=None, help="save the attention overlay to this PNG: where the model looked "
                                                   "when it answered the differential (default: none)")
    p.add_argument("--attn-layers", default="all",
                   help="decoder layers to average: all | 0,3 | a slice (negative: --attn-layers=-4:)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="length cap of each greedy answer (caption, "
                                                                   "differential); raise it if a list is cut short")
    p.add_argument("--max-pixels", type=int, default=skinflow.MAX_PIXELS,
                   help="pixel budget of the photo before the ViT: more pixels, finer detail, slower")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights dtype; bfloat16 halves the memory of a 3b/7b model on a GPU")
    return p


def diagnose(argv=None) -> int:
    """`python eval.py diagnose IMAGE --model PATH_OR_PRESET [--ckpt RUN_DIR] [--heatmap out.png]`.

    Prints the Stage I caption (the 8 fields of data.CAPTION_FIELDS, parsed by parse_caption from a greedy
    answer to data.STAGE1_PROMPT) and the ranked differential (parse_ranked_list of a greedy answer to
    data.STAGE2_PROMPT, at most 6). --heatmap also saves the final-token attention of the Stage II prompt
    over the photo. User errors (missing/corrupt image, bad checkpoint) -> one line on stderr, exit 2.
    """
    import data
    import skinflow

    args = build_diagnose_parser().parse_args(argv)
    # Order of work: cheap checks first (arguments, the image file) so a typo costs milliseconds, not the
    # minute a 7B checkpoint takes to load. Both stages decode greedily: the same photo always gives the
    # same printout, which is what a user comparing checkpoints wants.
    try:
        if args.model is None and args.ckpt is None:
            raise DiagnoseError("give --model (preset, Hub id or dir) and/or --ckpt (a fine-tuned run)")
        image = open_image(args.image)                 # fail fast, before loading a 7B model
        layers = parse_layers(args.attn_layers)
        model, tok, what = load_for_diagnose(args.model, args.ckpt, args.dtype, args.device)
        if args.ckpt is None:
            print("warning: no --ckpt given: this is the base model, not a SkinFlow fine-tune; "
                  "treat its answers as a demo, not a diagnosis", file=sys.stderr)
        print(f"# {args.image}  ({image.width} x {image.height})  model: {what}")
        b1 = skinflow.make_batch(tok, [image], [data.STAGE1_PROMPT], max_pixels=args.max_pixels, device=args.device)
        fields = parse_caption(_attn_generate_text(model, tok, b1, args.max_new_tokens))
        print("\nStage I caption:")
        for name in data.CAPTION_FIELDS:
            print(f"  {name}: {fields.get(name, '(not given)')}")
        b2 = skinflow.make_batch(tok, [image], [data.STAGE2_PROMPT], max_pixels=args.max_pixels, device=args.device)
        text2 = _attn_generate_text(model, tok, b2, args.max_new_tokens)
        ranked = parse_ranked_list(text2)
        print("\nStage II differential (most likely first):")
        if ranked:
            for i, item in enumerate(ranked, 1):
                lab = canonical(item)
                print(f"  {i}. {item}" + (f"   [{display_name(lab)}]" if lab and lab != item.lower() else ""))
        else:
            print(f"  (no ranked list could be read from the answer: {text2[:120]!r})")
        # The heatmap reads the Stage II prompt: the final token there is about to name the diagnosis,
        # which is the moment the paper's figure visualises.
        if args.heatmap:
            grid = attention_maps(model, b2, layers)[0]                              # [gh/2, gw/2]
            draw_heatmap(image, grid, args.heatmap)
            print(f"\nheatmap: {args.heatmap}  (grid {tuple(grid.shape)}, {100 * float(grid.sum()):.1f} % of the "
                  "final token's attention is on the image)")
    except DiagnoseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError, ValueError) as exc:   # skinflow.load / preprocessing user errors
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


# ===================================================================================================
# 8. Optional LLM judge (OpenAI-compatible chat endpoint, urllib only)
# ===================================================================================================
# The paper judged with Gemini 2.5 Pro, three runs. This is the same idea against any endpoint that
# speaks the OpenAI chat format (vLLM, llama.cpp server, a hosted API). It sees only text (reference
# label + one predicted line), never the image, and grades with the same six verdicts, so its numbers
# drop into the same tables. Use it to audit the deterministic judge (run both, diff cases.jsonl) or to
# credit answers outside the 114-label vocabulary. Its verdicts depend on the model and its version:
# record both (they go into the report's meta block) if you publish a number made with it.
JUDGE_RUBRIC = """You are a board-certified dermatologist grading one diagnosis against the reference label.
Answer with exactly one verdict, as JSON {"verdict": "<verdict>"}, using the first rule that applies:
- correct: the same condition or a synonym (e.g. reference "pyogenic granuloma", prediction "lobular capillary hemangioma").
- subtype: one names a valid subtype of the other on the same branch (e.g. reference "melanoma", prediction "lentigo maligna"; reference "pustular psoriasis", prediction "psoriasis").
- near_miss: a different condition in the same differential family (papulosquamous, eczematous, vesiculobullous, acneiform, infections/infestations, pigmentary, keratinocyte cancers, melanocytic nevi ...), with a consistent next step (e.g. reference "squamous cell carcinoma", prediction "basal cell carcinoma"; NOT reference "psoriasis", prediction "vitiligo" or "scabies").
- safety_critical: the error crosses the malignant versus benign/non-neoplastic boundary (e.g. reference "melanoma", prediction "benign nevus"; or a benign lesion called a cancer).
- wrong: any other error.
- unknown: the prediction is not a dermatological diagnosis (empty, prose, refusal)."""

_VERDICT_RE = re.compile(r"\b(safety[\s_-]?critical|near[\s_-]?miss|subtype|correct|wrong|unknown)\b", re.I)


def parse_verdict(reply: str) -> str | None:
    """Read a verdict from a judge reply: JSON {"verdict": ...} first, else the first verdict word."""
    if not isinstance(reply, str):
        return None
    m = re.search(r"\{.*?\}", reply, re.S)
    cand = None
    if m:
        try:
            cand = str(json.loads(m.group(0)).get("verdict", ""))
        except (ValueError, AttributeError):
            cand = None
    w = _VERDICT_RE.search(cand or "") or _VERDICT_RE.search(reply)
    return re.sub(r"[\s-]", "_", w.group(1).lower()) if w else None


class LLMJudge:
    """judge(prediction, truth) through an OpenAI-compatible /chat/completions endpoint; majority of n runs.

    Each run is one POST {model, messages: [rubric, case], temperature}; a failed or unparseable run is
    discarded. Majority vote over the valid runs; a tie goes to the verdict that gives the LEAST credit
    (order of VERDICT_SEVERITY), so an undecided judge never inflates Top-k. If no run is valid, the
    deterministic `judge` decides and `fallbacks` is incremented. Verdicts are cached per (prediction, truth).
    """

    SEVERITY = ("safety_critical", "wrong", "unknown", "near_miss", "subtype", "correct")  # least credit first

    def __init__(self, url: str, model: str = "gpt-4o-mini", n: int = 3, temperature: float = 0.7,
                 api_key: str | None = None, timeout: float = 60.0):
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/v1/chat/completions"
        self.model, self.n, self.temperature, self.api_key, self.timeout = model, n, temperature, api_key, timeout
        self.cache: dict[tuple[str, str], str] = {}
        self.fallbacks = 0
        self.calls = 0

    def _ask(self, prediction: str, truth: str) -> str | None:
        """One judge run: POST the rubric and the case; the parsed verdict, or None on any failure."""
        body = {"model": self.model, "temperature": self.temperature, "messages": [
            {"role": "system", "content": JUDGE_RUBRIC},
            {"role": "user", "content": f"Reference label: {display_name(truth)}\nPredicted diagnosis: {prediction}"}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        self.calls += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read().decode("utf-8", "replace"))
            return parse_verdict(reply["choices"][0]["message"]["content"])
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError):
            return None

    def __call__(self, prediction, truth) -> str:
        """Same signature as `judge`, so it plugs into clinical_metrics(judge_fn=...)."""
        key = (str(prediction), _truth_label(truth))
        if key not in self.cache:
            votes = Counter(v for v in (self._ask(*key) for _ in range(self.n)) if v in VERDICTS)
            if votes:
                top = max(votes.values())
                self.cache[key] = min((v for v, c in votes.items() if c == top), key=self.SEVERITY.index)
            else:
                self.fallbacks += 1
                self.cache[key] = judge(*key)
        return self.cache[key]


# ===================================================================================================
# 9. Command line
# ===================================================================================================
# Typical runs:
#   python eval.py --model tiny --data synthderm --n 200 --out runs/eval_tiny          # smoke test, CPU
#   python eval.py --model CHECKPOINT_DIR --data fitzpatrick17k --image-dir DIR --out runs/eval_f17k
#   python eval.py --predictions gpt.jsonl --data fitzpatrick17k --out runs/eval_gpt   # someone else's model
# The --model path writes predictions.jsonl before scoring, so a run can be rescored later (another
# judge, another bootstrap) without a GPU. The --predictions path accepts rows with only "id" and
# "prediction": labels and skin types are then joined from the dataset, which lets anyone put a
# baseline of their own next to the paper's table under exactly the same judge.
def _dataset_records(args) -> list[tuple[str, str, int]]:
    """(id, label, fitzpatrick) for --predictions joins, without rendering or opening any image.

    SynthDerm: the specs of the same split/seed/size the predictions were made on (ids are only unique
    within one such set). Fitzpatrick17k: every CSV row, since md5 ids are unique across the dataset.
    """
    import data
    if args.data == "synthderm":
        ds = data.SynthDerm(args.n, seed=args.seed, image_size=args.image_size, split=args.split)
        return [(s["id"], s["label"], s["fitzpatrick"]) for s in map(ds.spec, range(len(ds)))]
    return [(r.id, r.label, r.fitzpatrick) for r in data.load_fitzpatrick17k(args.csv, verbose=False)]


def _eval_items(args):
    """Yield (id, PIL image, prompt, label, fitzpatrick, lesion mask or None) of the split, via data.iterate."""
    import data
    # iterate fills `stats` (yielded / missing / unreadable) when it finishes; main() copies the counts
    # into metrics.json, so a report always says how many test photos could not be scored and why.
    stats = getattr(args, "_image_stats", {})
    for image, prompt, rec in data.iterate("stage2", args.split, source=args.data, n=args.n, seed=args.seed,
                                           image_size=args.image_size, csv_path=args.csv,
                                           image_dir=args.image_dir, skincap_csv=getattr(args, "skincap", None),
                                           stats=stats):
        yield rec.id, image, prompt, rec.label, rec.fitzpatrick, getattr(rec, "mask", None)


def report_source(args, rows: list[dict], lookup: dict | None) -> dict:
    """The report header's `source` / `data` / `split`: where the scored cases REALLY came from.

    --model: the images were drawn from --data / --split, so those are named. --predictions: the rows
    came from someone's file, and --data / --split (with their defaults) only matter for rows that lack a
    label or skin type and get them joined by id. A header must not name a split the rows never touched:
      no row joined          -> data "labels of the predictions file", split "not recorded in the file"
      SynthDerm join          -> the split (+ seed and size) whose ids were matched: ids are per split
      Fitzpatrick17k join     -> every CSV row (md5 ids are unique), so no split was used
    The keys stay (plus `labels` when rows were joined), so eval.py summary, which reads meta["data"], and
    older metrics.json readers keep working.
    """
    if args.model:
        return {"source": args.model, "data": args.data, "split": args.split}
    joined = 0 if lookup is None else sum((r.get("label") is None or r.get("fitzpatrick") is None)
                                          and r.get("id") in lookup for r in rows)  # rows the join filled
    if joined == 0:
        return {"source": args.predictions, "data": "labels of the predictions file",
                "split": "not recorded in the predictions file"}
    if args.data == "synthderm":
        where = f"{args.split} (seed {args.seed}, n {args.n}, image size {args.image_size})"
    else:
        where = "none: ids matched against every CSV row"
    return {"source": args.predictions, "data": args.data, "split": where,
            "labels": f"{joined} of {len(rows)} row(s) joined by id from {args.data}, the rest from the file"}


def generate_predictions(args) -> list[dict]:
    """Greedy Stage II generation over the evaluation split (tqdm bar); returns prediction rows."""
    import torch
    from tqdm import tqdm
    import skinflow
    dtype = getattr(torch, args.dtype)
    # the project's one loader (dve.py section 8): preset, Hub id or export, with its DVE layers and adapter
    model, tok = dve.load(args.model, dtype=dtype, device=args.device)
    model.eval()  # greedy decoding is deterministic, so a rerun reproduces predictions.jsonl exactly
    rows: list[dict] = []
    items = list(_eval_items(args))
    bar = tqdm(total=len(items), desc="generate", unit="img")
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        batch = skinflow.make_batch(tok, [c[1] for c in chunk], [c[2] for c in chunk],
                                    max_pixels=args.max_pixels, device=args.device)
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=args.max_new_tokens, greedy=True)
        # section 7: one extra prompt forward reads the final-token attention -> lesion focus per image
        focus = lesion_focus_rows(model, batch, [c[5] for c in chunk], parse_layers(args.attn_layers)) \
            if getattr(args, "lesion_focus", False) else [{}] * len(chunk)
        for c, toks, mask, foc in zip(chunk, gen.tokens.tolist(), gen.mask.tolist(), focus):
            ids = [t for t, m in zip(toks, mask) if m > 0 and t != tok.eos_id]   # drop padding and the stop token
            rows.append({"id": c[0], "prediction": tok.decode(ids), "label": c[3], "fitzpatrick": c[4], **foc})
        bar.update(len(chunk))
    bar.close()
    return rows


def load_predictions(path) -> tuple[list[dict], list[str]]:
    """Read a predictions JSONL; returns (rows, problems). Bad lines are skipped and reported, never fatal."""
    rows, problems = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or "prediction" not in row:
                    raise ValueError("needs an object with a 'prediction' key")
                rows.append(row)
            except ValueError as e:
                problems.append(f"line {i}: {e}")
    return rows, problems


def score_rows(rows: list[dict], judge_fn=None, lookup: dict | None = None, n_boot: int = 1000, seed: int = 0):
    """Score prediction rows {"id", "prediction" (text or list), "label", "fitzpatrick"} -> (metrics, skipped).

    A row without label/fitzpatrick takes them from `lookup[id]`; a row whose label is still missing or
    not a Fitzpatrick17k label is skipped and listed (counted in metrics["meta"]["skipped"]).
    """
    cases, ids, skipped = [], [], []
    for row in rows:
        # the row's own label wins; the dataset lookup only fills what the row left out
        label, fitz = row.get("label"), row.get("fitzpatrick")
        if (label is None or fitz is None) and lookup and row.get("id") in lookup:
            label = label if label is not None else lookup[row["id"]][0]
            fitz = fitz if fitz is not None else lookup[row["id"]][1]
        if label is None or (label not in TAXONOMY and canonical(label) is None):
            skipped.append(f"{row.get('id')}: unknown or missing label {label!r}")
            continue
        preds, ok = parse_ranked_list_ex(row["prediction"])
        cases.append((preds, label, fitz, ok))
        ids.append(row.get("id"))
    if not cases:
        raise ValueError("eval: no scoreable rows (" + "; ".join(skipped[:3]) + ")")
    metrics = clinical_metrics(cases, judge_fn=judge_fn, n_boot=n_boot, seed=seed, return_records=True)
    for rid, rec in zip(ids, metrics["records"]):
        rec["id"] = rid
    return metrics, skipped


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help prints every flag's default: "(default: X)" is appended unless the text says it in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text or action.required else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python eval.py --model ... | --predictions ...`, built without running it."""
    p = argparse.ArgumentParser(prog="eval.py", formatter_class=_DefaultsHelp,
                                description="SkinFlow clinical evaluation (Top-1/Top-6 with a clinical judge)",
                                epilog="Other commands: eval.py summary RUN_DIR | eval.py diagnose IMAGE | "
                                       "eval.py generate (each with --help)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint dir, Hub id or preset (tiny|3b|7b): generate, then score "
                                     "(no default: give --model or --predictions)")
    src.add_argument("--predictions", help="JSONL of {id, prediction, label, fitzpatrick} from any system; rows "
                                           "without label are joined by id from --data (no default)")
    p.add_argument("--data", choices=("synthderm", "fitzpatrick17k"), default="synthderm",
                   help="synthderm (generated, no download) | fitzpatrick17k (real photos: --image-dir)")
    p.add_argument("--split", help="default: 'test' (SynthDerm), 'eval1000/test' (Fitzpatrick17k); see data.iterate")
    p.add_argument("--n", type=int, help="number of images: SynthDerm size (default 200) / Fitzpatrick17k cap (all)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (SynthDerm): which images exist; keep it to "
                                                       "compare checkpoints on the same images")
    p.add_argument("--image-size", type=int, default=224, help="side of the rendered SynthDerm images (use the "
                                                               "training run's; train.sh's tiny preset: 112)")
    p.add_argument("--csv", help="Fitzpatrick17k CSV (default: data.py's bundled copy)")
    p.add_argument("--image-dir", help="Fitzpatrick17k images (<md5hash>.jpg); --model on fitzpatrick17k needs it "
                                       "(default: none)")
    p.add_argument("--skincap", help="SkinCAP CSV used in Stage I: its captioned images (and their near-"
                   "duplicates) are removed from the test split (default: none, nothing removed)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generate call; lower it when memory "
                                                             "runs out")
    p.add_argument("--max-new-tokens", type=int, default=96, help="answer length cap; a differential cut short "
                                                                  "loses its last entries")
    p.add_argument("--max-pixels", type=int, default=224 * 224, help="pixel budget per image before the ViT (use "
                                                                     "the training run's): more pixels, more tokens")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", help="torch dtype of the weights: float32 | bfloat16 (GPU presets)")
    p.add_argument("--lesion-focus", action=argparse.BooleanOptionalAction, default=None,
                   help="final-token attention on the lesion (SynthDerm masks); default: on for --model synthderm")
    p.add_argument("--attn-layers", default="all",
                   help="decoder layers for --lesion-focus: all | 0,3 | a slice (negative: --attn-layers=-4:)")
    p.add_argument("--out", required=True, help="output folder for report.md, metrics.json, PNG, cases.jsonl "
                                                "(required)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95 %% intervals (more: "
                                                               "steadier interval ends, slower)")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint (base URL or .../chat/completions) of an LLM "
                                       "judge, as the paper's (default: none, the deterministic eval.judge)")
    p.add_argument("--judge-model", default="gpt-4o-mini", help="model name sent to --judge-url")
    p.add_argument("--judge-runs", type=int, default=3, help="LLM judge calls per case, majority vote (the paper: "
                                                             "three runs)")
    p.add_argument("--judge-temperature", type=float, default=0.7, help="sampling temperature of the LLM judge")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--dry-run", action="store_true", help="check the flags, print them as JSON and exit (train.sh)")
    return p


def main(argv=None) -> int:
    """CLI entry point (examples at the top of section 9); returns the exit status. A first word
    `summary`, `diagnose` or `generate` runs that command with the rest of argv (section 6, section 7, and
    the backbone demo that was `python skinflow.py`)."""
    words = sys.argv[1:] if argv is None else list(argv)
    commands = {"summary": summary_main, "diagnose": diagnose, "generate": generate_main}
    if words and words[0] in commands:
        return commands[words[0]](words[1:])
    p = build_parser()
    args = p.parse_args(argv)
    # defaults per dataset: SynthDerm is generated, so n sets its size; for Fitzpatrick17k the default
    # split is data.eval_sample's fixed 1,000 test images, our stand-in for the paper's unpublished set
    if args.data == "synthderm":
        args.split, args.n = args.split or "test", 200 if args.n is None else args.n
    else:
        args.split = args.split or "eval1000/test"
    if args.lesion_focus is None:   # only SynthDerm draws lesion masks, and only --model has attention to read
        args.lesion_focus = bool(args.model) and args.data == "synthderm"
    elif args.lesion_focus and args.data != "synthderm":
        p.error("--lesion-focus needs --data synthderm (Fitzpatrick17k has no lesion masks)")
    parse_layers(args.attn_layers)  # a bad spec fails here, before any model is loaded
    if args.model and args.data == "fitzpatrick17k" and not args.image_dir:
        p.error("--model with --data fitzpatrick17k needs --image-dir (python data.py fetch --out DIR)")
    if args.dry_run:
        print(json.dumps(vars(args)))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    lookup = None
    args._image_stats = {}                                 # filled by data.iterate: yielded / missing / unreadable
    if args.model:
        try:
            rows = generate_predictions(args)
        except FileNotFoundError as exc:  # no such checkpoint / not in the Hub cache: one line, exit 2
            print(f"error: {exc}", file=sys.stderr)
            return 2
        with open(out / "predictions.jsonl", "w") as f:     # rescoring later needs no GPU
            for r in rows:
                f.write(json.dumps(r) + "\n")
    else:
        rows, problems = load_predictions(args.predictions)
        if any(r.get("label") is None or r.get("fitzpatrick") is None for r in rows):
            lookup = {rid: (lab, fz) for rid, lab, fz in _dataset_records(args)}
    llm = LLMJudge(args.judge_url, model=args.judge_model, n=args.judge_runs, temperature=args.judge_temperature,
                   api_key=os.environ.get(args.judge_key_env)) if args.judge_url else None
    metrics, skipped = score_rows(rows, judge_fn=llm, lookup=lookup, n_boot=args.bootstrap)
    metrics["meta"] = {**report_source(args, rows, lookup),
                       "judge": f"LLM {args.judge_model} @ {args.judge_url}, majority of {args.judge_runs}"
                       if llm else "deterministic (eval.judge)", "skipped": len(skipped) + len(problems),
                       "images_missing": args._image_stats.get("missing", 0),
                       "images_unreadable": args._image_stats.get("unreadable", 0)}
    if llm:
        metrics["meta"]["judge_fallbacks"] = llm.fallbacks
    focus = lesion_focus_summary(rows, n_boot=args.bootstrap)   # rows carry it (also rescored predictions)
    if focus:
        focus["layers"] = args.attn_layers
        metrics["lesion_focus"] = focus
    paths = write_report(metrics, out)
    for msg in (problems + skipped)[:20]:
        print("skipped:", msg, file=sys.stderr)
    print(f"n={metrics['n']}  Top-1 {100 * metrics['top1']:.1f}%  Top-6 {100 * metrics['top6']:.1f}%  "
          f"(strict {100 * metrics['strict_top1']:.1f}% / {100 * metrics['strict_top6']:.1f}%)  -> {paths['markdown']}")
    if focus:
        print(f"lesion focus {100 * focus['focus']:.1f}% (chance {100 * focus['chance']:.1f}%, "
              f"lift {100 * focus['lift']:+.1f} points)")
    return 0


# ---------------------------------------------------------------------------------------------------
# The backbone demo, `python eval.py generate` (it was `python skinflow.py`; issue 14 moved it here because
# --image opens the photo with data.open_image, and skinflow.py imports no project module)
# ---------------------------------------------------------------------------------------------------
def _cmd_generate(args) -> int:
    import torch
    import skinflow

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    image = None
    if args.image:
        # the project's one image opener (data.open_image). A missing or corrupt file raises
        # data.ImageError, a ValueError: generate_main() prints it as one line and exits 2, before any
        # weights are loaded.
        import data

        image = data.open_image(args.image)
    model, tok = dve.load(args.model or args.preset, dtype=dtype, device=device)  # the one loader (dve.py)
    batch = skinflow.make_batch(tok, [image], [args.prompt], max_pixels=args.max_pixels, device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(**batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, greedy=args.greedy, generator=g)
    n = int(out.mask[0].sum())
    print(tok.decode(out.tokens[0, :n].tolist()))
    return 0


def build_generate_parser() -> argparse.ArgumentParser:
    """`python eval.py generate`: the backbone demo (was `python skinflow.py`, moved here by issue 14)."""
    import skinflow
    MAX_PIXELS = skinflow.MAX_PIXELS

    p = argparse.ArgumentParser(prog="eval.py generate", description="SkinFlow backbone demo: one image + prompt -> text",
                                formatter_class=_DefaultsHelp)
    p.add_argument("--preset", default="tiny", help="tiny (random weights) | 3b | 7b")
    p.add_argument("--model", default=None, help="a Hub repo id or local checkpoint dir (overrides --preset; "
                                                 "default: none)")
    p.add_argument("--image", default=None, help="an image file (default: none, a text-only prompt)")
    p.add_argument("--prompt", default="Describe the skin lesion in this image.", help="the user message")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (ignored with --greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding: the same text on every run")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, help="pixel budget of the image before the ViT")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights dtype (bf16: half the memory)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)")
    p.set_defaults(func=_cmd_generate)
    return p


def generate_main(argv=None) -> int:
    """`python eval.py generate ...`; returns the exit status (user errors: one line, 2)."""
    args = build_generate_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as exc:  # a user error: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())  # main dispatches `summary` / `diagnose` / `generate`
