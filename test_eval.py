"""Tests of eval.py, the clinical evaluation protocol.

Every expected value below is written from the rules in eval.py's docstrings and comments, by hand,
not copied from the code's output. Property tests (hypothesis) check the parsers on random text.
"""
import http.server
import json
import threading

import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

import data
import eval as sf_eval

# ---------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------
EVAL_CANONICAL_CASES = [
    ("BCC", "basal cell carcinoma"),                       # abbreviation
    ("Probable SCC.", "squamous cell carcinoma"),          # hedge word + punctuation
    ("seb. keratoses", None),                              # "seb" alone is no word of the vocabulary
    ("Seborrhoeic keratoses", "seborrheic keratosis"),     # British spelling + plural
    ("Granuloma Pyogenic", "granuloma pyogenic"),          # each near-duplicate label maps to itself
    ("pyogenic granuloma", "pyogenic granuloma"),
    ("Kaposi's sarcoma", "kaposi sarcoma"),                # possessive
    ("KS", "kaposi sarcoma"),
    ("naevi", "nevocytic nevus"),                          # British plural of nevus -> the generic mole label
    ("Darier's disease", "dariers disease"),
    ("Hailey-Hailey disease", "hailey hailey disease"),    # hyphen
    ("Superficial spreading melanoma (SSM)", "superficial spreading melanoma ssm"),
    ("lentigo maligna melanoma", "lentigo maligna"),
    ("malignant melanoma", "malignant melanoma"),
    ("morpheaform BCC", "basal cell carcinoma morpheiform"),
    ("erythema annulare centrifugum", "erythema annulare centrifigum"),   # corrected spelling -> CSV typo
    ("confluent and reticulated papillomatosis", "papilomatosis confluentes and reticulate"),
    ("herpes gestationis", "acquired autoimmune bullous diseaseherpes gestationis"),
    ("pompholyx", "dyshidrotic eczema"),
    ("keratoacanthoma", "squamous cell carcinoma"),        # folded into SCC by the atlas mapping
    ("pyoderma gangrenosum", "neutrophilic dermatoses"),
    ("chronic plaque psoriasis of the elbows", "psoriasis"),  # phrase containment
    ("pustular psoriasis of the palms", "pustular psoriasis"),  # the longer phrase wins over "psoriasis"
    ("psoriasis vs eczema", None),                         # two diagnoses in one entry: ambiguous
    ("not melanoma", None),                                # negation
    ("psoraisis", "psoriasis"),                            # typo, fuzzy
    ("tinea corporis", None),                              # out of vocabulary
    ("lentigo", None),                                     # a solar lentigo is NOT lentigo maligna
    ("", None),
    ("!!!", None),
]


@pytest.mark.parametrize("text,label", EVAL_CANONICAL_CASES)
def test_eval_canonical_hand_cases(text, label):
    assert sf_eval.canonical(text) == label


def test_eval_every_label_and_alias_resolves():
    assert len(data.TAXONOMY) == 114
    for label in data.TAXONOMY:
        assert sf_eval.canonical(label) == label, label
        assert sf_eval.canonical(label.upper() + ".") == label, label
    for label, aliases in sf_eval.ALIASES.items():
        assert label in data.TAXONOMY, label
        for alias in aliases:
            # an alias resolves to its label or to a synonym of it (near-duplicate labels)
            assert sf_eval._CONCEPT[sf_eval.canonical(alias)] == sf_eval._CONCEPT[label], (alias, label)
    assert sf_eval.canonical(None) is None and sf_eval.canonical(42) is None


def test_eval_hierarchy_tables_are_consistent():
    for group in sf_eval.SYNONYMS:
        assert len({data.TAXONOMY[m] for m in group}) == 1, group       # synonyms share both partitions
    for parent, children in sf_eval.SUBTYPES.items():
        for child in children:
            assert data.TAXONOMY[child][0] == data.TAXONOMY[parent][0], (parent, child)


# ---------------------------------------------------------------------------------------------------
# Judge: every verdict, written from the rules
# ---------------------------------------------------------------------------------------------------
EVAL_JUDGE_CASES = [
    # correct: same label, synonym, near-duplicate label, abbreviation
    ("psoriasis", "psoriasis", "correct"),
    ("Pyogenic granuloma", "granuloma pyogenic", "correct"),
    ("malignant melanoma", "melanoma", "correct"),
    ("acne", "acne vulgaris", "correct"),
    ("lichen simplex chronicus", "neurodermatitis", "correct"),
    ("KS", "kaposi sarcoma", "correct"),
    ("mole", "nevocytic nevus", "correct"),
    # subtype: either direction along SUBTYPES, through synonyms too
    ("lentigo maligna", "melanoma", "subtype"),
    ("superficial spreading melanoma", "malignant melanoma", "subtype"),   # via melanoma == malignant melanoma
    ("psoriasis", "pustular psoriasis", "subtype"),                        # the more general name
    ("dyshidrotic eczema", "eczema", "subtype"),
    ("halo nevus", "nevocytic nevus", "subtype"),
    ("BCC", "solid cystic basal cell carcinoma", "subtype"),
    # near_miss: same nine-partition group, not subtype-linked
    ("lentigo maligna", "superficial spreading melanoma ssm", "near_miss"),   # siblings
    ("basal cell carcinoma", "squamous cell carcinoma", "near_miss"),
    ("eczema", "psoriasis", "near_miss"),                                     # both 'inflammatory'
    ("congenital nevus", "halo nevus", "near_miss"),
    ("porokeratosis of mibelli", "porokeratosis actinic", "near_miss"),
    # safety_critical: crosses malignant <-> benign / non-neoplastic, both directions
    ("nevus", "melanoma", "safety_critical"),
    ("seborrheic keratosis", "actinic keratosis", "safety_critical"),       # AK is malignant in Fitzpatrick17k
    ("melanoma", "seborrheic keratosis", "safety_critical"),                # false alarm
    ("eczema", "mycosis fungoides", "safety_critical"),                     # non-neoplastic called for a lymphoma
    ("squamous cell carcinoma", "psoriasis", "safety_critical"),
    # wrong: different group, same side of the malignant boundary
    ("vitiligo", "neurofibromatosis", "wrong"),          # inflammatory vs genodermatoses (both non-neoplastic)
    ("melanoma", "basal cell carcinoma", "wrong"),       # both malignant, different group
    ("dermatofibroma", "psoriasis", "wrong"),            # benign vs non-neoplastic
    ("kaposi sarcoma", "mycosis fungoides", "wrong"),
    # unknown: not in the vocabulary
    ("tinea corporis", "psoriasis", "unknown"),
    ("", "melanoma", "unknown"),
    ("I cannot tell from this image", "melanoma", "unknown"),
    (None, "melanoma", "unknown"),
]


@pytest.mark.parametrize("pred,truth,verdict", EVAL_JUDGE_CASES)
def test_eval_judge_hand_cases(pred, truth, verdict):
    assert sf_eval.judge(pred, truth) == verdict


def test_eval_judge_bad_truth_is_a_clear_error():
    with pytest.raises(ValueError, match="truth label"):
        sf_eval.judge("psoriasis", "tinea corporis")
    assert sf_eval.judge("psoriasis", "Psoriasis.") == "correct"     # a truth given as an alias is accepted


# ---------------------------------------------------------------------------------------------------
# Metrics: hand-computed
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def eval_cases():
    """Six cases with every quantity computed by hand (comments give the per-case verdicts)."""
    return [
        # 1 truth melanoma, type II: rank1 nevus (safety_critical), rank2 melanoma (correct) -> hit at 2
        (["nevus", "melanoma"], "melanoma", 2),
        # 2 truth pustular psoriasis, type V: rank1 psoriasis (subtype) -> hit at 1; strict miss
        (["psoriasis", "eczema"], "pustular psoriasis", 5),
        # 3 truth eczema, type II: empty list -> format failure, no hit
        ([], "eczema", 2),
        # 4 truth SCC, type IV: rank1 BCC (near_miss), nothing else -> no hit
        (["bcc"], "squamous cell carcinoma", 4),
        # 5 truth granuloma pyogenic, type V: rank1 "pyogenic granuloma" correct (synonym), strict miss
        #   (the exact label "granuloma pyogenic" is never named)
        (["pyogenic granuloma"], "granuloma pyogenic", 5),
        # 6 truth psoriasis, unknown type: unknown, unknown, ..., psoriasis at rank 3 (after dedupe)
        (["tinea", "tinea", "ringworm", "psoriasis"], "psoriasis", -1),
    ]


def test_eval_metrics_hand_computed(eval_cases):
    m = sf_eval.clinical_metrics(eval_cases, n_boot=200)
    assert m["n"] == 6
    # hits at ranks: 2, 1, -, -, 1, 3  (case 6: "tinea" twice counts once, so psoriasis is 3rd)
    assert m["top1"] == pytest.approx(2 / 6)
    assert m["top6"] == pytest.approx(4 / 6)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 0 + 0 + 1 + 1 / 3) / 6)
    # strict: exact label at rank 1: none; anywhere: case 1 (melanoma) and case 6 (psoriasis)
    assert m["strict_top1"] == 0.0
    assert m["strict_top6"] == pytest.approx(2 / 6)
    assert m["near_miss_rate"] == pytest.approx(1 / 6)          # case 4
    assert m["safety_critical_rate"] == pytest.approx(1 / 6)    # case 1
    assert m["format_failure_rate"] == pytest.approx(1 / 6)     # case 3
    # nine-group at rank 1: cases 2, 4 (same group), 5 -> 3/6; three-group: same three
    assert m["nine_top1"] == pytest.approx(3 / 6)
    assert m["three_top1"] == pytest.approx(3 / 6)
    assert m["rank1_verdicts"] == {"correct": 1, "subtype": 1, "near_miss": 1, "safety_critical": 1,
                                   "wrong": 0, "unknown": 1, "empty": 1}
    # breakdowns
    assert set(m["by_fitzpatrick"]) == {"II", "IV", "V", "unknown"}
    assert m["by_fitzpatrick"]["II"]["n"] == 2 and m["by_fitzpatrick"]["II"]["top6"] == pytest.approx(1 / 2)
    assert m["by_fitzpatrick"]["V"]["top1"] == 1.0
    assert m["by_fitzpatrick"]["IV"]["top6"] == 0.0
    assert m["by_three"]["malignant"]["n"] == 2 and m["by_three"]["malignant"]["top6"] == pytest.approx(1 / 2)
    assert m["by_three"]["benign"]["top1"] == 1.0
    assert m["by_three"]["non-neoplastic"]["n"] == 3
    assert m["by_three"]["non-neoplastic"]["mrr"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    for key in sf_eval.METRICS:
        lo, hi = m["ci95"][key]
        assert 0.0 <= lo <= m[key] <= hi <= 1.0, key


def test_eval_metrics_ties_duplicates_and_cutoff():
    # tie: two credited entries (synonyms) -> the first one sets the rank
    m = sf_eval.clinical_metrics([(["malignant melanoma", "melanoma"], "melanoma", 1)], n_boot=10)
    assert m["mrr"] == 1.0 and m["top1"] == 1.0 and m["strict_top1"] == 0.0 and m["strict_top6"] == 1.0
    # duplicates ("mole" == "nevus") use no slot: melanoma is the 2nd distinct entry
    m = sf_eval.clinical_metrics([(["nevus", "mole", "nevus", "melanoma"], "melanoma", 3)], n_boot=10)
    assert m["mrr"] == 0.5 and m["top6"] == 1.0 and m["top1"] == 0.0
    # only six distinct entries count: the 7th is ignored
    seven = ["vitiligo", "eczema", "acne", "rosacea", "urticaria", "scabies", "psoriasis"]
    m = sf_eval.clinical_metrics([(seven, "psoriasis", 3)], n_boot=10)
    assert m["top6"] == 0.0 and m["mrr"] == 0.0
    m = sf_eval.clinical_metrics([(seven[1:], "psoriasis", 3)], n_boot=10)
    assert m["top6"] == 1.0 and m["mrr"] == pytest.approx(1 / 6)


def test_eval_metrics_format_flag_and_raw_text():
    # a raw comma list is parsed but is a format failure; an explicit flag overrides for non-empty lists
    m = sf_eval.clinical_metrics([("psoriasis, eczema", "psoriasis", 2), ("1. psoriasis", "psoriasis", 2),
                            (["psoriasis"], "psoriasis", 2, False), ([], "psoriasis", 2, True)], n_boot=10)
    assert m["top1"] == pytest.approx(3 / 4)
    assert m["format_failure_rate"] == pytest.approx(3 / 4)    # comma list, flag False, empty list
    with pytest.raises(ValueError):
        sf_eval.clinical_metrics([])


def test_eval_bootstrap_matches_binomial_normal_approximation():
    # Oracle: the bootstrap mean of n Bernoulli(p) draws has sd sqrt(p (1 - p) / n); n=400, p=0.25 -> 0.02165
    values = [1.0] * 100 + [0.0] * 300
    lo, hi = sf_eval.bootstrap_ci(values, n_boot=2000, seed=1)
    assert lo == pytest.approx(0.25 - 1.96 * 0.02165, abs=0.008)
    assert hi == pytest.approx(0.25 + 1.96 * 0.02165, abs=0.008)
    assert sf_eval.bootstrap_ci(values, seed=3) == sf_eval.bootstrap_ci(values, seed=3)        # fixed seed, same CI
    assert sf_eval.bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_eval_fitzpatrick_buckets():
    assert [sf_eval._fitz_bucket(x) for x in (1, "4", "VI", -1, None, 7, "x")] == \
        ["I", "IV", "VI", "unknown", "unknown", "unknown", "unknown"]


# ---------------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------------
EVAL_PARSE_CASES = [
    ("1. psoriasis\n2. eczema", ["psoriasis", "eczema"], True),
    ("Most likely:\n1. **Psoriasis** (70%)\n2) Eczema - itchy\n3. psoriasis", ["psoriasis", "eczema"], True),
    ("<think>1. wrong</think><answer>1. melanoma 2. nevus 3. SK</answer>", ["melanoma", "nevus", "sk"], True),
    ("Differential: 1. psoriasis 2. eczema", ["psoriasis", "eczema"], True),
    ("- vitiligo\n- tinea versicolor\n* pityriasis alba", ["vitiligo", "tinea versicolor", "pityriasis alba"], True),
    ("Psoriasis, eczema or lichen planus.", ["psoriasis", "eczema", "lichen planus"], False),
    ("1. a\n2. b\n3. c\n4. d\n5. e\n6. f\n7. g", ["a", "b", "c", "d", "e", "f"], True),
    ("1. basal cell carc", ["basal cell carc"], True),       # truncated output: partial entry kept
    ("1. Dx: melanoma\n2. nevus: benign", ["melanoma", "nevus"], True),
    ("", [], False),
    ("The image shows a reddish lesion on the forearm with some scale and it is hard to say anything", [], False),
]


@pytest.mark.parametrize("text,items,ok", EVAL_PARSE_CASES)
def test_eval_parse_ranked_list_hand_cases(text, items, ok):
    assert sf_eval.parse_ranked_list_ex(text) == (items, ok)
    assert sf_eval.parse_ranked_list(text) == items


def test_eval_parsers_read_data_formats():
    labels = ["melanoma", "nevocytic nevus", "seborrheic keratosis", "basal cell carcinoma", "lentigo maligna",
              "dermatofibroma"]
    assert sf_eval.parse_ranked_list_ex(data.format_differential(labels)) == (labels, True)
    fields = data.SynthDerm(3, seed=5, image_size=64, split="test").spec(1)["fields"]
    text = data.format_caption(fields)
    assert sf_eval.parse_caption_ex(text) == ({k: v for k, v in fields.items()}, True)


def test_eval_parse_caption_hand_cases():
    assert sf_eval.parse_caption_ex("**Color**: Red ; pink.\nSite: arm\nsurface:") == \
        ({"colour": "red, pink", "location": "arm", "surface": "none"}, False)
    assert sf_eval.parse_caption("colour: red shape: round") == {"colour": "red", "shape": "round"}
    assert sf_eval.parse_caption('{"colour": ["red", "pink"], "lesion_type": "plaque", "x": 1}') == \
        {"colour": "red, pink", "lesion type": "plaque"}
    assert sf_eval.parse_caption_ex("no caption at all") == ({}, False)
    assert sf_eval.parse_caption_ex(None) == ({}, False)


_EVAL_PIECES = (list("abcdefgh xyz.,;:-*()[]#<>/\n\t123456789%'\"{}") +
                ["1. ", "2) ", "\n3. ", "- ", "colour: ", "shape: ", "<answer>", "</think>", "<think>",
                 "psoriasis", "BCC", "\u2022 ", "\u2028", "Dx:", " or "])
# random text built from list/caption syntax fragments, plus arbitrary unicode
_eval_text = st.one_of(st.lists(st.sampled_from(_EVAL_PIECES), max_size=60).map("".join), st.text(max_size=120))


@settings(max_examples=150, deadline=None)
@given(_eval_text)
def test_eval_ranked_parser_properties(text):
    items, ok = sf_eval._parse_ranked_core(text)                 # the core itself must not raise
    assert len(items) <= 6 and all(isinstance(x, str) and x for x in items)
    again, ok2 = sf_eval._parse_ranked_core(sf_eval.format_ranked_list(items))
    assert again == items                                   # idempotent on its own canonical output
    assert ok2 == bool(items)


@settings(max_examples=150, deadline=None)
@given(_eval_text)
def test_eval_caption_parser_properties(text):
    fields, ok = sf_eval._parse_caption_core(text)
    assert set(fields) <= set(sf_eval.CAPTION_FIELDS)
    assert sf_eval._parse_caption_core(sf_eval.format_caption_fields(fields))[0] == fields


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=100))
def test_eval_parsers_never_raise_on_bytes(raw):
    sf_eval.parse_ranked_list_ex(raw)
    sf_eval.parse_caption_ex(raw)


# ---------------------------------------------------------------------------------------------------
# CLI round trip and the LLM judge against a stub server
# ---------------------------------------------------------------------------------------------------
def test_eval_predictions_round_trip(tmp_path):
    rows = [
        {"id": "a", "prediction": "1. melanoma\n2. nevus", "label": "melanoma", "fitzpatrick": 2},
        {"id": "b", "prediction": ["nevus", "melanoma"], "label": "malignant melanoma", "fitzpatrick": 5},
        {"id": "c", "prediction": "1. eczema", "label": "psoriasis", "fitzpatrick": 6},
        {"id": "d", "prediction": "1. psoriasis", "label": "not a label", "fitzpatrick": 3},
    ]
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    assert sf_eval.main(["--predictions", str(path), "--out", str(tmp_path / "out"), "--bootstrap", "50"]) == 0
    out = tmp_path / "out"
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 3 and m["meta"]["skipped"] == 2            # the bad label and the bad line
    assert m["top1"] == pytest.approx(1 / 3) and m["top6"] == pytest.approx(2 / 3)
    assert m["safety_critical_rate"] == pytest.approx(1 / 3) and m["near_miss_rate"] == pytest.approx(1 / 3)
    report = (out / "report.md").read_text()
    assert "Top-1 (clinical)" in report and "50 resamples" in report     # the report states --bootstrap
    cases = [json.loads(x) for x in (out / "cases.jsonl").read_text().splitlines()]
    assert [c["id"] for c in cases] == ["a", "b", "c"] and cases[1]["first_hit"] == 2
    with Image.open(out / "top_k_by_skin_type.png") as img:
        img.load()
        assert img.size[0] > 100 and img.mode == "RGB"


def test_eval_predictions_join_labels_from_synthderm(tmp_path):
    ds = data.SynthDerm(4, seed=2, image_size=64, split="test")
    specs = [ds.spec(i) for i in range(4)]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"id": s["id"], "prediction": f"1. {s['label']}"}) for s in specs))
    sf_eval.main(["--predictions", str(path), "--data", "synthderm", "--n", "4", "--seed", "2", "--image-size", "64",
            "--out", str(tmp_path / "o"), "--bootstrap", "20"])
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n"] == 4 and m["top1"] == 1.0 and m["strict_top1"] == 1.0


class _EvalStubHandler(http.server.BaseHTTPRequestHandler):
    replies: list = []
    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, dict(self.headers), body))
        reply = type(self).replies.pop(0) if type(self).replies else None
        if reply is None:
            self.send_response(500)
            self.end_headers()
            return
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def eval_stub_server():
    _EvalStubHandler.replies, _EvalStubHandler.requests = [], []
    server = http.server.HTTPServer(("127.0.0.1", 0), _EvalStubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _EvalStubHandler
    server.shutdown()
    server.server_close()


def test_eval_llm_judge_against_stub(eval_stub_server):
    url, handler = eval_stub_server
    j = sf_eval.LLMJudge(url, model="stub-model", n=3, api_key="k")
    # majority of three: 2 x correct (JSON and prose), 1 x wrong -> correct, even though the
    # deterministic judge would say "unknown" for this out-of-vocabulary name
    handler.replies = ['{"verdict": "correct"}', "wrong", "The verdict is: correct."]
    assert j("lobular capillary haemangioma variant", "pyogenic granuloma") == "correct"
    path, headers, body = handler.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "stub-model"
    assert headers["Authorization"] == "Bearer k"
    assert "pyogenic granuloma" in body["messages"][1]["content"] and "safety_critical" in body["messages"][0]["content"]
    assert j("lobular capillary haemangioma variant", "pyogenic granuloma") == "correct"   # cached: no new call
    assert j.calls == 3
    # a 1-1 tie (third run fails with HTTP 500) goes to the verdict with less credit
    handler.replies = ["near_miss", "subtype", None]
    assert j("psoriasis", "pustular psoriasis") == "near_miss"
    # every run fails -> deterministic fallback, counted
    handler.replies = [None, "I have no idea", None]
    assert j("nevus", "melanoma") == "safety_critical" and j.fallbacks == 1
    # used inside the metrics
    handler.replies = ["safety-critical"] * 3
    m = sf_eval.clinical_metrics([(["benign mole"], "melanoma", 2)], judge_fn=j, n_boot=10)
    assert m["safety_critical_rate"] == 1.0


def test_eval_parse_verdict():
    assert sf_eval.parse_verdict('{"verdict": "near_miss"}') == "near_miss"
    assert sf_eval.parse_verdict("Near miss, same group") == "near_miss"
    assert sf_eval.parse_verdict("incorrect") is None            # "incorrect" is not "correct"
    assert sf_eval.parse_verdict(None) is None


def test_eval_model_cli_tiny_preset(tmp_path):
    """--model path end to end on the random tiny preset: generation runs, every image is scored."""
    assert sf_eval.main(["--model", "tiny", "--data", "synthderm", "--n", "3", "--batch-size", "2",
                   "--max-new-tokens", "6", "--image-size", "64", "--bootstrap", "20",
                   "--out", str(tmp_path / "m")]) == 0
    rows = (tmp_path / "m" / "predictions.jsonl").read_text().splitlines()
    assert len(rows) == 3 and all("prediction" in json.loads(r) for r in rows)
    assert json.loads((tmp_path / "m" / "metrics.json").read_text())["n"] == 3


def _eval_write_f17k(tmp_path, labels_per_row, with_images=True):
    """A miniature Fitzpatrick17k: a CSV with the real column names and, optionally, one small random
    JPEG per row named <md5hash>.jpg (what data.load_fitzpatrick17k resolves). Returns (csv, image dir, rows)."""
    import csv
    import numpy as np
    rng = np.random.default_rng(7)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rows = []
    for i, (label, fitz) in enumerate(labels_per_row):
        nine, three = data.TAXONOMY[label]
        rows.append({"md5hash": f"{i:032x}", "fitzpatrick_scale": fitz, "fitzpatrick_centaur": fitz,
                     "label": label, "nine_partition_label": nine, "three_partition_label": three,
                     "qc": "", "url": "", "url_alphanum": ""})
        if with_images:
            pixels = rng.integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(img_dir / f"{i:032x}.jpg")
    path = tmp_path / "f17k.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, img_dir, rows


def test_eval_fitzpatrick17k_model_and_predictions(tmp_path):
    """--data fitzpatrick17k end to end on a 9-row CSV with generated images.

    Three rows per label, so the stratified random split sends round(3 * 0.2) = 1 row per label to the
    test part, and the default split (eval1000/test: up to 1,000 of those) holds exactly 3 images.
    """
    table = [("melanoma", 2), ("psoriasis", 5), ("nevocytic nevus", 6)] * 3
    csv_path, img_dir, rows = _eval_write_f17k(tmp_path, table)
    by_id = {r["md5hash"]: r for r in rows}
    out = tmp_path / "m"
    assert sf_eval.main(["--model", "tiny", "--data", "fitzpatrick17k", "--csv", str(csv_path),
                         "--image-dir", str(img_dir), "--max-new-tokens", "4", "--bootstrap", "20",
                         "--out", str(out)]) == 0
    preds = [json.loads(r) for r in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and len({p["id"] for p in preds}) == 3
    for p in preds:                                  # label and skin type come from the CSV row of that image
        assert p["label"] == by_id[p["id"]]["label"] and p["fitzpatrick"] == by_id[p["id"]]["fitzpatrick_scale"]
    assert sorted(p["label"] for p in preds) == ["melanoma", "nevocytic nevus", "psoriasis"]
    # --predictions with ids only: labels and skin types are joined from the CSV. Every row answers its
    # own label except the melanoma row, which answers "nevus": a missed cancer (safety-critical at rank 1).
    lines = [{"id": r["md5hash"], "prediction": "1. nevus" if r["label"] == "melanoma" else "1. " + r["label"]}
             for r in rows]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert sf_eval.main(["--predictions", str(tmp_path / "p.jsonl"), "--data", "fitzpatrick17k",
                         "--csv", str(csv_path), "--bootstrap", "20", "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n"] == 9 and m["top1"] == pytest.approx(6 / 9) and m["safety_critical_rate"] == pytest.approx(3 / 9)
    assert m["by_fitzpatrick"]["II"]["top1"] == 0.0 and m["by_fitzpatrick"]["VI"]["top1"] == 1.0
    assert set(m["by_fitzpatrick"]) == {"II", "V", "VI"}
