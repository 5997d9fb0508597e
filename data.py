"""data.py: every piece of data SkinFlow (arXiv 2601.09136) trains and tests on, in one file.

SkinFlow trains Qwen2.5-VL with two GRPO stages and one architectural change. We cite the paper by
section title (its section numbers were not available to us):
  * "Stage I: explicit medical captioning" rewards a structured *caption* of the lesion, scored field by
    field over 8 fields (colour, location, shape, lesion type, size, border, surface, distribution). It
    teaches the model to SAY what it sees before it diagnoses.
  * "Stage II: implicit diagnosis" rewards a ranked *differential* (6 diagnoses, most likely first) by
    the first position a judge accepts. It must use evidence a caption cannot carry (fine texture).
  * "DVE" (the dynamic vision encoder, dve.py) gives every image its own vision-MLP weights, so that
    image-specific fine detail is not averaged away by one static encoder.
  * "Evaluation": Top-1 / Top-6 on 1,000 random Fitzpatrick17k images, with credit for subclasses.
This module feeds all four, and SynthDerm (below) is built so that each of them measurably matters.

Map of this file, in file order:
  TAXONOMY, NINE_TO_THREE         Fitzpatrick17k label tree, 114 fine -> 9 -> 3 labels (subclass credit)
  FAMILIES, FAMILY                near-miss families: 114 labels -> 27 differential families (eval.judge)
  CAPTION_FIELDS, STAGE1_PROMPT,  the prompts of both stages and their canonical targets: the one home
  STAGE2_PROMPT, CAPTION_VOCAB,   that eval.py parses and rl.py rewards
  format_caption, format_differential
  SynthDerm design block          P_MIMIC, CUE_AMPLITUDE, SKIN_TYPE_PRIOR, SKIN_RGB, COLOUR_RULES (colour
                                  relative to skin), CLASS_RULES (20 classes), CLUSTERS (confusable groups)
  reference_differential          the Stage II reference ranking of a label
  _noise_tile .. _relative_colour small numpy rendering helpers (sampling, blending, plane waves)
  SynthSample, SynthDerm          the generator: spec() draws attributes, _render() draws pixels
  tokenizer_corpus                texts for the tiny preset's byte-level BPE
  headroom (+ tiny classifiers)   majority / colour / colour+spectrum / caption-oracle baselines
  Record, load_fitzpatrick17k     the real CSV (Groh et al. 2021), images resolved by md5hash
  split_random .. fitzpatrick17k_split   Groh's split protocols + the paper-style 1,000-image sample
  caption_to_fields, load_skincap, skincap_guard   SkinCAP (Zhou et al. 2024) captions for Stage I
  ImageError, open_image, phash, near_duplicate_groups   the one opener of real photos; copies found
  download_images, download_fitzpatrick17k         resumable, atomic image downloader
  fetch                           backbone + Fitzpatrick17k images + SkinCAP CSV in one command
  fitzpatrick17k_records, Fitzpatrick17kData       one stage's real records / rl.py's indexable stream
  reference_answer, iterate       (PIL image, prompt, target record) for training and evaluation
  preview, bench, main            the CLI:
      python data.py preview --n 16 --out grid.png      labelled contact sheet of SynthDerm samples
      python data.py headroom                           the baselines above on the SynthDerm test split
      python data.py bench                              SynthDerm images/second on one core
      python data.py download-fitzpatrick17k --out DIR
      python data.py fetch --out DIR                    backbone + images + SkinCAP, resumable (issue 12)
      python data.py near-duplicates DIR                pHash groups of an image folder, timed

SynthDerm is a procedural stand-in for Fitzpatrick17k: 20 classes that reuse Fitzpatrick17k label
strings, drawn with numpy on skin of Fitzpatrick types I-VI, with a truthful caption per image, a faint
class-specific texture that is never captioned (the "implicit" signal of Stage II and the DVE), and
confusable clusters with mimicry so that neither the caption nor a colour histogram solves the task. It
needs no download, so `bash train.sh` and the tests run anywhere. It is NOT medically faithful: it is a
controlled task whose difficulty knobs mirror the real ones.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import math
import os
import sys
import time
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

HERE = Path(__file__).resolve().parent
# The Fitzpatrick17k CSV ships with the repo (gzip, 0.7 MB; attribution in assets/README.md).
FITZPATRICK17K_CSV = HERE / "assets" / "fitzpatrick17k.csv.gz"

# ---------------------------------------------------------------------------------------------------
# Fitzpatrick17k label tree: 114 fine labels -> (nine_partition_label, three_partition_label).
# Derived row by row from fitzpatrick17k.csv (Groh et al. 2021, github.com/mattgroh/fitzpatrick17k,
# CC BY-NC-SA 3.0; CSV md5 75556ecbd0bd6227050112565c24b991). Every fine label maps to exactly one
# nine-label and every nine-label to exactly one three-label, so the table is a strict tree. The label
# strings are kept exactly as the CSV spells them, typos included ("erythema annulare centrifigum"),
# because they are IDs; eval.py owns the synonyms and display names.
# Why the tree matters: the paper's evaluation gives credit for a "valid subclass" and weighs mistakes by
# clinical consequence, and both need the hierarchy: "superficial spreading melanoma ssm" for a
# "melanoma" image is a subtype (credit), "seborrheic keratosis" for a melanoma crosses benign/malignant
# (the safety-critical miss eval.judge reports separately).
# ---------------------------------------------------------------------------------------------------
TAXONOMY: dict[str, tuple[str, str]] = {
    # non-neoplastic / genodermatoses (10 labels)
    'acrodermatitis enteropathica': ('genodermatoses', 'non-neoplastic'),
    'dariers disease': ('genodermatoses', 'non-neoplastic'),
    'ehlers danlos syndrome': ('genodermatoses', 'non-neoplastic'),
    'epidermolysis bullosa': ('genodermatoses', 'non-neoplastic'),
    'hailey hailey disease': ('genodermatoses', 'non-neoplastic'),
    'ichthyosis vulgaris': ('genodermatoses', 'non-neoplastic'),
    'incontinentia pigmenti': ('genodermatoses', 'non-neoplastic'),
    'neurofibromatosis': ('genodermatoses', 'non-neoplastic'),
    'tuberous sclerosis': ('genodermatoses', 'non-neoplastic'),
    'xeroderma pigmentosum': ('genodermatoses', 'non-neoplastic'),
    # non-neoplastic / inflammatory (69 labels)
    'acanthosis nigricans': ('inflammatory', 'non-neoplastic'),
    'acne': ('inflammatory', 'non-neoplastic'),
    'acne vulgaris': ('inflammatory', 'non-neoplastic'),
    'acquired autoimmune bullous diseaseherpes gestationis': ('inflammatory', 'non-neoplastic'),
    'allergic contact dermatitis': ('inflammatory', 'non-neoplastic'),
    'aplasia cutis': ('inflammatory', 'non-neoplastic'),
    'behcets disease': ('inflammatory', 'non-neoplastic'),
    'calcinosis cutis': ('inflammatory', 'non-neoplastic'),
    'cheilitis': ('inflammatory', 'non-neoplastic'),
    'dermatomyositis': ('inflammatory', 'non-neoplastic'),
    'drug eruption': ('inflammatory', 'non-neoplastic'),
    'drug induced pigmentary changes': ('inflammatory', 'non-neoplastic'),
    'dyshidrotic eczema': ('inflammatory', 'non-neoplastic'),
    'eczema': ('inflammatory', 'non-neoplastic'),
    'erythema annulare centrifigum': ('inflammatory', 'non-neoplastic'),
    'erythema elevatum diutinum': ('inflammatory', 'non-neoplastic'),
    'erythema multiforme': ('inflammatory', 'non-neoplastic'),
    'erythema nodosum': ('inflammatory', 'non-neoplastic'),
    'factitial dermatitis': ('inflammatory', 'non-neoplastic'),
    'fixed eruptions': ('inflammatory', 'non-neoplastic'),
    'folliculitis': ('inflammatory', 'non-neoplastic'),
    'granuloma annulare': ('inflammatory', 'non-neoplastic'),
    'hidradenitis': ('inflammatory', 'non-neoplastic'),
    'juvenile xanthogranuloma': ('inflammatory', 'non-neoplastic'),
    'keloid': ('inflammatory', 'non-neoplastic'),
    'keratosis pilaris': ('inflammatory', 'non-neoplastic'),
    'langerhans cell histiocytosis': ('inflammatory', 'non-neoplastic'),
    'lichen amyloidosis': ('inflammatory', 'non-neoplastic'),
    'lichen planus': ('inflammatory', 'non-neoplastic'),
    'lichen simplex': ('inflammatory', 'non-neoplastic'),
    'livedo reticularis': ('inflammatory', 'non-neoplastic'),
    'lupus erythematosus': ('inflammatory', 'non-neoplastic'),
    'lupus subacute': ('inflammatory', 'non-neoplastic'),
    'lyme disease': ('inflammatory', 'non-neoplastic'),
    'mucinosis': ('inflammatory', 'non-neoplastic'),
    'myiasis': ('inflammatory', 'non-neoplastic'),
    'necrobiosis lipoidica': ('inflammatory', 'non-neoplastic'),
    'nematode infection': ('inflammatory', 'non-neoplastic'),
    'neurodermatitis': ('inflammatory', 'non-neoplastic'),
    'neurotic excoriations': ('inflammatory', 'non-neoplastic'),
    'neutrophilic dermatoses': ('inflammatory', 'non-neoplastic'),
    'papilomatosis confluentes and reticulate': ('inflammatory', 'non-neoplastic'),
    'paronychia': ('inflammatory', 'non-neoplastic'),
    'pediculosis lids': ('inflammatory', 'non-neoplastic'),
    'perioral dermatitis': ('inflammatory', 'non-neoplastic'),
    'photodermatoses': ('inflammatory', 'non-neoplastic'),
    'pityriasis lichenoides chronica': ('inflammatory', 'non-neoplastic'),
    'pityriasis rosea': ('inflammatory', 'non-neoplastic'),
    'pityriasis rubra pilaris': ('inflammatory', 'non-neoplastic'),
    'porphyria': ('inflammatory', 'non-neoplastic'),
    'psoriasis': ('inflammatory', 'non-neoplastic'),
    'pustular psoriasis': ('inflammatory', 'non-neoplastic'),
    'rhinophyma': ('inflammatory', 'non-neoplastic'),
    'rosacea': ('inflammatory', 'non-neoplastic'),
    'sarcoidosis': ('inflammatory', 'non-neoplastic'),
    'scabies': ('inflammatory', 'non-neoplastic'),
    'scleroderma': ('inflammatory', 'non-neoplastic'),
    'scleromyxedema': ('inflammatory', 'non-neoplastic'),
    'seborrheic dermatitis': ('inflammatory', 'non-neoplastic'),
    'stasis edema': ('inflammatory', 'non-neoplastic'),
    'stevens johnson syndrome': ('inflammatory', 'non-neoplastic'),
    'striae': ('inflammatory', 'non-neoplastic'),
    'sun damaged skin': ('inflammatory', 'non-neoplastic'),
    'tick bite': ('inflammatory', 'non-neoplastic'),
    'tungiasis': ('inflammatory', 'non-neoplastic'),
    'urticaria': ('inflammatory', 'non-neoplastic'),
    'urticaria pigmentosa': ('inflammatory', 'non-neoplastic'),
    'vitiligo': ('inflammatory', 'non-neoplastic'),
    'xanthomas': ('inflammatory', 'non-neoplastic'),
    # benign / benign dermal (12 labels)
    'becker nevus': ('benign dermal', 'benign'),
    'dermatofibroma': ('benign dermal', 'benign'),
    'fordyce spots': ('benign dermal', 'benign'),
    'granuloma pyogenic': ('benign dermal', 'benign'),
    'lymphangioma': ('benign dermal', 'benign'),
    'mucous cyst': ('benign dermal', 'benign'),
    'pilar cyst': ('benign dermal', 'benign'),
    'pilomatricoma': ('benign dermal', 'benign'),
    'port wine stain': ('benign dermal', 'benign'),
    'pyogenic granuloma': ('benign dermal', 'benign'),
    'syringoma': ('benign dermal', 'benign'),
    'telangiectases': ('benign dermal', 'benign'),
    # benign / benign epidermal (9 labels)
    'disseminated actinic porokeratosis': ('benign epidermal', 'benign'),
    'epidermal nevus': ('benign epidermal', 'benign'),
    'milia': ('benign epidermal', 'benign'),
    'naevus comedonicus': ('benign epidermal', 'benign'),
    'nevus sebaceous of jadassohn': ('benign epidermal', 'benign'),
    'porokeratosis actinic': ('benign epidermal', 'benign'),
    'porokeratosis of mibelli': ('benign epidermal', 'benign'),
    'prurigo nodularis': ('benign epidermal', 'benign'),
    'seborrheic keratosis': ('benign epidermal', 'benign'),
    # benign / benign melanocyte (3 labels)
    'congenital nevus': ('benign melanocyte', 'benign'),
    'halo nevus': ('benign melanocyte', 'benign'),
    'nevocytic nevus': ('benign melanocyte', 'benign'),
    # malignant / malignant cutaneous lymphoma (1 labels)
    'mycosis fungoides': ('malignant cutaneous lymphoma', 'malignant'),
    # malignant / malignant dermal (1 labels)
    'kaposi sarcoma': ('malignant dermal', 'malignant'),
    # malignant / malignant epidermal (5 labels)
    'actinic keratosis': ('malignant epidermal', 'malignant'),
    'basal cell carcinoma': ('malignant epidermal', 'malignant'),
    'basal cell carcinoma morpheiform': ('malignant epidermal', 'malignant'),
    'solid cystic basal cell carcinoma': ('malignant epidermal', 'malignant'),
    'squamous cell carcinoma': ('malignant epidermal', 'malignant'),
    # malignant / malignant melanoma (4 labels)
    'lentigo maligna': ('malignant melanoma', 'malignant'),
    'malignant melanoma': ('malignant melanoma', 'malignant'),
    'melanoma': ('malignant melanoma', 'malignant'),
    'superficial spreading melanoma ssm': ('malignant melanoma', 'malignant'),
}

# The nine groups map to exactly one of the three top-level groups (derived from TAXONOMY, so one source).
NINE_TO_THREE: dict[str, str] = {nine: three for nine, three in TAXONOMY.values()}

# ---------------------------------------------------------------------------------------------------
# Near-miss families: the level between a label and its nine-partition group.
#
# Why a third level: the nine-partition puts 69 of the 114 labels in "inflammatory", so "same nine
# group" called vitiligo a near miss for psoriasis and acne a near miss for lupus. A near miss should
# mean "wrong name, but the differential family a dermatologist would accept": the same morphology
# (what the lesion looks like) and, usually, the same next step (work-up, first-line treatment).
# eval.judge calls two labels a near miss when they share a FAMILY (and are not the same concept or a
# subtype pair); the clinical metric's "near miss @1" and the Stage II reward's near-miss credit go
# through judge, so they follow this table.
#
# How the families were built: morphology-based differential families as taught in dermatology (the
# grouping of a textbook's sections: papulosquamous, eczematous, vesiculobullous, acneiform, ...), each
# anchored, where one exists, to the WHO ICD-10 block(s) its members sit in, so a reader can check the
# assignment against a public source. Where morphology and ICD-10 disagree the family follows morphology
# and says so in its reason (e.g. seborrheic dermatitis: ICD-10 L21 sits in the dermatitis block, here it
# is papulosquamous). The long notes, with every label's row, live in docs/near-miss-families.md.
#
# Three invariants (tested):
#   * every TAXONOMY label is in exactly one family;
#   * no family crosses the malignant line of the three-partition, so a near miss is never also a
#     safety-critical error (melanoma and nevus are separate families; a nevus for a melanoma stays
#     safety_critical, exactly as before);
#   * a family may cross nine-groups (keloid is "inflammatory", dermatofibroma "benign dermal" in
#     Fitzpatrick17k, but both are firm dermal fibrous papules), since the nine groups are the coarse
#     level this one refines in places and corrects in others.
# A family of one label (vitiligo, Kaposi sarcoma, mycosis fungoides) means no near miss is possible:
# its differential's other members are not Fitzpatrick17k labels.
# Format: family -> (ICD-10 anchor, reason, member labels). Labels are TAXONOMY keys, typos included.
# ---------------------------------------------------------------------------------------------------
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "papulosquamous": (
        "L40-L44 (+ L21)",
        "well-bordered red papules/plaques with scale; psoriasis, lichen planus, pityriasis rosea, PRP and "
        "pityriasis lichenoides are each other's textbook differential. Seborrheic dermatitis is ICD-10 L21 "
        "(dermatitis block) but joins here: sebopsoriasis is a recognised overlap and psoriasis is its first "
        "differential on scalp, face and flexures, with the same first-line topical treatment",
        ("psoriasis", "pustular psoriasis", "lichen planus", "pityriasis rosea", "pityriasis rubra pilaris",
         "pityriasis lichenoides chronica", "seborrheic dermatitis")),
    "eczematous": (
        "L20-L30 (+ I87.2, E83.2, K13.0)",
        "ill-defined itchy, oozing or lichenified dermatitis: atopic, contact, dyshidrotic (pompholyx) and "
        "venous-stasis eczema. Acrodermatitis enteropathica (E83.2, zinc deficiency) and cheilitis (K13.0, "
        "lips) are not in the block but present as an eczematous periorificial / lip dermatitis",
        ("eczema", "allergic contact dermatitis", "dyshidrotic eczema", "stasis edema",
         "acrodermatitis enteropathica", "cheilitis")),
    "itch-scratch and self-inflicted": (
        "L28, L98.1",
        "lesions made by rubbing, scratching or picking: lichen simplex chronicus and prurigo nodularis "
        "(both L28), neurotic excoriations and factitial dermatitis (both L98.1). Prurigo nodularis is "
        "'benign epidermal' in Fitzpatrick17k; clinically it is the nodular end of the itch-scratch cycle",
        ("lichen simplex", "neurodermatitis", "prurigo nodularis", "neurotic excoriations",
         "factitial dermatitis")),
    "reactive erythemas and drug eruptions": (
        "L50-L53, L27",
        "urticarial, target, figurate and nodular erythemas and drug eruptions: transient reaction patterns "
        "whose work-up is the same search for a trigger (drug, infection). SJS/TEN sits in ICD-10 L51 with "
        "erythema multiforme; drug eruptions are L27 (dermatitis block) but are read as exanthems/reactions",
        ("urticaria", "erythema multiforme", "stevens johnson syndrome", "erythema annulare centrifigum",
         "erythema nodosum", "drug eruption", "fixed eruptions")),
    "vesiculobullous": (
        "L10-L14, Q81, Q82.8",
        "blisters and erosions: autoimmune bullous disease (pemphigus, pemphigoid), epidermolysis bullosa "
        "(inherited) and Hailey-Hailey disease ('familial benign pemphigus'); pemphigus is the classic "
        "differential of both genodermatoses",
        ("acquired autoimmune bullous diseaseherpes gestationis", "epidermolysis bullosa",
         "hailey hailey disease")),
    "acneiform and follicular": (
        "L70-L73, L71.0",
        "inflammatory papules and pustules of the pilosebaceous unit: acne, rosacea and its phyma, perioral "
        "dermatitis (ICD-10 L71.0, a rosacea code), folliculitis and hidradenitis suppurativa (L73.2)",
        ("acne", "acne vulgaris", "rosacea", "rhinophyma", "perioral dermatitis", "folliculitis",
         "hidradenitis")),
    "infections and infestations": (
        "A69.2, B76, B85-B88, L03.0",
        "an organism is the cause and the treatment is anti-infective: scabies, lice, myiasis, tungiasis, "
        "larva migrans, Lyme disease, arthropod (tick/insect) bites, paronychia. Fitzpatrick17k has no tinea, "
        "impetigo or viral labels, so these are the whole family",
        ("scabies", "pediculosis lids", "myiasis", "tungiasis", "nematode infection", "tick bite",
         "lyme disease", "paronychia")),
    "hyperpigmentation": (
        "L81, L83 (+ Q82.3, D22)",
        "acquired or patterned brown-grey pigment: drug-induced pigmentation, acanthosis nigricans and "
        "confluent reticulated papillomatosis (both ICD-10 L83; each other's classic differential), Becker "
        "nevus and the whorled pigment of incontinentia pigmenti. Becker nevus is a hamartoma, not a "
        "melanocytic nevus, and does not map cleanly to one ICD-10 code",
        ("drug induced pigmentary changes", "acanthosis nigricans", "papilomatosis confluentes and reticulate",
         "becker nevus", "incontinentia pigmenti")),
    "depigmentation": (
        "L80",
        "vitiligo: loss of pigment. Its real differential (pityriasis alba, tinea versicolor, post-"
        "inflammatory hypopigmentation) has no Fitzpatrick17k label, so no near miss exists for it",
        ("vitiligo",)),
    "photo-induced": (
        "L55-L59, Q82.1, E80",
        "lesions caused or triggered by light: photodermatoses (L56), chronic sun damage (L57), xeroderma "
        "pigmentosum (inherited photosensitivity) and porphyria (photodistributed blistering and "
        "fragility); the shared work-up is photoprotection and a photosensitivity screen",
        ("photodermatoses", "sun damaged skin", "xeroderma pigmentosum", "porphyria")),
    "connective tissue disease": (
        "M32-M34, L93, L94.0",
        "autoimmune connective tissue disease of the skin: cutaneous lupus (discoid, subacute), "
        "dermatomyositis, scleroderma/morphea; photosensitive or indurated, same serology work-up",
        ("lupus erythematosus", "lupus subacute", "dermatomyositis", "scleroderma")),
    "dermal deposits": (
        "L98.5, E85, L94.2",
        "papules or plaques made of a deposit in the dermis: mucin (mucinosis, scleromyxedema, both L98.5), "
        "amyloid (lichen amyloidosis, E85) and calcium (calcinosis cutis, L94.2); told apart by biopsy",
        ("mucinosis", "scleromyxedema", "lichen amyloidosis", "calcinosis cutis")),
    "granulomatous": (
        "L92, D86.3",
        "dermal granulomas: granuloma annulare and necrobiosis lipoidica (both L92) and sarcoidosis (D86.3), "
        "the classic annular/indurated-plaque triad",
        ("granuloma annulare", "necrobiosis lipoidica", "sarcoidosis")),
    "histiocytic and mast-cell infiltrates": (
        "D76, E78, Q82.2 (+ C96)",
        "yellow-orange-brown papules of histiocytes, lipid-laden macrophages or mast cells: juvenile "
        "xanthogranuloma, xanthomas, Langerhans cell histiocytosis and urticaria pigmentosa (mastocytosis); "
        "the differential of a yellow-brown papule in a child",
        ("juvenile xanthogranuloma", "xanthomas", "langerhans cell histiocytosis", "urticaria pigmentosa")),
    "neutrophilic and vasculitic": (
        "L88, L98.2, L95, M35.2",
        "neutrophilic dermatoses (Sweet syndrome, pyoderma gangrenosum), Behcet disease, erythema elevatum "
        "diutinum (a chronic cutaneous vasculitis) and livedo reticularis (the vascular pattern of "
        "vasculopathy; no clean ICD-10 block)",
        ("neutrophilic dermatoses", "behcets disease", "erythema elevatum diutinum", "livedo reticularis")),
    "vascular tumours and malformations": (
        "D18, Q82.5, I78, L98.0",
        "benign vessels: pyogenic granuloma (both CSV spellings), port-wine stain, telangiectasia and "
        "lymphangioma (a lymphatic malformation in the ISSVA classification)",
        ("pyogenic granuloma", "granuloma pyogenic", "port wine stain", "telangiectases", "lymphangioma")),
    "cysts and adnexal growths": (
        "L72, D23",
        "small benign papules/nodules of follicles, glands and ducts: pilar cyst (L72.1), milia, mucous "
        "cyst, pilomatricoma, syringoma, Fordyce spots (ectopic sebaceous glands); syringoma vs milia and "
        "pilomatricoma vs cyst are textbook pairs",
        ("pilar cyst", "mucous cyst", "milia", "pilomatricoma", "syringoma", "fordyce spots")),
    "dermal fibrous": (
        "L91.0, D23",
        "firm dermal fibrous papules/nodules: dermatofibroma and keloid (Fitzpatrick17k files keloid as "
        "'inflammatory'); each is the other's differential for a firm pink-brown papule",
        ("dermatofibroma", "keloid")),
    "dermal atrophy and fragility": (
        "L90 (+ Q79.6, Q84.8)",
        "thin, atrophic or fragile dermis: striae (L90.6), Ehlers-Danlos syndrome (atrophic scars, "
        "hyperextensible skin) and aplasia cutis (a healed membranous atrophic scar)",
        ("striae", "ehlers danlos syndrome", "aplasia cutis")),
    "disorders of keratinisation": (
        "Q80, Q82.8, L85-L87",
        "abnormal cornification: ichthyosis vulgaris, Darier disease, keratosis pilaris and the "
        "porokeratoses (all three labels); grouped as a textbook 'disorders of cornification' section",
        ("ichthyosis vulgaris", "dariers disease", "keratosis pilaris", "porokeratosis actinic",
         "disseminated actinic porokeratosis", "porokeratosis of mibelli")),
    "benign epidermal growths": (
        "L82, Q82.5",
        "benign keratinocyte growths and hamartomas: seborrheic keratosis and the epidermal nevi (verrucous, "
        "comedonicus, sebaceous); warty, stuck-on or linear, no malignant potential worth excision",
        ("seborrheic keratosis", "epidermal nevus", "naevus comedonicus", "nevus sebaceous of jadassohn")),
    "phakomatoses": (
        "Q85",
        "neurocutaneous syndromes: neurofibromatosis (Q85.0) and tuberous sclerosis (Q85.1), each the "
        "other's differential for multiple skin-coloured papules plus pigmentary signs",
        ("neurofibromatosis", "tuberous sclerosis")),
    "melanocytic nevi": (
        "D22",
        "benign melanocytic nevi: acquired, congenital and halo nevi",
        ("nevocytic nevus", "congenital nevus", "halo nevus")),
    "melanoma": (
        "C43, D03",
        "melanoma and its subtypes (superficial spreading, lentigo maligna); kept apart from nevi so that a "
        "nevus for a melanoma stays safety_critical",
        ("melanoma", "malignant melanoma", "superficial spreading melanoma ssm", "lentigo maligna")),
    "keratinocyte cancers": (
        "C44, D04, L57.0",
        "keratinocyte carcinomas and their precursor: basal cell carcinoma (all three labels), squamous cell "
        "carcinoma and actinic keratosis (malignant in Fitzpatrick17k); BCC vs SCC vs AK is the daily "
        "differential of a sun-damaged scaly or pearly lesion, all managed by excision/destruction",
        ("basal cell carcinoma", "basal cell carcinoma morpheiform", "solid cystic basal cell carcinoma",
         "squamous cell carcinoma", "actinic keratosis")),
    "cutaneous lymphoma": (
        "C84.0",
        "mycosis fungoides, the only lymphoma label; its mimics (eczema, psoriasis) are non-malignant, so "
        "mistaking them stays safety_critical",
        ("mycosis fungoides",)),
    "malignant vascular": (
        "C46",
        "Kaposi sarcoma, the only malignant vascular label; its benign mimics (pyogenic granuloma) stay "
        "safety_critical",
        ("kaposi sarcoma",)),
}
# Label -> family, derived from FAMILIES (one source). Example: FAMILY["scabies"] = "infections and infestations".
FAMILY: dict[str, str] = {label: fam for fam, (_, _, labels) in FAMILIES.items() for label in labels}

# Near-duplicate labels ("pyogenic granuloma" / "granuloma pyogenic", the melanoma variants, ...) are NOT
# merged here: the label strings stay the CSV's IDs. The one home for synonyms, subtypes and aliases is
# eval.py (`canonical`, `judge`), which gives credit for a synonym or a valid subclass.

# ---------------------------------------------------------------------------------------------------
# Prompts and target formats (paper sections "Stage I: explicit medical captioning" and "Stage II:
# implicit diagnosis"). The paper does not publish its prompt text; these are ours. Both ask for a fixed,
# line-based format so that a deterministic parser (eval.py) can score the answer and rl.py can reward it.
# Why lines and not JSON: a 3B model (and our tiny preset) emits "field: value" lines reliably after a
# few hundred steps, one broken line costs one field instead of the whole parse, and the reward can be
# read per field, which is exactly how the paper's Stage I reward is described (field-by-field scores).
#
# Worked example, one SynthDerm image (train split, seed 0, item 0; the truth is pyogenic granuloma):
#   Stage I   prompt: STAGE1_PROMPT              target: format_caption(sample.fields) =
#       colour: pink / location: face / shape: irregular / lesion type: papule / size: medium /
#       border: well-demarcated, irregular / surface: telangiectasia, central ulcer / distribution: solitary
#     (8 lines, shown here with " / "). This item is a mimic: the caption honestly describes a basal cell
#     carcinoma look, so a perfect Stage I answer alone points to the wrong diagnosis.
#   Stage II  prompt: STAGE2_PROMPT              target: format_differential(reference_differential(...)) =
#       1. pyogenic granuloma / 2. basal cell carcinoma / 3. squamous cell carcinoma / 4. dermatofibroma / ...
#     The truth is first, then what it looks like, then its confusable siblings: a ranking that earns the
#     full position reward and still reads like a sensible clinical differential.
# ---------------------------------------------------------------------------------------------------
CAPTION_FIELDS = ("colour", "location", "shape", "lesion type", "size", "border", "surface", "distribution")

STAGE1_PROMPT = (
    "Describe the skin lesion in this image. Answer with exactly 8 lines in this order, each written as "
    "'field: value' in lower case (several values separated by ', ', 'none' if absent): "
    "colour, location, shape, lesion type, size, border, surface, distribution."
)
STAGE2_PROMPT = (
    "What is the diagnosis of the skin condition in this image? Give a differential diagnosis of 6 "
    "conditions, most likely first, one per line as '1. <diagnosis>' to '6. <diagnosis>'."
)

# The closed vocabulary of each caption field. SynthDerm draws only these values; the SkinCAP mapper
# maps free text onto them. (Listed so tokenizer_corpus and tests can see every word a target may hold.)
# A closed vocabulary is what makes a field-by-field reward cheap and exact: "erythematous" vs "pink" is a
# string comparison, not an LLM judgement. The words are standard dermatology morphology terms: "macule"
# and "patch" are flat (small / large), "papule" and "nodule" raised (small / large), "plaque" raised and
# flat-topped, "wheal" a transient oedematous swelling; the surface list holds the classic clues a
# dermatologist names (silvery scale of psoriasis, Wickham striae of lichen planus, the rolled pearly
# border of a basal cell carcinoma, the collarette of a pyogenic granuloma, horn cysts of a seborrheic
# keratosis).
CAPTION_VOCAB: dict[str, tuple[str, ...]] = {
    "colour": ("erythematous", "salmon", "pink", "violaceous", "brown", "dark brown", "black", "blue-gray",
               "white", "yellow", "pearly", "skin-coloured"),
    "location": ("face", "scalp", "trunk", "limb", "palm or sole"),
    "shape": ("round", "oval", "polygonal", "annular", "arcuate", "irregular"),
    "lesion type": ("macule", "patch", "papule", "plaque", "nodule", "wheal", "vesicle", "pustule"),
    "size": ("small", "medium", "large"),
    "border": ("well-demarcated", "ill-defined", "regular", "irregular"),
    "surface": ("coarse silvery scale", "fine scale", "thick keratotic scale", "crust", "central ulcer",
                "excoriations", "verrucous", "horn cysts", "reticulate white lines", "telangiectasia",
                "rolled border", "collarette", "glistening", "pustules", "comedones", "pale centre",
                "depigmented halo", "central white scar-like patch", "wrinkled atrophy", "fish-scale"),
    "distribution": ("solitary", "scattered", "clustered", "linear", "follicular", "generalized"),
}


def format_caption(fields: dict[str, str]) -> str:
    """Stage I target: exactly 8 lines `<field>: <value>` in CAPTION_FIELDS order, lower case.

    A value may hold several items joined by ", "; an empty or missing value is written "none".
    Example (a psoriasis plaque; fields given in any order, missing ones become "none"):
        {"colour": "Erythematous, salmon", "location": "trunk", "shape": "round", "lesion type": "plaque",
         "size": "large", "border": "well-demarcated, regular", "surface": "coarse silvery scale",
         "distribution": "scattered"}  ->
        colour: erythematous, salmon
        location: trunk
        shape: round
        lesion type: plaque
        size: large
        border: well-demarcated, regular
        surface: coarse silvery scale
        distribution: scattered
    Writing "none" instead of dropping the line keeps the shape fixed (always 8 lines, always this
    order), so a parser can tell "the model said there is no surface feature" from "it forgot the field".
    """
    lines = []
    for name in CAPTION_FIELDS:
        value = str(fields.get(name, "") or "").strip().lower()
        lines.append(f"{name}: {value if value else 'none'}")
    return "\n".join(lines)


def format_differential(labels: list[str]) -> str:
    """Stage II target: up to 6 lines `1. <label>` ... `6. <label>`, most likely first (duplicates dropped).

    Example: ["Psoriasis", "eczema", "psoriasis", "mycosis fungoides"] -> "1. psoriasis\n2. eczema\n3. mycosis
    fungoides". Six because the paper reports Top-6; duplicates are dropped because a repeated guess adds
    no information and must not occupy a rank that the position-based Stage II reward counts.
    """
    seen: list[str] = []
    for label in labels:
        label = str(label).strip().lower()
        if label and label not in seen:
            seen.append(label)
    return "\n".join(f"{i}. {label}" for i, label in enumerate(seen[:6], start=1))


# ---------------------------------------------------------------------------------------------------
# SynthDerm: the procedural stand-in dataset (the full design is below; values from a measured prototype)
#
# Each class is a set of *rules* over explicit attributes, each attribute a small categorical or a range.
# A sample draws its attributes from its class's rules, renders them, and captions exactly what it rendered,
# so the caption is truthful. Three things keep the task from being solved by the caption alone:
#   * overlap: classes in one confusable cluster share most attribute values (psoriasis vs eczema ...);
#   * mimicry: with probability P_MIMIC a sample takes the whole explicit look of a cluster sibling while
#     keeping its own diagnosis (recorded in `.looks_like`), so an honest caption points at the wrong class;
#   * the implicit cue: a faint grating inside and around each lesion whose period is class-specific
#     (siblings differ) and which is never captioned. Only a model that looks at fine texture can recover
#     a mimic's true class, which is the "implicit" signal SkinFlow's Stage II and DVE are built for.
#
# Each design choice models a real difficulty and exercises one part of SkinFlow:
#   choice                            real dermatology difficulty it models          exercises
#   8 explicit, rendered attributes   a clinician's morphology description            Stage I (captions)
#   overlap inside clusters           psoriasis / eczema / mycosis fungoides look     Stage II (ranking:
#                                     alike; many diagnoses share one description     siblings fill the list)
#   mimicry (P_MIMIC)                 amelanotic melanoma looks pink, a pyogenic      Stage II: the caption
#                                     granuloma can look like a BCC                   is honest but misleading
#   implicit grating (never written)  texture a dermatologist sees but cannot name    Stage II + DVE
#   colour relative to skin           erythema is hard to see on dark skin            fairness (Groh a12..a56)
#   skin-type prior of the CSV        types V-VI are rare in training data            fairness
#   site cues, hair, lighting, noise  real photos are cluttered and uneven            robustness; no shortcut
#   long-tailed class prior           Fitzpatrick17k has 53..653 images per label     majority baseline
#
# Worked example (SynthDerm(n, seed=0, split="train")[0] at 224 px): label "pyogenic granuloma", nine
# "benign dermal", three "benign", fitzpatrick 2, looks_like "basal cell carcinoma", period 10.23 px. Its
# caption (the Stage I target) describes what was drawn, which is the BCC look:
#     colour: pink | location: face | shape: irregular | lesion type: papule | size: medium |
#     border: well-demarcated, irregular | surface: telangiectasia, central ulcer | distribution: solitary
# A caption-only classifier says BCC. The grating, though, has the pyogenic granuloma period (10.8 px
# class value x jitter 0.95) and not the BCC one (6.0 px): the only evidence for the true label is texture.
#
# Measured headroom (`python data.py headroom`, seed 0, 1,000 test images at 112 px, top-1): majority
# 0.126; colour-histogram regression 0.260; the same + radial power spectrum 0.347 (so the cue IS in the
# pixels); caption oracle 0.734 (top-3 0.922); caption + cue-period oracle 0.849. Read: a perfect Stage I
# caption gets a model to ~73 %, the last ~12 points need the implicit texture (23.5 % of test items are
# mimics), and the ceiling is near 85 %, not 100 %, because the jittered cue periods of siblings overlap.
# ---------------------------------------------------------------------------------------------------
ZOOM = 1.3              # lesion diameters are ZOOM * the class table's "size" fraction of the image
P_MIMIC = 0.25          # probability that a sample borrows a cluster sibling's explicit look
CUE_AMPLITUDE = 0.05    # relative luminance amplitude of the implicit grating (faint on purpose)

# Fitzpatrick17k's Scale AI skin-type distribution (types I..VI, unknowns dropped) as SynthDerm's prior:
# the CSV's `fitzpatrick_scale` counts, i.e. 18 / 29 / 20 / 17 / 9 / 4 %. Keeping the real imbalance keeps
# the real problem: types V-VI are 13 % of the data, so a model sees dark skin rarely and (as Groh et al.
# found on the real images) is less accurate there. Pass skin_types=(1, 2) to reproduce their a12 holdout.
SKIN_TYPE_PRIOR = np.array([2947, 4808, 3308, 2781, 1533, 635], dtype=np.float64)
SKIN_TYPE_PRIOR /= SKIN_TYPE_PRIOR.sum()
# Base sRGB of skin types I..VI (before jitter, mottling and lighting).
SKIN_RGB = np.array([(244, 214, 190), (232, 190, 160), (208, 160, 120), (176, 124, 88), (124, 82, 56),
                     (78, 50, 36)], dtype=np.float32)

# Lesion colours are defined RELATIVE to the local skin, per channel c in (R, G, B):
#     lesion_c = skin_c * mult_c + add_c        (then clipped to [0, 255] when the image is stored)
# Erythema therefore turns dark red-brown and low-contrast on types V-VI (the real failure mode of derm
# models), while the near-absolute colours (white, black, blue-gray) keep a small skin term and stay
# high-contrast. Worked numbers for "erythematous" (mult (1, .55, .55), add (28, 0, 0)):
#     type I  skin (244, 214, 190) -> (272 -> 255, 118, 105): difference (11, -96, -85), length ~129
#     type VI skin ( 78,  50,  36) -> (106, 28, 20):          difference (28, -22, -16), length ~39
# so the same disease is ~3x less visible on type VI. "white" (vitiligo) does the opposite: (242, 232, 220)
# on type I is a difference of length ~35, (217, 208, 197) on type VI one of ~265. That is the real
# asymmetry: vitiligo is easy on dark skin and hard on light skin, erythema the reverse.
# The multipliers were tuned by eye on all six skin types: reds keep the R channel and cut G/B (more blood,
# same melanin); browns scale all channels down with B most (more melanin); violaceous adds blue; pearly
# and white are mostly absolute (scattering, not pigment); skin-coloured lesions are only visible through
# their elevation shading, exactly as in real photos of neurofibromas.
COLOUR_RULES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "erythematous": ((1.00, 0.55, 0.55), (28, 0, 0)),
    "salmon": ((1.00, 0.74, 0.62), (22, 10, 0)),
    "pink": ((1.00, 0.82, 0.84), (18, 0, 6)),
    "violaceous": ((0.72, 0.50, 0.74), (12, 0, 26)),
    "brown": ((0.64, 0.48, 0.38), (0, 0, 0)),
    "dark brown": ((0.40, 0.28, 0.22), (0, 0, 0)),
    "black": ((0.10, 0.08, 0.08), (28, 22, 22)),
    "blue-gray": ((0.20, 0.22, 0.26), (80, 90, 108)),
    "white": ((0.15, 0.15, 0.15), (205, 200, 192)),
    "yellow": ((0.80, 0.76, 0.45), (45, 38, 0)),
    "pearly": ((0.55, 0.55, 0.55), (105, 98, 98)),
    "skin-coloured": ((1.00, 0.97, 0.97), (0, 0, 0)),
}


def _c(*pairs):
    """Helper for the class table: _c(("a", "b"), .5, ("c",), .5) -> [(("a", "b"), .5), (("c",), .5)]."""
    return [(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]


# Class rules. Keys: cluster, prior (long-tailed like Fitzpatrick17k), morph (lesion type), shape,
# count range, dist (distribution), size (lesion diameter as a fraction of the image), colours (each a
# tuple of 1-3 colours with its probability), sharp (border sharpness range, >= 0.55 = well-demarcated),
# irreg (border irregularity range, >= 0.2 = irregular), surface (independent Bernoulli per feature),
# location (body-site prior, rendered through context cues), period (implicit grating period in pixels at
# 224 px; scaled with the image size). Values follow a prototype whose difficulty was measured (see
# headroom), except that the implicit periods are doubled (so the cue survives at 112 px) and the largest
# lesion counts are capped a little lower (render speed).
#
# The periods form one ladder, 6.0 / 7.0 / 8.0 / 9.4 / 10.8 px (plus 6.4, 8.4, 9.6), and each cluster
# spreads its members over it: A = psoriasis 6.0, actinic keratosis 7.0, eczema 8.0, urticaria 9.4,
# mycosis fungoides 10.8; B = nevus 6.0, dermatofibroma 7.0, melanoma 8.0, halo nevus 9.4, seborrheic
# keratosis 10.8; C = basal cell carcinoma 6.0, squamous cell carcinoma 8.4, pyogenic granuloma 10.8.
# Neighbouring rungs differ by ~15 % (0.15 in log period) while the per-image jitter has a log-sd of 0.1,
# so the period alone separates two NEIGHBOURING siblings with error ~ Phi(-0.15 / 2 / 0.1) = Phi(-0.75)
# ~ 23 %, and distant ones almost always: informative, never a free answer. Classes in different
# clusters may share a period, since there the explicit look already separates them.
CLASS_RULES: dict[str, dict] = {
    # Cluster A (red, scaly). Psoriasis: sharply bordered salmon-red plaques with coarse silvery scale on
    # extensor limbs and scalp. Its siblings share the red colours, so the scale type carries the signal.
    "psoriasis": dict(
        cluster="A", prior=0.121, morph={"plaque": .8, "patch": .2}, shape={"round": .4, "oval": .3, "irregular": .3},
        count=(1, 8), dist={"scattered": .7, "clustered": .3}, size=(0.08, 0.3),
        colours=_c(("erythematous",), .5, ("salmon",), .3, ("pink",), .2), sharp=(0.4, 1.0), irreg=(0.05, 0.4),
        surface={"coarse silvery scale": .6, "fine scale": .3, "crust": .05},
        location={"limb": .45, "scalp": .3, "trunk": .25}, period=6.0),
    # Eczema: ill-defined red patches with fine scale, crust and scratch marks; borders are the tell.
    "eczema": dict(
        cluster="A", prior=0.081, morph={"patch": .5, "plaque": .5}, shape={"irregular": .6, "oval": .4},
        count=(1, 6), dist={"clustered": .6, "scattered": .4}, size=(0.1, 0.35),
        colours=_c(("erythematous",), .5, ("pink",), .3, ("salmon",), .2), sharp=(0.1, 0.65), irreg=(0.15, 0.5),
        surface={"fine scale": .6, "coarse silvery scale": .15, "crust": .3, "excoriations": .35},
        location={"limb": .45, "face": .2, "trunk": .2, "palm or sole": .15}, period=8.0),
    # Cluster D (violaceous). Lichen planus: many small flat-topped polygonal violaceous papules, white
    # reticulate lines (Wickham striae), often in lines (Koebner) on wrists and shins.
    "lichen planus": dict(
        cluster="D", prior=0.081, morph={"papule": .8, "plaque": .2}, shape={"polygonal": .6, "round": .4},
        count=(4, 20), dist={"clustered": .6, "linear": .25, "scattered": .15}, size=(0.02, 0.08),
        colours=_c(("violaceous",), .65, ("dark brown",), .2, ("pink",), .15), sharp=(0.55, 1.0), irreg=(0.05, 0.3),
        surface={"reticulate white lines": .5, "fine scale": .25},
        location={"limb": .6, "trunk": .25, "palm or sole": .15}, period=6.4),
    # Singleton F. Vitiligo: depigmented white patches; high contrast on dark skin, faint on type I.
    "vitiligo": dict(
        cluster="F", prior=0.051, morph={"patch": .7, "macule": .3}, shape={"irregular": .6, "oval": .4},
        count=(1, 4), dist={"scattered": 1.0}, size=(0.06, 0.4),
        colours=_c(("white",), .85, ("white", "pink"), .15), sharp=(0.55, 1.0), irreg=(0.2, 0.6),
        surface={}, location={"face": .35, "limb": .35, "trunk": .3}, period=8.0),
    # Urticaria: transient pink wheals, often annular with a pale centre; no scale.
    "urticaria": dict(
        cluster="A", prior=0.051, morph={"wheal": 1.0}, shape={"annular": .4, "irregular": .4, "round": .2},
        count=(1, 7), dist={"scattered": 1.0}, size=(0.08, 0.3),
        colours=_c(("pink",), .6, ("erythematous",), .25, ("salmon",), .15), sharp=(0.3, 0.8), irreg=(0.2, 0.6),
        surface={"pale centre": .6}, location={"trunk": .5, "limb": .5}, period=9.4),
    # Cluster E (many small papules). Acne: follicular red papules with pustules and comedones, face/trunk.
    "acne vulgaris": dict(
        cluster="E", prior=0.061, morph={"papule": 1.0}, shape={"round": 1.0},
        count=(6, 24), dist={"follicular": .7, "scattered": .3}, size=(0.015, 0.045),
        colours=_c(("erythematous",), .7, ("pink",), .3), sharp=(0.3, 0.75), irreg=(0.0, 0.2),
        surface={"pustules": .6, "comedones": .5}, location={"face": .7, "trunk": .3}, period=6.4),
    # Neurofibromatosis: soft skin-coloured to pink dome-shaped nodules scattered over the trunk.
    "neurofibromatosis": dict(
        cluster="E", prior=0.040, morph={"nodule": .6, "papule": .4}, shape={"round": .7, "oval": .3},
        count=(3, 14), dist={"scattered": 1.0}, size=(0.025, 0.09),
        colours=_c(("skin-coloured",), .5, ("pink",), .3, ("brown",), .2), sharp=(0.3, 0.75), irreg=(0.0, 0.15),
        surface={}, location={"trunk": .7, "limb": .3}, period=10.8),
    # Singleton G. Ichthyosis: no discrete lesion; the whole field carries polygonal fish-scale plates.
    "ichthyosis vulgaris": dict(
        cluster="G", prior=0.030, morph={"patch": 1.0}, shape={"polygonal": 1.0},
        count=(1, 1), dist={"generalized": 1.0}, size=(1.0, 1.0),
        colours=_c(("skin-coloured",), .5, ("brown",), .5), sharp=(0.0, 0.0), irreg=(0.0, 0.0),
        surface={"fish-scale": 1.0, "fine scale": .4}, location={"limb": .7, "trunk": .3}, period=8.0),
    # Cluster B (brown, solitary). Seborrheic keratosis: stuck-on brown warty plaque with horn cysts.
    "seborrheic keratosis": dict(
        cluster="B", prior=0.040, morph={"plaque": .7, "papule": .3}, shape={"oval": .5, "round": .3, "irregular": .2},
        count=(1, 4), dist={"scattered": .6, "solitary": .4}, size=(0.05, 0.18),
        colours=_c(("brown",), .35, ("dark brown",), .35, ("brown", "dark brown"), .2, ("black",), .1),
        sharp=(0.6, 1.0), irreg=(0.05, 0.35), surface={"verrucous": .7, "horn cysts": .5},
        location={"trunk": .6, "face": .25, "scalp": .15}, period=10.8),
    # Milia: tiny white-yellow keratin cysts clustered on the face.
    "milia": dict(
        cluster="E", prior=0.030, morph={"papule": 1.0}, shape={"round": 1.0},
        count=(2, 12), dist={"clustered": .7, "scattered": .3}, size=(0.012, 0.03),
        colours=_c(("white",), .5, ("yellow",), .3, ("skin-coloured",), .2), sharp=(0.6, 1.0), irreg=(0.0, 0.1),
        surface={}, location={"face": .9, "trunk": .1}, period=8.4),
    # Dermatofibroma: firm brown-pink papule on the legs, often with a central white scar-like patch.
    "dermatofibroma": dict(
        cluster="B", prior=0.030, morph={"papule": 1.0}, shape={"round": .6, "oval": .4},
        count=(1, 1), dist={"solitary": 1.0}, size=(0.04, 0.12),
        colours=_c(("brown",), .45, ("pink",), .3, ("brown", "pink"), .25), sharp=(0.3, 0.8), irreg=(0.0, 0.2),
        surface={"central white scar-like patch": .6, "depigmented halo": .05},
        location={"limb": .85, "trunk": .15}, period=7.0),
    # Cluster C (red / pearly nodule). Pyogenic granuloma: glistening bright red nodule with a collarette,
    # bleeds and crusts; fingers, lips, face.
    "pyogenic granuloma": dict(
        cluster="C", prior=0.030, morph={"nodule": .8, "papule": .2}, shape={"round": .7, "oval": .3},
        count=(1, 1), dist={"solitary": 1.0}, size=(0.05, 0.15),
        colours=_c(("erythematous",), .7, ("violaceous",), .15, ("pink",), .15), sharp=(0.7, 1.0), irreg=(0.0, 0.25),
        surface={"glistening": .7, "collarette": .5, "crust": .25, "central ulcer": .1},
        location={"limb": .4, "face": .3, "palm or sole": .3}, period=10.8),
    # Nevocytic nevus: small, round, evenly brown, regular border: the benign baseline melanoma mimics.
    "nevocytic nevus": dict(
        cluster="B", prior=0.040, morph={"macule": .5, "papule": .5}, shape={"round": .6, "oval": .4},
        count=(1, 3), dist={"solitary": 1.0}, size=(0.03, 0.14),
        colours=_c(("brown",), .4, ("dark brown",), .3, ("brown", "dark brown"), .25, ("brown", "black"), .05),
        sharp=(0.5, 1.0), irreg=(0.0, 0.4), surface={"depigmented halo": .03},
        location={"trunk": .5, "limb": .3, "face": .2}, period=6.0),
    # Halo nevus: a brown nevus inside a depigmented halo, on the trunk.
    "halo nevus": dict(
        cluster="B", prior=0.030, morph={"papule": .7, "macule": .3}, shape={"round": .7, "oval": .3},
        count=(1, 1), dist={"solitary": 1.0}, size=(0.03, 0.1),
        colours=_c(("brown",), .6, ("pink",), .25, ("dark brown",), .15), sharp=(0.5, 1.0), irreg=(0.0, 0.25),
        surface={"depigmented halo": .85}, location={"trunk": .8, "limb": .2}, period=9.4),
    # Basal cell carcinoma: pearly translucent nodule with telangiectasia and a rolled border, face.
    "basal cell carcinoma": dict(
        cluster="C", prior=0.061, morph={"nodule": .6, "papule": .4}, shape={"round": .5, "oval": .3, "irregular": .2},
        count=(1, 1), dist={"solitary": 1.0}, size=(0.05, 0.18),
        colours=_c(("pearly",), .6, ("pink",), .15, ("pearly", "dark brown"), .15, ("erythematous",), .1),
        sharp=(0.5, 1.0), irreg=(0.05, 0.35),
        surface={"telangiectasia": .65, "rolled border": .55, "central ulcer": .3, "glistening": .35},
        location={"face": .8, "trunk": .2}, period=6.0),
    # Squamous cell carcinoma: red keratotic nodule or plaque, thick scale, crust, ulcer; sun-exposed.
    "squamous cell carcinoma": dict(
        cluster="C", prior=0.061, morph={"nodule": .5, "plaque": .5}, shape={"irregular": .5, "round": .3, "oval": .2},
        count=(1, 1), dist={"solitary": 1.0}, size=(0.07, 0.22),
        colours=_c(("erythematous",), .6, ("pink",), .3, ("salmon",), .1), sharp=(0.2, 0.7), irreg=(0.15, 0.5),
        surface={"thick keratotic scale": .6, "crust": .4, "central ulcer": .35, "telangiectasia": .05},
        location={"face": .4, "scalp": .2, "limb": .4}, period=8.4),
    # Actinic keratosis: rough, ill-defined red macules/papules with fine scale on face and scalp (cluster A).
    "actinic keratosis": dict(
        cluster="A", prior=0.040, morph={"macule": .5, "papule": .5}, shape={"irregular": .5, "oval": .3, "round": .2},
        count=(1, 10), dist={"scattered": 1.0}, size=(0.03, 0.09),
        colours=_c(("erythematous",), .55, ("pink",), .3, ("brown",), .15), sharp=(0.1, 0.5), irreg=(0.15, 0.45),
        surface={"fine scale": .7, "thick keratotic scale": .15},
        location={"face": .5, "scalp": .4, "limb": .1}, period=7.0),
    # Melanoma (ABCD rule): Asymmetric, irregular Border, several Colours (brown, black, blue-gray, red,
    # white), large Diameter. Amelanotic pink cases (20 %) mimic the red clusters on purpose.
    "melanoma": dict(
        cluster="B", prior=0.061, morph={"macule": .4, "papule": .3, "plaque": .3},
        shape={"irregular": .6, "oval": .25, "round": .15}, count=(1, 1), dist={"solitary": 1.0}, size=(0.06, 0.24),
        colours=_c(("dark brown",), .1, ("brown", "dark brown"), .15, ("brown", "dark brown", "black"), .25,
                   ("brown", "black", "blue-gray"), .15, ("dark brown", "erythematous", "white"), .15,
                   ("pink", "erythematous"), .2),
        sharp=(0.25, 0.95), irreg=(0.15, 0.6),
        surface={"central ulcer": .05, "depigmented halo": .08, "glistening": .05},
        location={"trunk": .45, "limb": .4, "face": .1, "palm or sole": .05}, period=8.0),
    # Kaposi sarcoma: violaceous oval macules to nodules along skin lines of the legs (cluster D).
    "kaposi sarcoma": dict(
        cluster="D", prior=0.030, morph={"macule": .3, "plaque": .4, "nodule": .3}, shape={"oval": .6, "round": .4},
        count=(1, 10), dist={"linear": .4, "scattered": .6}, size=(0.04, 0.12),
        colours=_c(("violaceous",), .6, ("dark brown",), .25, ("erythematous",), .15), sharp=(0.4, 0.85),
        irreg=(0.05, 0.3), surface={}, location={"limb": .7, "trunk": .2, "palm or sole": .1}, period=9.6),
    # Mycosis fungoides (cutaneous T-cell lymphoma): large salmon arcuate patches with fine scale and
    # cigarette-paper atrophy on covered trunk skin; the classic eczema/psoriasis mimic (cluster A).
    "mycosis fungoides": dict(
        cluster="A", prior=0.030, morph={"patch": .6, "plaque": .4},
        shape={"arcuate": .4, "irregular": .4, "annular": .2},
        count=(1, 5), dist={"scattered": .8, "clustered": .2}, size=(0.15, 0.4),
        colours=_c(("salmon",), .4, ("erythematous",), .3, ("pink",), .15, ("violaceous",), .15),
        sharp=(0.2, 0.75), irreg=(0.2, 0.6),
        surface={"fine scale": .5, "coarse silvery scale": .1, "wrinkled atrophy": .4},
        location={"trunk": .7, "limb": .3}, period=10.8),
}
SYNTH_LABELS: tuple[str, ...] = tuple(CLASS_RULES)
# Confusable clusters: visual siblings (mimicry happens only inside a cluster). F and G are singletons,
# so vitiligo and ichthyosis are never mimics: the control classes that a caption alone solves.
# Clusters keep the order of their first member in CLASS_RULES; members keep table order.
CLUSTERS: dict[str, tuple[str, ...]] = {
    rule["cluster"]: tuple(label for label in CLASS_RULES if CLASS_RULES[label]["cluster"] == rule["cluster"])
    for rule in CLASS_RULES.values()}


def reference_differential(label: str, looks_like: str | None = None, k: int = 6) -> list[str]:
    """A plausible ranked differential that starts with the truth (Stage II warm-up / reference answer).

    Order: the truth; the class it visually mimics (if any); its SynthDerm confusable-cluster siblings;
    then other labels of the same nine-group, then of the same three-group (both in TAXONOMY order, i.e.
    alphabetical). Deterministic, so a reward or an SFT warm-up target built from it is reproducible.
    """
    if label not in TAXONOMY:
        raise ValueError(f"unknown label {label!r} (not a Fitzpatrick17k label)")
    out = [label]
    if looks_like and looks_like != label:
        out.append(looks_like)
    if label in CLASS_RULES:
        out += [s for s in CLUSTERS[CLASS_RULES[label]["cluster"]] if s not in out]
    nine, three = TAXONOMY[label]
    # Prefer SynthDerm classes inside a group (they are the ones a SynthDerm model can actually see).
    same_nine = sorted((l for l, (n, _) in TAXONOMY.items() if n == nine), key=lambda l: l not in CLASS_RULES)
    same_three = sorted((l for l, (_, t) in TAXONOMY.items() if t == three), key=lambda l: l not in CLASS_RULES)
    for cand in same_nine + same_three:
        if cand not in out:
            out.append(cand)
    return out[:k]


_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
_INV_SQRT_235 = 1 / np.sqrt([2.0, 3.0, 5.0])    # harmonic k of the border radius gets amplitude ~ 1/sqrt(k)
_NOISE_TILES: dict[int, np.ndarray] = {}   # image size -> cached sensor-noise tile (see _noise_tile)


def _noise_tile(size: int) -> np.ndarray:
    """A fixed [3, size+64, size+64] Gaussian tile (sigma 2.5 levels), cropped at a random offset per image.

    Drawing fresh normal noise per image costs ~2 ms at 224 px, more than the whole rest of a render; a
    cached tile with a per-image offset looks the same to a model and keeps SynthDerm above 200 images/s.
    """
    if size not in _NOISE_TILES:
        _NOISE_TILES[size] = (np.random.default_rng(12345).standard_normal((3, size + 64, size + 64)) * 2.5
                              ).astype(np.float32)
    return _NOISE_TILES[size]


def _pick(rng: np.random.Generator, table: dict, weights=None):
    """Draw one entry of a {value: probability} table, or of a sequence with `weights` (renormalised).

    Inverse-CDF sampling with one uniform draw u ~ U[0, 1):
        pick key k* = the first k with  u * sum_j w_j  <  w_1 + ... + w_k
    so key k is chosen with probability w_k / sum_j w_j, and the weights need not sum to 1 (a subset of
    classes or skin types is renormalised for free). Plain Python is ~20x faster than
    rng.choice(p=...) on tables this small, and spec() calls it a dozen times per image. The final
    `return keys[-1]` only guards against float round-off in the running sum.
    """
    keys = list(table)
    weights = [table[k] for k in keys] if weights is None else list(weights)
    u, acc = rng.random() * sum(weights), 0.0
    for key, w in zip(keys, weights):
        acc += w
        if u < acc:
            return key
    return keys[-1]


def _mix(dst: np.ndarray, colour, weight: np.ndarray) -> None:
    """In place: dst = dst * (1 - w) + colour * w = dst + (colour - dst) * w, for dst [3, h, w], w [h, w].

    Images are channel-first inside the renderer: numpy broadcasts a [3, h, w] op over long contiguous
    rows, about 8x faster than over the trailing size-3 axis of [h, w, 3].
    """
    colour = np.asarray(colour, dtype=np.float32)
    if colour.ndim == 1:
        colour = colour[:, None, None]                     # [3, 1, 1]
    dst += (colour - dst) * weight[None]                   # [3, h, w]


def _plane_wave(xs: np.ndarray, k: float, angle: float, phase: float, fn, rows=None, cols=None) -> np.ndarray:
    """fn(k (x cos a + y sin a) + phase) on a pixel grid, fn = np.sin or np.cos, as two outer products.

    sin(A + B) = sin A cos B + cos A sin B (cos(A + B) = cos A cos B - sin A sin B) with A depending on x
    only and B on y only: 4 one-dimensional trig calls instead of one trig call per pixel.
    """
    x = xs[slice(*cols)] if cols else xs
    y = xs[slice(*rows)] if rows else xs
    A = x * np.float32(k * math.cos(angle))                               # [w]
    B = y * np.float32(k * math.sin(angle)) + np.float32(phase)           # [h]
    if fn is np.sin:
        return np.sin(B)[:, None] * np.cos(A)[None, :] + np.cos(B)[:, None] * np.sin(A)[None, :]
    return np.cos(B)[:, None] * np.cos(A)[None, :] - np.sin(B)[:, None] * np.sin(A)[None, :]


def _blob_noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Smooth random blobs in [0, 1], [h, w]: a coarse uniform grid (one value per `cell` px) upsampled
    bilinearly by PIL. Thresholding it gives flakes / cobblestones of about `cell` px."""
    h, w = shape
    grid = rng.random((max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)), dtype=np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BILINEAR))


def _relative_colour(name: str, skin: np.ndarray) -> np.ndarray:
    """Lesion colour NAME over the local skin pixels `skin` [3, ...]: lesion_c = skin_c * mult_c + add_c.

    Applied per pixel, not per image: the lesion inherits the mottling and lighting of the skin under it,
    as pigment and blood do, so a lesion on a shaded limb edge is darker than the same lesion in the light.
    """
    mult, add = COLOUR_RULES[name]
    tail = (1,) * (skin.ndim - 1)
    return skin * np.asarray(mult, np.float32).reshape(3, *tail) + np.asarray(add, np.float32).reshape(3, *tail)


@dataclass
class SynthSample:
    """One SynthDerm item. Same record shape as a Fitzpatrick17k Record plus what only a generator knows."""
    id: str                  # md5-like hex of (seed, split, index): plays the role of Fitzpatrick17k's md5hash
    label: str               # fine label (a Fitzpatrick17k label string, key of TAXONOMY)
    nine: str                # nine_partition_label
    three: str               # three_partition_label
    fitzpatrick: int         # skin type 1..6
    fields: dict[str, str]   # the 8 caption fields of what was RENDERED (Stage I target)
    looks_like: str          # the class whose explicit look was rendered (== label unless mimicry)
    period: float            # implicit grating period in pixels at this image size (never captioned)
    image: Image.Image | None = None   # PIL RGB, image_size x image_size
    mask: np.ndarray | None = None     # bool [H, W]: lesion pixels (for attention-focus metrics)
    image_path: None = None            # a generated image has no file (kept for Record compatibility)

    @property
    def caption(self) -> str:
        """The Stage I target text of this sample (format_caption of its fields)."""
        return format_caption(self.fields)


class SynthDerm:
    """SynthDerm(n, seed=0, image_size=224, split="train"): n procedurally drawn lesion images.

    sample = f(seed, split, index): item i is rendered on demand from two numpy generators seeded with
    (seed, split, i, stream), so the dataset stores nothing and any item can be reproduced on its own.
    Splits are disjoint streams ("train", "val", "test"), not slices, so growing n never moves the test set.

    Knobs: p_mimic (0 easy, 0.25 default, 0.4 hard), cue_amplitude (implicit texture strength; 0 removes
    it), skin_types (e.g. (1, 2) to train on light skin only, Groh's a12 protocol), classes (a subset).
    The knobs double as controls for the paper's ablations: with cue_amplitude=0 there is nothing beyond
    the caption to learn, so Stage II and the DVE should add nothing over Stage I (if they "help", the
    gain is noise or a shortcut); with p_mimic=0 a good caption alone nearly solves the task.

    Usage:
        ds = SynthDerm(1000, seed=0, image_size=224, split="test")
        s = ds[7]                  # rendered now; ds[7] again gives the same pixels
        s.label, s.fitzpatrick, s.fields["colour"], s.image.size, s.mask.shape
        ds.spec(7)["fields"]       # the same attributes without drawing a pixel (~20 us)
    """

    def __init__(self, n: int, seed: int = 0, image_size: int = 224, split: str = "train",
                 p_mimic: float = P_MIMIC, cue_amplitude: float = CUE_AMPLITUDE,
                 skin_types: tuple[int, ...] = (1, 2, 3, 4, 5, 6), classes: tuple[str, ...] | None = None):
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
        if int(n) < 0 or int(image_size) < 32:
            raise ValueError(f"need n >= 0 and image_size >= 32, got n={n}, image_size={image_size}")
        bad = [t for t in skin_types if t not in range(1, 7)]
        if bad or not skin_types:
            raise ValueError(f"skin_types must be a non-empty subset of 1..6, got {skin_types}")
        self.classes = tuple(classes) if classes else SYNTH_LABELS
        unknown = [c for c in self.classes if c not in CLASS_RULES]
        if unknown:
            raise ValueError(f"not SynthDerm classes: {unknown}; choose from {list(SYNTH_LABELS)}")
        # Nothing is drawn here: the dataset is a recipe, and items are rendered on demand in __getitem__.
        self.n, self.seed, self.size, self.split = int(n), int(seed), int(image_size), split
        self.p_mimic, self.cue_amplitude = float(p_mimic), float(cue_amplitude)
        self.skin_types = tuple(int(t) for t in skin_types)
        # Priors are renormalised over the chosen subsets (classes, skin types), keeping relative frequencies.
        prior = np.array([CLASS_RULES[c]["prior"] for c in self.classes])
        self._class_p = prior / prior.sum()
        tp = SKIN_TYPE_PRIOR[[t - 1 for t in self.skin_types]]
        self._type_p = tp / tp.sum()

    def __len__(self) -> int:
        return self.n

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        # Stream 0 draws the attributes (cheap, used by the caption oracle); stream 1 draws the pixels.
        return np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index, stream])

    def _index(self, index: int) -> int:
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"SynthDerm index {index} out of range for n={self.n}")
        return index

    # --- attributes -----------------------------------------------------------------------------------
    def spec(self, index: int) -> dict:
        """The attributes of item `index` without rendering it (fast: ~20 us). Keys: see SynthSample."""
        index = self._index(index)
        rng = self._rng(index, 0)
        # Draw order is part of the format: changing it changes every sample of every seed. Append new
        # draws at the end if the generator ever grows.
        label = _pick(rng, self.classes, self._class_p)
        fitz = _pick(rng, self.skin_types, self._type_p)
        siblings = [s for s in CLUSTERS[CLASS_RULES[label]["cluster"]] if s != label and s in self.classes]
        looks = label
        if rng.random() < self.p_mimic and siblings:      # mimicry: borrow a sibling's whole explicit look
            looks = siblings[int(rng.integers(len(siblings)))]
        # Every explicit attribute below comes from the LOOK's rules; only the label and the implicit period
        # stay with the true class. That is what makes an honest caption of a mimic misleading.
        rule = CLASS_RULES[looks]
        morph, shape, dist = _pick(rng, rule["morph"]), _pick(rng, rule["shape"]), _pick(rng, rule["dist"])
        colours = _pick(rng, [c for c, _ in rule["colours"]], [p for _, p in rule["colours"]])
        count = int(rng.integers(rule["count"][0], rule["count"][1] + 1))
        size = float(rng.uniform(*rule["size"]))
        sharp, irreg = float(rng.uniform(*rule["sharp"])), float(rng.uniform(*rule["irreg"]))
        surface = [name for name, p in rule["surface"].items() if rng.random() < p]
        location = _pick(rng, rule["location"])
        # One lesion is "solitary" whatever the class rule said, and "solitary" means one lesion.
        if dist == "solitary":
            count = 1
        elif count == 1 and dist != "generalized":
            dist = "solitary"
        # The implicit cue belongs to the TRUE class (not the look), with 10 % log-normal period noise:
        #     period_px = P_class * j * S / 224,    j = clip(exp(0.1 z), 0.85, 1.18),  z ~ N(0, 1)
        # S / 224 keeps the cue at the same number of cycles per image at every image size, so a model
        # trained at 112 px and one at 448 px face the same task. The clip keeps the shortest period
        # (6 px at 224) at >= 6 * 0.85 / 2 = 2.55 px at 112, above the 2 px Nyquist limit: a grating
        # finer than 2 px per cycle would alias into a different, misleading frequency. For scale: a
        # Qwen2.5-VL patch is 14 px, so one patch holds ~1.1 to ~2.7 cycles at 224 px. The cue is texture
        # INSIDE a patch, carried only by the patch embedding and the vision MLPs, which is where
        # dve.py makes the weights image-dependent.
        jitter = float(np.clip(np.exp(0.1 * rng.standard_normal()), 0.85, 1.18))
        period = CLASS_RULES[label]["period"] * jitter * self.size / 224
        # Caption words are thresholds on the drawn parameters, so the caption is a deterministic,
        # checkable function of what was rendered (tests compare them with the pixels). Size: diameter
        # fraction < 0.06 small, < 0.16 medium, else large (at 224 px and ZOOM 1.3: under ~17 px, under
        # ~47 px). Border: sharpness >= 0.55 well-demarcated (the edge ramp, 0.6 + 0.4 (1 - sharp) R px
        # wide, stays under ~0.2 R), irregularity >= 0.2 irregular (the radius wobbles by a visible share
        # of R; see _lesion).
        size_word = "small" if size < 0.06 else "medium" if size < 0.16 else "large"
        border = ("well-demarcated" if sharp >= 0.55 else "ill-defined") + ", " + \
                 ("irregular" if irreg >= 0.2 else "regular")
        fields = {"colour": ", ".join(colours), "location": location, "shape": shape, "lesion type": morph,
                  "size": size_word, "border": border, "surface": ", ".join(surface) if surface else "none",
                  "distribution": dist}
        # A stable md5-like id, so SynthDerm rows look like Fitzpatrick17k rows (md5hash) to eval.py.
        uid = hashlib.md5(f"synthderm:{self.seed}:{self.split}:{index}".encode()).hexdigest()
        nine, three = TAXONOMY[label]
        return dict(id=uid, label=label, nine=nine, three=three, fitzpatrick=fitz, fields=fields,
                    looks_like=looks, period=period, _colours=colours, _count=count, _size=size,
                    _sharp=sharp, _irreg=irreg, _surface=surface, _morph=morph, _shape=shape, _dist=dist,
                    _location=location)

    def __getitem__(self, index: int) -> SynthSample:
        # Attributes from stream 0, pixels from stream 1: spec(i) never depends on rendering, so the
        # caption oracle and tokenizer corpus can draw thousands of captions without drawing an image.
        spec = self.spec(index)
        image, mask = self._render(spec, self._rng(self._index(index), 1))
        public = {k: v for k, v in spec.items() if not k.startswith("_")}
        return SynthSample(**public, image=image, mask=mask)

    def __iter__(self) -> Iterator[SynthSample]:
        for i in range(self.n):
            yield self[i]

    # --- rendering ------------------------------------------------------------------------------------
    def _render(self, s: dict, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
        """Draw the image of spec `s`: skin + site cues, lesions, implicit cue, lighting, noise, hair.

        Everything is vectorised numpy on float32 channel-first [3, S, S] arrays; each lesion touches only
        its bounding box. Strokes too thin for a pixel grid (hairs, vessels, dots) are drawn by PIL at the
        end. Order matters for truthfulness: the site cues are laid down first (they are skin), lesions
        go on top, the implicit grating modulates lesion + surroundings, and hair covers everything, as a
        real photo would. Cost: ~4 ms at 224 px on one core (docs/data.md, "SynthDerm: speed").
        """
        S = self.size
        sc = S / 224.0                                           # pixel scale relative to the 224 px design
        xs = np.arange(S, dtype=np.float32)
        # ---- skin: base colour of the type (+-5 % jitter), palms are paler (less melanin, thicker stratum)
        skin = SKIN_RGB[s["fitzpatrick"] - 1] * np.float32(1 + 0.05 * rng.uniform(-1, 1)) \
            * (1 + 0.02 * rng.uniform(-1, 1, 3)).astype(np.float32)
        if s["_location"] == "palm or sole":
            skin = 0.55 * skin + 0.45 * np.array([236, 196, 178], np.float32)
        # Luminance field = low-frequency mottling (two oblique plane waves) + a lighting ramp: [S, S].
        f = rng.uniform(1.5, 5, 2) * (2 * np.pi / S)                     # 1.5-5 cycles per image
        a2, p = rng.uniform(0, np.pi, 2), rng.uniform(0, 2 * np.pi, 2)
        mottle = 0.5 + 0.25 * (_plane_wave(xs, f[0], a2[0], p[0], np.cos)
                               + _plane_wave(xs, f[1], a2[1], p[1], np.cos))                      # [S, S]
        a = rng.uniform(0, 2 * np.pi)                            # light direction; 4-12 % change across
        ramp = (xs[None, :] * np.float32(math.cos(a)) + xs[:, None] * np.float32(math.sin(a))) \
            * np.float32(rng.uniform(0.04, 0.12) / S)                                          # [S, S]
        # Real photos are never flat: uneven pigment and a lighting gradient keep a model from reading
        # "lesion" off any pixel that differs from one global skin colour.
        lum = 0.96 + 0.08 * mottle + ramp                       # [S, S]
        skin_mask = None                                         # [S, S] float, 1 on skin (limb: not background)
        if s["_location"] == "limb":
            # A limb crosses the frame: background at both sides, cylinder shading across it. The edges
            # wobble a little (sin) so the silhouette is not a ruler-straight band the model could key on.
            ph = rng.uniform(0, 2 * np.pi)
            left = S * (0.10 + 0.03 * np.sin(xs / S * 3 + ph))[:, None]           # [S, 1] edge per row
            right = S * (0.90 + 0.03 * np.sin(xs / S * 2.5 - ph))[:, None]
            skin_mask = np.clip(np.minimum(xs[None, :] - left, right - xs[None, :]) / 1.5, 0, 1).astype(np.float32)
            lum = lum * (0.72 + 0.28 * np.sin(np.pi * np.clip((xs[None, :] - left) / (right - left), 0, 1)))
        img = skin[:, None, None] * lum[None]                    # [3, S, S] channel-first
        # ---- body-site context cues. The caption's `location` is rendered, not just stated: the face
        # shows pores, the scalp dense hair, a limb its two edges against a background and hair running
        # along it, palms/soles flexion creases and no hair, the trunk sparse hair in all directions.
        if s["_location"] == "face":
            # Pores: many one-pixel dark dots.
            k = int(S * S / 70)
            img[:, rng.integers(0, S, k), rng.integers(0, S, k)] *= 0.86
        elif s["_location"] == "palm or sole":
            # Flexion creases: a few long soft dark curves (drawn on a grey layer, then multiplied in, so
            # they darken whatever skin tone lies below instead of painting one fixed colour).
            layer = Image.new("L", (S, S), 0)
            d = ImageDraw.Draw(layer)
            for _ in range(int(rng.integers(3, 6))):
                y0, y1 = rng.uniform(0, S, 2)
                pts = [(x, y0 + (y1 - y0) * x / S + 0.08 * S * np.sin(x / S * 3 + y0)) for x in np.linspace(0, S, 9)]
                d.line(pts, fill=255, width=max(1, round(1.5 * sc)))
            img *= (1 - 0.28 / 255 * np.asarray(layer, np.float32))[None]
        if skin_mask is not None:                                # dark cloth behind the limb (edge columns only)
            e = int(0.14 * S) + 2
            for cols in (slice(0, e), slice(S - e, S)):
                _mix(img[:, :, cols], (34, 40, 52), 1 - skin_mask[:, cols])

        # ---- lesions. mask collects the lesion pixels (alpha > 0.5) for attention metrics and tests;
        # strokes are thin features PIL draws better than a numpy field (anti-aliasing is not needed).
        mask = np.zeros((S, S), bool)
        cue_w = np.zeros((S, S), np.float32)                     # where the implicit grating lives (generalized)
        strokes: list[tuple] = []                                # ("line"|"dot", geometry, rgb) drawn by PIL
        if s["_dist"] == "generalized":
            self._generalized(s, rng, img, mask, cue_w, skin_mask)
        else:
            for cx, cy, R in self._layout(s, rng, skin_mask):
                self._lesion(s, rng, img, mask, strokes, cx, cy, R, skin_mask)
            if "comedones" in s["_surface"]:                     # open comedones: dark dots between papules
                for _ in range(max(2, s["_count"] // 2)):
                    cx, cy = rng.uniform(0.08 * S, 0.92 * S, 2)
                    strokes.append(("dot", (cx, cy, max(0.8, 1.2 * sc)), (45, 36, 30)))

        # ---- implicit cue: faint grating, class-specific period, random orientation/phase, never captioned
        # It lives on the lesion AND a perilesional zone ~5 % of the image wide (a box blur of the mask), so
        # even a 3 px acne papule carries a few periods of it at 112 px. Multiplicative luminance modulation:
        #     I'(x, y) = I(x, y) * (1 + A * w(x, y) * sin(2 pi / P * (x cos th + y sin th) + phase))
        # with A = cue_amplitude (0.05: +-5 %, about +-6 grey levels on mid skin, comparable to the slow
        # +-4 % mottling and a few times the sensor noise's sigma of 2.5, so it is there when looked for
        # and easy to overlook), w the lesion-and-surround weight in [0, 1] and P the period. A
        # random angle and phase mean no fixed pixel pattern can be memorised: only the spatial FREQUENCY
        # carries the class, which is what _spectrum_features (headroom) and a vision encoder must detect.
        amp = self.cue_amplitude
        th, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        if amp > 0 and mask.any():
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            rad = max(1, round(0.05 * S))
            r0, r1 = max(rows[0] - rad - 1, 0), min(rows[-1] + rad + 2, S)     # bounding box of the cue
            c0, c1 = max(cols[0] - rad - 1, 0), min(cols[-1] + rad + 2, S)
            if s["_dist"] != "generalized":
                crop = Image.fromarray(mask[r0:r1, c0:c1].astype(np.uint8) * 255)
                blur = np.asarray(crop.filter(ImageFilter.BoxBlur(rad)), np.float32)
                cue_w[r0:r1, c0:c1] = np.minimum(blur * np.float32(3 / 255), 1)   # [h, w], 1 on and near lesions
                if skin_mask is not None:
                    cue_w *= skin_mask
            wave = _plane_wave(xs, 2 * np.pi / s["period"], th, phase, np.sin, rows=(r0, r1), cols=(c0, c1))
            img[:, r0:r1, c0:c1] *= (1 + amp * cue_w[r0:r1, c0:c1] * wave)[None]   # [3, h, w]
        # ---- sensor noise (cached tile, random offset): breaks exact colour equality between pixels, so
        # no model can segment the lesion by testing for the one skin colour.
        ox, oy = rng.integers(0, 64, 2)
        img += _noise_tile(S)[:, oy:oy + S, ox:ox + S]
        planes = np.clip(img, 0, 255, out=img).astype(np.uint8)   # [3, S, S]; merge avoids a slow transpose
        out = Image.merge("RGB", [Image.fromarray(p) for p in planes])

        # ---- thin strokes: vessels, scratches, dots; then hairs (site cue) on top of everything
        d = ImageDraw.Draw(out)
        for kind, geo, rgb in strokes:
            if kind == "line":
                d.line(geo, fill=rgb, width=max(1, round(sc)))
            else:
                x, y, r = geo
                d.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
        # Hair: a site cue (dense on scalp, along a limb, sparse on the trunk) and an occluder that
        # real dermatology photos are full of. Light hair on light skin half of the time.
        n_hair = {"scalp": 70, "limb": 22, "trunk": 8}.get(s["_location"], 0)
        if n_hair:
            dark = s["fitzpatrick"] >= 3 or rng.random() < 0.5
            hair_rgb = (32, 26, 22) if dark else (120, 92, 60)
            axis = rng.uniform(0, np.pi) if s["_location"] != "limb" else np.pi / 2   # limb hair runs along it
            x, y = rng.uniform(0, S - 1, (2, n_hair))
            ang = axis + rng.normal(0, 0.35 if s["_location"] != "trunk" else 1.5, n_hair)
            half_len = 0.5 * S * rng.uniform(0.06, 0.16, n_hair)
            ang2 = ang + rng.normal(0, 0.25, n_hair)             # a slight bend half way
            mx, my = x + half_len * np.cos(ang), y + half_len * np.sin(ang)
            ex, ey = mx + half_len * np.cos(ang2), my + half_len * np.sin(ang2)
            keep = np.ones(n_hair, bool) if skin_mask is None else skin_mask[y.astype(int), x.astype(int)] > 0.5
            for i in np.flatnonzero(keep).tolist():
                d.line([(x[i], y[i]), (mx[i], my[i]), (ex[i], ey[i])], fill=hair_rgb, width=1)
        return out, mask

    def _layout(self, s: dict, rng: np.random.Generator, skin_mask) -> list[tuple[float, float, float]]:
        """Lesion centres and radii for the distribution: solitary, scattered, clustered, linear, follicular.

        solitary: one lesion near the centre (how a clinician frames a single lesion); clustered: a
        Gaussian cloud around one point; linear: jittered points along a random line (Koebner, lymphatic
        spread); scattered / follicular: uniform. Sizes vary +-20 % around the spec's base radius.
        """
        S, n, dist = self.size, s["_count"], s["_dist"]
        # Centres stay 10 % inside the frame (20 % on a limb, whose skin band is narrower) so lesions are
        # seen whole; clipping below enforces it for the Gaussian and linear layouts too.
        R0 = max(1.6, 0.5 * ZOOM * s["_size"] * S)                # base radius in pixels
        lo, hi = 0.1 * S, 0.9 * S
        if skin_mask is not None:
            lo, hi = 0.2 * S, 0.8 * S                            # stay on the limb
        if dist == "solitary":
            c = rng.uniform(0.35 * S, 0.65 * S, (1, 2))
        elif dist == "clustered":
            centre = rng.uniform(0.3 * S, 0.7 * S, 2)
            c = centre + rng.normal(0, 0.06 * S + R0, (n, 2))
        elif dist == "linear":
            p0, ang = rng.uniform(0.3 * S, 0.7 * S, 2), rng.uniform(0, np.pi)
            t = np.linspace(-0.35 * S, 0.35 * S, n)[:, None] + rng.normal(0, 0.01 * S, (n, 1))
            c = p0 + t * np.array([np.cos(ang), np.sin(ang)]) + rng.normal(0, 0.012 * S, (n, 2))
        else:   # scattered / follicular: uniform over the frame
            c = rng.uniform(lo, hi, (n, 2))
        c = np.clip(c, lo, hi)
        radii = R0 * rng.uniform(0.8, 1.2, len(c))
        return [(float(x), float(y), float(r)) for (x, y), r in zip(c, radii)]

    def _lesion(self, s, rng, img, mask, strokes, cx, cy, R, skin_mask) -> None:
        """Render one lesion of radius R (px) centred at (cx, cy) into img and mask, in its bounding box.

        The outline is a radius function of the angle theta (in the lesion's rotated frame):
            R(theta) = R + sum_{k in 2, 3, 5} a_k cos(k theta + phi_k),   a_k = U(0.2, 1) 0.45 R irreg / sqrt(k)
        Low harmonics only: k = 2 squashes, 3 and 5 make the lobes and notches of an irregular border (the
        "B" of the melanoma ABCD rule); 1 / sqrt(k) keeps the finer wiggles smaller, like real outlines.
        Polygons multiply by the n-gon radius cos(pi / n) / cos((theta mod 2 pi / n) - pi / n), n = 5..7
        (the flat-topped polygonal papules of lichen planus). Opacity from the signed distance:
            d = rho - R(theta)  (< 0 inside),   alpha = clip(0.5 - d / soft, 0, 1),
            soft = 0.6 + 0.4 (1 - sharp) R  px
        so sharp = 1 gives a sub-pixel edge and an ill-defined one fades over a good part of the radius, which
        is what "well-demarcated" vs "ill-defined" means clinically (psoriasis vs eczema).
        """
        S = self.size
        shape = s["_shape"]
        rot = rng.uniform(0, np.pi)
        harm = rng.uniform(0.2, 1.0, 3) * (R * s["_irreg"] * 0.45) * _INV_SQRT_235   # harmonic amplitudes
        hph = rng.uniform(0, 2 * np.pi, 3)
        soft = 0.6 + (1 - s["_sharp"]) * 0.4 * R                  # edge width: sharp border -> ~1 px
        # Bounding box: radius + the largest harmonic bulge + the soft edge + room for a halo/collarette/shadow.
        extra = 0.6 * R + 2 if "depigmented halo" in s["_surface"] else 0.25 * R + 1
        half = R + float(harm.sum()) + 0.5 * soft + extra + 1
        if shape == "polygonal":
            half += 0.3 * R
        x0, x1 = max(int(cx - half), 0), min(int(cx + half) + 1, S)
        y0, y1 = max(int(cy - half), 0), min(int(cy + half) + 1, S)
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)      # [1, w]
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)      # [h, 1]
        c, sn = np.float32(math.cos(rot)), np.float32(math.sin(rot))
        u = dx * c + dy * sn                                      # [h, w] rotated frame
        v = dy * c - dx * sn
        if shape == "oval":
            v = v * np.float32(1 / rng.uniform(0.5, 0.75))                     # squash one axis
        rho = np.sqrt(u * u + v * v)                              # [h, w] distance from the centre
        Rth = np.float32(R)
        # theta is only needed for a non-round outline: harmonics whose total bulge stays under 0.3 px
        # cannot move an edge pixel visibly, so round regular lesions skip the arctan2 (a big share of
        # the cost of small lesions).
        if float(harm.sum()) > 0.3 or shape in ("polygonal", "arcuate"):
            theta = np.arctan2(v, u)
            Rth = np.full_like(rho, R)
            for k, a, p in zip((2, 3, 5), harm, hph):             # irregular border: a few harmonics
                Rth += np.float32(a) * np.cos(k * theta + np.float32(p))
        if shape == "polygonal":
            n = int(rng.integers(5, 8))
            Rth *= math.cos(math.pi / n) / np.cos(np.mod(theta, 2 * math.pi / n) - math.pi / n)
        d = rho - Rth                                             # < 0 inside the lesion
        alpha = np.clip(0.5 - d / soft, 0, 1)                     # [h, w] lesion opacity
        if shape in ("annular", "arcuate"):                       # a ring: clear the centre
            alpha *= np.clip(0.5 + (rho - 0.58 * Rth) / soft, 0, 1)
            if shape == "arcuate":                                # ... and keep only a ~220 degree arc
                alpha *= np.clip((np.cos(theta - rng.uniform(0, 2 * np.pi)) + 0.35) * 3, 0, 1)
        if skin_mask is not None:
            alpha *= skin_mask[y0:y1, x0:x1]
        # Work on a view of the bounding box: every edit below lands in the image directly, and the cost
        # is proportional to the lesion's area, not to the image's.
        local = img[:, y0:y1, x0:x1]                              # [3, h, w] view: edits land in img
        surf = s["_surface"]
        base = local                                              # skin under the lesion (read before edits)
        if "depigmented halo" in surf:                            # depigmented ring around the lesion
            _mix(local, _relative_colour("white", base), 0.85 * np.clip(1 - d / (0.55 * R + 2), 0, 1) * (d > -soft))
        # ---- colour(s): one, or variegated regions split by a smooth random field. Variegation (several
        # colours in one lesion) is the "C" of the melanoma ABCD rule, so it must be visible as regions.
        cols = s["_colours"]
        target = _relative_colour(cols[0], base)
        if len(cols) > 1:
            f = np.sin(dx * rng.uniform(0.5, 1.5) / R * 2.5 + dy * rng.uniform(-1, 1) / R * 2.5 + rng.uniform(0, 6)) \
                + 0.6 * np.sin(dy * rng.uniform(0.5, 1.5) / R * 3 + rng.uniform(0, 6))           # [h, w]
            region = np.digitize(f, (0.0,) if len(cols) == 2 else (-0.55, 0.55))    # [h, w] colour index
            for j, name in enumerate(cols[1:], start=1):
                sel = region == j
                target[:, sel] = _relative_colour(name, base[:, sel])
        if surf:
            interior = np.clip(-d / (0.15 * R + 1), 0, 1) * alpha  # [h, w] away from the edge
        # ---- surface features (each one rendered exactly when it is captioned). Each is confined to the
        # lesion (interior weight) except halo/collarette which by definition lie just outside it; the
        # textures are crude on purpose, recognisable at 112 px rather than photographic.
        if "pale centre" in surf:                                 # oedematous wheal: centre fades to skin
            _mix(target, base * 1.04, 0.7 * np.clip(1 - rho / (0.5 * Rth), 0, 1))
        if "central white scar-like patch" in surf:               # dermatofibroma: fibrotic white centre
            _mix(target, _relative_colour("white", base), 0.65 * np.clip((0.38 * R - rho) / 1.5, 0, 1))
        if "coarse silvery scale" in surf:                        # psoriasis: big opaque silver flakes
            b = max(1, round(R / 6))
            flakes = _blob_noise(rng, target.shape[1:], b)
            _mix(target, (222, 222, 228), interior * (flakes > 0.45) * 0.75)
        if "fine scale" in surf:                                  # eczema / AK: speckled light dusting
            _mix(target, (236, 230, 224), interior * (rng.random(rho.shape, dtype=np.float32) > 0.55) * 0.32)
        if "thick keratotic scale" in surf:                       # SCC: yellow-white horn over the centre
            b = max(1, round(R / 5))
            blocks = _blob_noise(rng, target.shape[1:], b)
            _mix(target, (226, 214, 168), (0.55 + 0.35 * blocks) * np.clip((0.65 * Rth - rho) / 2, 0, 1))
        if "verrucous" in surf:                                   # warty cobblestone brightness
            b = max(1, round(R / 7))
            cob = _blob_noise(rng, target.shape[1:], b)
            target *= (1 + 0.45 * (cob - 0.5) * interior)[None]
        if "reticulate white lines" in surf:                      # Wickham striae: a lacy white net
            w = 2 * np.pi / max(3.0, 0.5 * R)
            net = np.abs(np.sin(dx * w + dy * 0.4 * w) * np.sin(dy * w - dx * 0.3 * w)) < 0.22
            _mix(target, (235, 232, 236), interior * net * 0.55)
        if "wrinkled atrophy" in surf:                            # cigarette-paper wrinkles, wavy lines
            w = 2 * np.pi / max(2.5, 0.18 * R)
            lines = np.sin(u * w + 1.5 * np.sin(v * 0.15)) > 0.75
            target *= (1 - 0.14 * lines * interior)[None]
        if "crust" in surf:                                       # dried serum: yellow-brown blobs
            blob = np.sin(dx * 3 / R + rng.uniform(0, 6)) + np.sin(dy * 3 / R + rng.uniform(0, 6)) > 0.9
            _mix(target, (150, 96, 42), interior * blob * 0.8)
        if "central ulcer" in surf:                               # dark red base with a yellow fibrin rim
            _mix(target, (205, 185, 125), np.clip((0.4 * R - rho) / 1.2, 0, 1))     # fibrin rim
            _mix(target, (112, 32, 32), 0.9 * np.clip((0.3 * R - rho) / 1.2, 0, 1))
        if "rolled border" in surf:                               # BCC: pearly raised rim just inside edge
            _mix(target, (238, 226, 226), 0.5 * np.clip(1 - np.abs(d + 0.14 * R) / (0.1 * R + 0.8), 0, 1))
        # ---- elevation: dome shading lit from the upper left (flat lesions get none). This is how the
        # caption's lesion type (macule/patch flat vs papule/nodule/plaque raised) becomes visible.
        lift = {"papule": 0.14, "nodule": 0.26, "plaque": 0.07, "wheal": 0.06}.get(s["_morph"], 0.0)
        if lift:
            dome = np.clip(1 - rho / (Rth + 1e-3), 0, 1)
            target *= (1 - lift * (dx + dy) / (1.41 * R) * np.sqrt(dome))[None]
        if "glistening" in surf:                                  # specular highlight of a moist surface
            hl = np.clip(1 - np.hypot(dx + 0.35 * R, dy + 0.35 * R) / (0.22 * R + 0.8), 0, 1)
            _mix(target, (250, 248, 248), 0.75 * hl)
        # ---- composite: lesion over skin; nodules cast a shadow to the lower right; collarette outside
        if s["_morph"] == "nodule":
            shadow = np.clip(1 - np.abs(d - 0.1 * R) / (0.2 * R + 1), 0, 1) * ((dx + dy) > 0) * (1 - alpha)
            local *= (1 - 0.3 * shadow)[None]
        _mix(local, target, alpha)
        if "collarette" in surf:                                  # pyogenic granuloma: white scale ring
            _mix(local, (238, 232, 222), 0.6 * np.clip(1 - np.abs(d - 0.1 * R - 1) / (0.06 * R + 0.7), 0, 1))
        mask[y0:y1, x0:x1] |= alpha > 0.5
        # ---- thin strokes for PIL
        if "telangiectasia" in surf:                              # branching thin red vessels
            for _ in range(int(rng.integers(2, 5))):
                a0, r0 = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.5) * R
                pts = [(cx + r0 * np.cos(a0), cy + r0 * np.sin(a0))]
                for _ in range(3):
                    a0 += rng.normal(0, 0.7)
                    pts.append((pts[-1][0] + 0.25 * R * np.cos(a0), pts[-1][1] + 0.25 * R * np.sin(a0)))
                strokes.append(("line", pts, (172, 34, 44)))
        if "excoriations" in surf:                                # linear scratch marks (itch)
            for _ in range(int(rng.integers(2, 5))):
                a0, off = rng.uniform(0, np.pi), rng.uniform(-0.5, 0.5, 2) * R
                L = rng.uniform(0.3, 0.7) * R
                p = (cx + off[0], cy + off[1])
                strokes.append(("line", [p, (p[0] + L * np.cos(a0), p[1] + L * np.sin(a0))], (128, 24, 24)))
        if "horn cysts" in surf:                                  # SK: small keratin pearls
            for _ in range(int(rng.integers(3, 8))):
                r, a0 = rng.uniform(0, 0.65) * R, rng.uniform(0, 2 * np.pi)
                strokes.append(("dot", (cx + r * np.cos(a0), cy + r * np.sin(a0), max(0.6, 0.08 * R)), (238, 228, 190)))
        if "pustules" in surf and rng.random() < 0.6:             # a yellow pus point on ~60 % of papules
            strokes.append(("dot", (cx, cy, max(0.7, 0.35 * R)), (238, 226, 150)))
        if s["_dist"] == "follicular":                            # a hair shaft exits each follicular papule
            a0 = rng.uniform(0, 2 * np.pi)
            strokes.append(("line", [(cx, cy), (cx + 2.2 * R * np.cos(a0), cy + 2.2 * R * np.sin(a0))], (40, 32, 26)))

    def _generalized(self, s, rng, img, mask, cue_w, skin_mask) -> None:
        """A generalized eruption (ichthyosis): the whole skin carries polygonal fish-scale plates.

        The plates are a skewed grid in a rotated frame: cracks where either cell coordinate is near an
        integer, offset by half a cell every other column (like brickwork), wobbled by a sine so they are
        not perfectly straight. The mask and the implicit-cue zone are the whole skin.
        """
        S = self.size
        xs = np.arange(S, dtype=np.float32)
        alpha = np.ones((S, S), np.float32) if skin_mask is None else skin_mask.copy()
        target = _relative_colour(s["_colours"][0], img)
        _mix(img, target, 0.6 * alpha)
        rot, cell = rng.uniform(0, np.pi), 0.07 * S * rng.uniform(0.85, 1.15)
        u = xs[None, :] * np.float32(np.cos(rot)) + xs[:, None] * np.float32(np.sin(rot))
        v = -xs[None, :] * np.float32(np.sin(rot)) + xs[:, None] * np.float32(np.cos(rot))
        fu = np.mod(u / cell + 0.25 * np.sin(v / cell * 1.3), 1.0)
        fv = np.mod(v / cell + 0.25 * np.sin(u / cell * 1.1) + 0.5 * np.floor(u / cell), 1.0)
        cracks = (fu < 0.1) | (fv < 0.1)                          # plate boundaries
        img *= (1 - alpha * cracks * 0.22)[None]
        _mix(img, (232, 226, 214), alpha * ~cracks * fu * 0.18)    # plates catch light
        if "fine scale" in s["_surface"]:
            _mix(img, (236, 230, 224), alpha * (rng.random((S, S), dtype=np.float32) > 0.6) * 0.3)
        mask |= alpha > 0.5
        cue_w[:] = alpha



def tokenizer_corpus(n_captions: int = 400) -> list[str]:
    """Texts to train the tiny preset's byte-level BPE on (skinflow.Tokenizer.train): both prompts, every
    caption-vocabulary value, every Fitzpatrick17k label, and formatted targets of both stages."""
    # A BPE merges what it sees often: the prompts and the target vocabulary should become few tokens
    # each, so the tiny model spends its short context on the image, not on spelling "erythematous".
    texts = [STAGE1_PROMPT, STAGE2_PROMPT]
    texts += [f"{name}: {value}" for name, values in CAPTION_VOCAB.items() for value in values]
    texts += list(TAXONOMY) + sorted(set(NINE_TO_THREE)) + sorted(set(NINE_TO_THREE.values()))
    for split in ("train", "test"):
        ds = SynthDerm(n_captions, seed=0, image_size=64, split=split)
        texts += [format_caption(ds.spec(i)["fields"]) for i in range(n_captions)]
    texts += [format_differential(reference_differential(label)) for label in TAXONOMY]
    return texts


# ---------------------------------------------------------------------------------------------------
# Headroom: what a model can reach on SynthDerm from (a) nothing, (b) colours, (c) the true caption.
# All classifiers are tiny numpy implementations so the numbers can be reproduced without sklearn.
# How to read them against SkinFlow: "majority" is the floor; "colour histogram" is what a model gets
# from global colour statistics (roughly a vision tower that pools everything); "caption oracle" is what
# a PERFECT Stage I could hand to the diagnosis step; the gap between it and "caption + cue oracle" is
# the part that only fine texture can add: the target of Stage II and of the DVE.
# ---------------------------------------------------------------------------------------------------
def _colour_features(image: Image.Image) -> np.ndarray:
    """Colour-histogram + texture-statistics features of one image (the "simple pixel baseline").

    32x32 thumbnail -> joint RGB histogram (4x4x4 bins, normalised) + per-channel mean and std + the
    mean absolute horizontal/vertical gradient + the share of pixels far from the median colour.
    """
    x = np.asarray(image.resize((32, 32), Image.BILINEAR), np.float32) / 255.0          # [32, 32, 3]
    q = np.minimum((x * 4).astype(int), 3)
    hist = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64) / 1024.0
    flat = x.reshape(-1, 3)
    far = (np.abs(flat - np.median(flat, 0)).sum(1) > 0.15).mean()
    grads = [np.abs(np.diff(x, axis=a)).mean() for a in (0, 1)]
    return np.concatenate([hist, flat.mean(0), flat.std(0), grads, [far]]).astype(np.float64)


def _spectrum_features(image: Image.Image, n_bins: int = 42) -> np.ndarray:
    """Orientation-free texture features: the radially averaged log power spectrum of the high-passed
    luminance, P(r) = mean over |f| in [r, r+1) of |FFT(L - boxblur(L))|^2, for radii 8 .. 8 + n_bins
    cycles per 112 px (the band of SynthDerm's implicit grating at that size; other sizes are resized).

    A linear model on these sees a periodic texture's frequency wherever and at whatever angle it is,
    which is what a model needs to resolve the implicit cue (headroom()'s "spectrum" line).
    """
    g = image.convert("L").resize((112, 112), Image.BILINEAR)
    L = np.asarray(g, np.float32)
    hp = L - np.asarray(g.filter(ImageFilter.BoxBlur(2)), np.float32)             # [112, 112] high-pass
    power = np.abs(np.fft.fftshift(np.fft.fft2(hp))) ** 2
    yy, xx = np.indices(power.shape) - 56
    idx = np.digitize(np.hypot(yy, xx).ravel(), np.arange(8, 8 + n_bins, 1.0))
    total = np.bincount(idx, weights=power.ravel(), minlength=n_bins + 1)
    count = np.maximum(np.bincount(idx, minlength=n_bins + 1), 1)
    f = np.log(total[1:n_bins] / count[1:n_bins] + 1e-3)
    return f - f.mean()                                                            # overall contrast removed


def _softmax_regression(X: np.ndarray, y: np.ndarray, n_classes: int, steps: int = 400, lr: float = 0.5,
                        l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by full-batch gradient descent.

    p = softmax(X W + b);  loss = -mean log p[y] + l2/2 |W|^2;  dL/dW = X^T (p - onehot(y)) / n + l2 W.
    """
    n, d = X.shape
    W, b = np.zeros((d, n_classes)), np.zeros(n_classes)
    onehot = np.eye(n_classes)[y]
    for _ in range(steps):
        z = X @ W + b                                         # [n, C] logits
        z -= z.max(1, keepdims=True)                          # stable softmax: exp never overflows
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / n
        W -= lr * (X.T @ g + l2 * W)
        b -= lr * g.sum(0)
    return W, b


def _field_tokens(fields: dict[str, str]) -> list[str]:
    """The caption as a bag of `field=value` tokens (multi-valued fields give one token per value)."""
    return [f"{k}={v.strip()}" for k in CAPTION_FIELDS for v in fields.get(k, "none").split(",")]


def _naive_bayes(train: list[list[str]], y: np.ndarray, n_classes: int):
    """Multinomial naive Bayes over caption tokens with add-one smoothing; returns a scorer.

    log P(c | tokens) = log P(c) + sum_t log P(t | c) + const,  P(t | c) = (n_tc + 1) / (n_c + |V|).
    """
    vocab = {t: i for i, t in enumerate(sorted({t for doc in train for t in doc}))}
    # Add-one smoothing: a value never seen with a class lowers its score but cannot veto it outright.
    counts = np.ones((n_classes, len(vocab)))
    for doc, c in zip(train, y):
        for t in doc:
            counts[c, vocab[t]] += 1
    log_pt = np.log(counts / counts.sum(1, keepdims=True))                           # [C, V]
    log_prior = np.log(np.bincount(y, minlength=n_classes) + 1.0)

    def score(doc: list[str]) -> np.ndarray:
        idx = [vocab[t] for t in doc if t in vocab]
        return log_prior + log_pt[:, idx].sum(1)
    return score


def headroom(n_train: int = 3000, n_test: int = 1000, image_size: int = 112, seed: int = 0,
             n_caption_train: int = 20000, cue_amplitude: float = CUE_AMPLITUDE,
             verbose: bool = True) -> dict[str, float]:
    """Top-1 on the fixed SynthDerm test split (seed, split="test", items 0..n_test-1) of three models:

    majority class; softmax regression on colour-histogram features (_colour_features, trained on
    n_train rendered images), and the same with a radial power spectrum added (_spectrum_features: does
    the implicit texture show up in pixels?); and the caption oracle (naive Bayes on the TRUE caption fields, trained on
    n_caption_train attribute draws). Also: the caption oracle's top-3, a caption + implicit-cue oracle
    (the period too: the ceiling for a model that also resolves the texture) and the test's mimic share.
    """
    # The test split is the same stream every model is scored on (SynthDerm(n_test, seed, split="test")),
    # so these numbers are directly comparable with eval.py's SynthDerm scores at the same seed.
    labels = {c: i for i, c in enumerate(SYNTH_LABELS)}
    train = SynthDerm(n_train, seed, image_size, "train", cue_amplitude=cue_amplitude)
    test = SynthDerm(n_test, seed, image_size, "test", cue_amplitude=cue_amplitude)
    test_specs = [test.spec(i) for i in range(n_test)]
    y_test = np.array([labels[s["label"]] for s in test_specs])
    cap_train = SynthDerm(n_caption_train, seed, image_size, "train")
    cap_specs = [cap_train.spec(i) for i in range(n_caption_train)]
    y_cap = np.array([labels[s["label"]] for s in cap_specs])
    out: dict[str, float] = {}
    out["majority"] = float((y_test == np.bincount(y_cap, minlength=len(labels)).argmax()).mean())
    # Caption oracle: sees the exact caption of what was rendered (the best a perfect Stage I can pass on).
    score = _naive_bayes([_field_tokens(s["fields"]) for s in cap_specs], y_cap, len(labels))
    S = np.stack([score(_field_tokens(s["fields"])) for s in test_specs])           # [n_test, C]
    top = np.argsort(-S, 1)
    out["caption_oracle_top1"] = float((top[:, 0] == y_test).mean())
    out["caption_oracle_top3"] = float((top[:, :3] == y_test[:, None]).any(1).mean())
    out["test_mimic_share"] = float(np.mean([s["looks_like"] != s["label"] for s in test_specs]))
    # Caption + implicit-cue oracle: also sees the grating period (binned to 0.5 px at 224 px), i.e. what a
    # model that reads the caption AND resolves the fine texture could reach (Stage II + DVE territory).
    def with_cue(sp: dict) -> list[str]:
        return _field_tokens(sp["fields"]) + [f"period={round(sp['period'] * 224 / image_size * 2)}"]
    score2 = _naive_bayes([with_cue(s) for s in cap_specs], y_cap, len(labels))
    S2 = np.stack([score2(with_cue(s)) for s in test_specs])
    out["caption_cue_oracle_top1"] = float((S2.argmax(1) == y_test).mean())
    # Colour-histogram baseline: renders images, so it is the slow part (~n_train / 300 s).
    t0 = time.time()
    Xtr = np.stack([_colour_features(train[i].image) for i in range(n_train)])
    ytr = np.array([labels[train.spec(i)["label"]] for i in range(n_train)])
    Xte = np.stack([_colour_features(test[i].image) for i in range(n_test)])
    # Standardise with train statistics only (no peeking at the test split).
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    W, b = _softmax_regression((Xtr - mu) / sd, ytr, len(labels))
    P = ((Xte - mu) / sd) @ W + b
    out["colour_histogram_top1"] = float((P.argmax(1) == y_test).mean())
    out["colour_histogram_top3"] = float((np.argsort(-P, 1)[:, :3] == y_test[:, None]).any(1).mean())
    # Same model with the radial power spectrum added: the gain over the colour line is the implicit cue
    # being picked up from pixels (with cue_amplitude=0 the two lines agree; see docs/data.md, "SynthDerm: headroom numbers").
    Str = np.stack([_spectrum_features(train[i].image) for i in range(n_train)])
    Ste = np.stack([_spectrum_features(test[i].image) for i in range(n_test)])
    Xtr2, Xte2 = np.hstack([Xtr, Str]), np.hstack([Xte, Ste])
    mu2, sd2 = Xtr2.mean(0), Xtr2.std(0) + 1e-6
    W2, b2 = _softmax_regression((Xtr2 - mu2) / sd2, ytr, len(labels), steps=600)
    out["colour_spectrum_top1"] = float(((((Xte2 - mu2) / sd2) @ W2 + b2).argmax(1) == y_test).mean())
    if verbose:
        print(f"SynthDerm headroom (test split: seed={seed}, n={n_test}, {image_size}px, cue {cue_amplitude}; "
              f"{n_train} rendered train images, {n_caption_train} train captions; {time.time() - t0:.0f}s)")
        for k, v in out.items():
            print(f"  {k:24s} {v:.3f}")
    return out


# ---------------------------------------------------------------------------------------------------
# Fitzpatrick17k (Groh et al., CVPR-W 2021; github.com/mattgroh/fitzpatrick17k; CC BY-NC-SA 3.0)
#
# The CSV (shipped as assets/fitzpatrick17k.csv.gz) lists 16,577 images: md5hash, two skin-type labels,
# the fine label and its two parents, a dermatologist QC tag on a 504-image sample, and the source URL.
# The images are not redistributable; fetch them with `python data.py download-fitzpatrick17k --out DIR`
# (from the `url` column) or request the authors' dump. Images resolve as DIR/<md5hash>.jpg|.png|.jpeg.
#
# Protocol history, so the split names below mean something:
#   * Groh et al. 2021 built the set (photos from the DermaAmin and Atlas Dermatologico atlases, skin
#     types by Scale AI and by Centaur Labs) to ask whether classifiers are worse on darker skin. Their
#     train.py defines the protocols reused ever since: `random_holdout` (sklearn train_test_split,
#     test_size 0.2, random_state 4242, stratified by label: ~3.3k test images), `expert_select` (test on
#     the 348 images a dermatologist marked "1 Diagnostic", train on the un-reviewed rest), the skin-type
#     holdouts a12 / a34 / a56 (train on types {1,2} / {3,4} / {5,6}, test on the others) and a source
#     holdout (train on one atlas, test on the other). Their finding: training on light skin (a12) and
#     testing on dark skin costs the most accuracy, the fairness gap SynthDerm's relative colour mimics.
#     (Their train.py reads `fitzpatrick` / `image_path` columns from an older CSV header; the current
#     CSV says `fitzpatrick_scale` and has no path, which is why this loader goes by md5hash.)
#   * Later work found the set noisy (near-duplicates, wrong labels: the atlas category -> label mapping
#     was automatic) and published cleaned variants, e.g. Fitzpatrick17k-C (deduplicated, a 70/10/20
#     split with seed 8888). We load the original CSV; the paper does not say which version it used.
#   * SkinFlow ("Evaluation") reports Top-1 / Top-6 on 1,000 random Fitzpatrick17k images whose ids
#     were not released, so its exact numbers cannot be reproduced by anyone; eval_sample is our
#     documented stand-in (a fixed sample of random_holdout's test part), with the ids listable.
# Implemented here: random, a12, a34, a56, expert and eval1000 (F17K_PROTOCOLS). Not implemented: the
# source holdout (it needs the atlas of each row, recoverable from `url`; no downstream use yet).
# ---------------------------------------------------------------------------------------------------
F17K_COLUMNS = ("md5hash", "fitzpatrick_scale", "fitzpatrick_centaur", "label", "nine_partition_label",
                "three_partition_label", "qc", "url", "url_alphanum")
IMAGE_EXTENSIONS = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


@dataclass
class Record:
    """One Fitzpatrick17k image: same field names as SynthSample so downstream code runs on either."""
    id: str                          # md5hash
    label: str                       # fine label (key of TAXONOMY)
    nine: str
    three: str
    fitzpatrick: int                 # Scale AI skin type 1..6, -1 = unknown
    image_path: str | None = None    # None when no image file was found
    fitzpatrick_centaur: int = -1
    qc: str = ""                     # "1 Diagnostic", ... on 504 images, "" elsewhere
    url: str = ""
    fields: dict[str, str] | None = None    # 8 caption fields when a SkinCAP caption is joined
    caption: str | None = None              # the SkinCAP free text (English) when joined


def _open_text(path) -> io.TextIOBase:
    """Open a CSV as text, transparently gunzipping *.gz (the shipped copy is assets/fitzpatrick17k.csv.gz).

    newline="" is what the csv module asks for: it then handles quoted fields with embedded newlines.
    """
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_csv(path, required: tuple[str, ...], what: str) -> list[dict[str, str]]:
    """Read a CSV into dicts, checking the header first: one clear error names every missing column."""
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{what} CSV {path} is missing column(s) {missing}; it has {header}")
        return list(reader)


def find_image(image_dir, stem: str) -> str | None:
    """Path of <image_dir>/<stem>.jpg (or .png / .jpeg, any case) if it exists, else None."""
    for ext in IMAGE_EXTENSIONS:
        p = Path(image_dir) / f"{stem}{ext}"
        if p.is_file():
            return str(p)
    return None


def load_fitzpatrick17k(csv_path=None, image_dir=None, allow_unknown: bool = False,
                        verbose: bool = True) -> list[Record]:
    """Load the Fitzpatrick17k CSV (default: the copy in assets/) into Records, by column name.

    image_dir: where <md5hash>.jpg|.png|.jpeg live; rows without a file get image_path=None and are
    counted in a one-line summary (they are skipped by iterate, never a crash mid-epoch).
    Unknown labels (not in TAXONOMY) or a row whose nine/three parents disagree with TAXONOMY raise one
    error listing them; allow_unknown=True keeps such rows with the CSV's own parents instead.
    """
    csv_path = FITZPATRICK17K_CSV if csv_path is None else csv_path
    # By column name, never by position: third-party copies reorder or add columns (e.g. an index).
    rows = _read_csv(csv_path, F17K_COLUMNS, "Fitzpatrick17k")
    # Validate ALL labels before building anything, so the error lists every offender at once instead of
    # failing on the first (a typo'd CSV should take one fix, not twenty reruns).
    unknown = sorted({r["label"] for r in rows if r["label"] not in TAXONOMY})
    mismatch = sorted({(r["label"], r["nine_partition_label"], r["three_partition_label"]) for r in rows
                       if r["label"] in TAXONOMY
                       and TAXONOMY[r["label"]] != (r["nine_partition_label"], r["three_partition_label"])})
    if (unknown or mismatch) and not allow_unknown:
        raise ValueError(f"Fitzpatrick17k CSV {csv_path}: {len(unknown)} label(s) not in TAXONOMY {unknown[:20]}"
                         f"; {len(mismatch)} label(s) with other parents than TAXONOMY {mismatch[:10]} "
                         "(pass allow_unknown=True to keep them with the CSV's parents)")

    def as_int(v: str) -> int:
        # Skin types are "1".."6" or "-1"; some re-exports write "3.0" or leave the cell empty.
        try:
            return int(float(v))
        except (TypeError, ValueError):
            return -1
    records, found = [], 0
    for r in rows:
        # Existence is checked here (cheap stat calls); decodability only when iterate opens the file,
        # so loading 16k rows stays well under a second.
        path = find_image(image_dir, r["md5hash"]) if image_dir is not None else None
        found += path is not None
        records.append(Record(id=r["md5hash"], label=r["label"], nine=r["nine_partition_label"],
                              three=r["three_partition_label"], fitzpatrick=as_int(r["fitzpatrick_scale"]),
                              image_path=path, fitzpatrick_centaur=as_int(r["fitzpatrick_centaur"]),
                              qc=r["qc"] or "", url=r["url"] or ""))
    if verbose and image_dir is not None:
        print(f"fitzpatrick17k: {len(records)} rows, {found} images found in {image_dir}, "
              f"{len(records) - found} missing (skipped)", file=sys.stderr)
    return records


# --- split protocols (Groh et al.'s train.py, plus the paper's 1,000-image evaluation sample) -----------
def split_random(records: list, test_fraction: float = 0.2, seed: int = 4242,
                 groups: dict | None = None) -> tuple[list, list]:
    """Stratified random split: within every label, shuffle (seeded) and send round(n * test_fraction)
    to test. Same protocol and seed as Groh et al. (their exact indices came from sklearn; ours come from
    numpy, so the membership differs but the recipe, sizes and per-label balance are the same).

    groups (optional, {record id: group id}, e.g. from near_duplicate_groups): the unit that is shuffled
    and assigned is then a GROUP, so near-duplicate copies always land on the same side. A group is
    filed under its "home" label (the label of most of its members, ties to the alphabetically first),
    and within a label whole groups go to test, in shuffled order, until the label's test share reaches
    round(n * test_fraction) (it may overshoot by less than one group). With no groups, or only
    singleton groups, the split is exactly the plain one (same generator calls, same membership).
    """
    # Units: lists of record indices that must stay together (a singleton per record without groups).
    units: dict = {}
    for i, r in enumerate(records):
        key = groups.get(r.id, ("row", i)) if groups else ("row", i)
        units.setdefault(key, []).append(i)
    by_label: dict[str, list[list[int]]] = {}
    for members in units.values():                           # in order of first member: deterministic
        labels = [records[i].label for i in members]
        home = min(set(labels), key=lambda lab: (-labels.count(lab), lab))
        by_label.setdefault(home, []).append(members)
    # One generator, labels visited in sorted order: the split depends only on (records, seed), not on
    # dict ordering or on the row order inside the CSV beyond each label's own list.
    rng = np.random.default_rng(seed)
    test_idx: set[int] = set()
    for label in sorted(by_label):
        label_units = by_label[label]
        # the label's test share counts IMAGES, not units, so a label with one big group of copies does
        # not send five times its share to test
        target = int(round(sum(map(len, label_units)) * test_fraction))
        taken = 0
        for j in rng.permutation(len(label_units)):
            if taken >= target:
                break
            test_idx.update(label_units[j])
            taken += len(label_units[j])
    train = [r for i, r in enumerate(records) if i not in test_idx]
    test = [r for i, r in enumerate(records) if i in test_idx]
    return train, test


def split_skin_type(records: list, train_types: tuple[int, ...]) -> tuple[list, list]:
    """Skin-type holdout (Groh a12 / a34 / a56): train on `train_types`, test on the OTHER known types
    (unknown -1 is dropped), both restricted to the labels present on both sides."""
    train = [r for r in records if r.fitzpatrick in train_types]
    test = [r for r in records if r.fitzpatrick > 0 and r.fitzpatrick not in train_types]
    # A label never seen in training cannot be predicted; keeping it would measure label coverage, not
    # the skin-type gap the protocol is about. (Groh et al. restrict the same way.)
    shared = {r.label for r in train} & {r.label for r in test}
    return [r for r in train if r.label in shared], [r for r in test if r.label in shared]


def split_expert(records: list) -> tuple[list, list]:
    """Groh's expert_select: test on the 348 images a dermatologist tagged "1 Diagnostic", train on the
    images without any QC tag (the other QC'd images are left out)."""
    return [r for r in records if not r.qc], [r for r in records if r.qc.startswith("1")]


def eval_sample(records: list, n: int = 1000, seed: int = 2601, groups: dict | None = None) -> list:
    """A fixed random n-image sample of the random split's test part, like SkinFlow's 1,000-image test.

    SkinFlow evaluates on 1,000 random Fitzpatrick17k images whose ids were NOT published, so no one can
    reproduce that exact set; this sample (seed 2601, drawn from split_random's test part so it never
    overlaps training) is our stand-in. Its ids can be listed with [r.id for r in eval_sample(records)].
    """
    _, test = split_random(records, groups=groups)
    # Sort by id first, so the sample does not depend on the CSV's row order, only on its content.
    test = sorted(test, key=lambda r: r.id)
    idx = np.random.default_rng(seed).choice(len(test), size=min(n, len(test)), replace=False)
    return [test[i] for i in sorted(idx)]


F17K_PROTOCOLS = ("random", "a12", "a34", "a56", "expert", "eval1000")


def fitzpatrick17k_split(records: list, protocol: str = "random", part: str = "test",
                         exclude_from_test=(), groups: dict | None = None) -> list:
    """One part ("train" / "test") of a split protocol (F17K_PROTOCOLS). `exclude_from_test` holds image
    ids that must never be tested on, e.g. the SkinCAP-captioned images used in Stage I (see
    skincap_guard); they are removed from the test part (and reported).

    groups ({record id: near-duplicate group id}, see near_duplicate_groups) makes every protocol
    leak-free: the random split (and eval1000, drawn from its test part) assigns whole groups; for the
    protocols whose sides are fixed by metadata (skin type, expert QC) a test image whose group has a
    member in train is dropped; and a near-duplicate of an excluded (captioned) image is excluded too.
    """
    if protocol == "random":
        train, test = split_random(records, groups=groups)
    elif protocol in ("a12", "a34", "a56"):
        train, test = split_skin_type(records, tuple(int(c) for c in protocol[1:]))
    elif protocol == "expert":
        train, test = split_expert(records)
    elif protocol == "eval1000":
        train, _ = split_random(records, groups=groups)
        test = eval_sample(records, groups=groups)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {F17K_PROTOCOLS}")
    if part not in ("train", "test"):
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    if part == "train":
        return train
    excluded = {c.id if hasattr(c, "id") else str(c) for c in exclude_from_test}
    if excluded:
        test = skincap_guard(test, excluded)[0]
    if groups:
        # a near-duplicate of a captioned image is as good as the captioned image itself; a group with a
        # member in train must not also be tested on (a no-op for the group-aware random split)
        bad = {groups[i] for i in excluded if i in groups} | {groups[r.id] for r in train if r.id in groups}
        kept = [r for r in test if groups.get(r.id) not in bad]
        if len(kept) < len(test):
            print(f"near-duplicates: removed {len(test) - len(kept)} test image(s) that copy a train or "
                  "captioned image", file=sys.stderr)
        test = kept
    return test


# ---------------------------------------------------------------------------------------------------
# SkinCAP (Zhou et al. 2024, HF joshuachou/SkinCAP; CC BY-NC-SA 4.0 + a gated use agreement, so it is
# never shipped): 4,000 dermatologist captions, 3,345 of them on Fitzpatrick17k images. Rows join to
# Fitzpatrick17k by `ori_file_path` = <md5hash>.png|.jpg. SkinFlow's Stage I needs the 8 fields, so the
# English free text is mapped onto CAPTION_VOCAB by ordered keyword rules (first match wins per span).
# Stage I images must then stay out of every Stage II test split: skincap_guard.
# ---------------------------------------------------------------------------------------------------
SKINCAP_CAPTION_COLUMNS = ("caption_zh_polish_en", "caption_en", "caption")

# (regex, canonical value) per field, tried in order; a matched span is blanked so that "dark brown"
# is not also read as "brown" and "silvery scale" not also as a plain scale. Design notes:
# * order is specificity: multi-word and rarer terms first, generic ones ("scal", "red") last;
# * word boundaries where a short word hides inside others ("red" in "scattered", "arc" in "search");
# * location folds body parts onto SynthDerm's five sites (hands and feet count as limb; only the palm
#   or sole proper is "palm or sole", since its skin looks different);
# * a generic scale becomes "fine scale": SkinCAP says "scales" far more often than it grades them;
# * "irregular" alone is ambiguous (shape or border); it counts only with its noun.
_CAPTION_RULES: dict[str, list[tuple[str, str]]] = {
    "colour": [(r"dark[ -]brown", "dark brown"), (r"skin[ -]colou?red|flesh[ -]colou?red", "skin-coloured"),
               (r"blue|gr[ae]y", "blue-gray"), (r"salmon", "salmon"), (r"pink", "pink"),
               (r"violaceous|purpl|violet", "violaceous"), (r"\bred(dish)?\b|erythem", "erythematous"),
               (r"brown|tan\b|hyperpigment", "brown"), (r"black", "black"),
               (r"white|hypopigment|depigment|porcelain", "white"), (r"yellow", "yellow"),
               (r"pearly|translucent", "pearly")],
    "location": [(r"\bpalms?\b|\bsoles?\b|palmar|plantar", "palm or sole"), (r"scalp", "scalp"),
                 (r"\bface\b|facial|cheek|forehead|\bnose\b|nasal|\blips?\b|\bchin\b|eyelid|\bears?\b|perioral",
                  "face"),
                 (r"trunk|\bback\b|chest|abdom|torso|buttock|flank|waist|\bneck\b|axilla|groin", "trunk"),
                 (r"\barms?\b|\blegs?\b|limb|extremit|thigh|knee|elbow|forearm|\bshin|\bcalf|ankle|wrist|"
                  r"shoulder|\bhands?\b|\bfeet\b|\bfoot\b|finger|\btoes?\b", "limb")],
    "shape": [(r"annular|ring[ -]shaped|\brings?\b", "annular"), (r"arcuate|\barc", "arcuate"),
              (r"polygonal", "polygonal"), (r"\boval|ovoid|elliptic", "oval"),
              (r"irregular(ly)?[ -]shaped|irregular in shape|irregular shape", "irregular"),
              (r"\bround|circular", "round")],
    "lesion type": [(r"macul", "macule"), (r"patch", "patch"), (r"papul", "papule"), (r"plaque", "plaque"),
                    (r"nodul", "nodule"), (r"wheal|hive", "wheal"), (r"vesic|blister|bulla", "vesicle"),
                    (r"pustul", "pustule")],
    "size": [(r"\bsmall|tiny|pinpoint|millet|miliary", "small"), (r"medium|moderate[ -]sized", "medium"),
             (r"\blarge|\bbig\b|extensive|huge", "large")],
    "border": [(r"well[ -](defined|demarcated|circumscribed)|clear(ly)? (border|boundar|margin|defined)|"
                r"sharp(ly)? (demarcated|defined|bordered)|distinct (border|margin)", "well-demarcated"),
               (r"ill[ -]defined|poorly[ -](defined|demarcated)|unclear|indistinct|blurr", "ill-defined"),
               (r"irregular (border|margin|edge|boundar)", "irregular"),
               (r"regular (border|margin|edge|boundar)|smooth (border|margin|edge)", "regular")],
    "surface": [(r"silver\w*( scal\w*)?", "coarse silvery scale"),
                (r"(thick|hyperkeratotic|keratotic)( scal\w*| crust\w*)?", "thick keratotic scale"),
                (r"fish[ -]scale|ichthyo", "fish-scale"), (r"scal|desquam|flak", "fine scale"),
                (r"crust", "crust"), (r"ulcer|erosi", "central ulcer"), (r"excoriat|scratch", "excoriations"),
                (r"verruc|wart|papilloma", "verrucous"), (r"horn cyst", "horn cysts"),
                (r"wickham|reticula|white lines|white striae", "reticulate white lines"),
                (r"telangiect", "telangiectasia"), (r"rolled", "rolled border"), (r"collarette", "collarette"),
                (r"glisten|shiny|shining|glossy", "glistening"), (r"comedo|blackhead", "comedones"),
                (r"atroph|wrinkl", "wrinkled atrophy"), (r"central clearing|pale cent", "pale centre"),
                (r"\bhalo", "depigmented halo"), (r"scar", "central white scar-like patch")],
    "distribution": [(r"generali[sz]ed|widespread|diffuse", "generalized"), (r"follicul", "follicular"),
                     (r"linear|\bstreak", "linear"), (r"cluster|grouped|confluen", "clustered"),
                     (r"scatter|dissemin|multiple|numerous", "scattered"),
                     (r"solitary|single|isolated|\bone\b", "solitary")],
}


def caption_to_fields(text: str) -> dict[str, str]:
    """Map a free-text caption onto the 8 fields (values from CAPTION_VOCAB, several joined by ", ";
    "none" when the text says nothing). Keyword rules, so it is approximate by design: it finds what
    the caption names; it cannot infer what the caption leaves out."""
    low = " " + str(text).lower() + " "
    fields = {}
    for name in CAPTION_FIELDS:
        work, found = low, []
        for pattern, value in _CAPTION_RULES[name]:
            for m in re.finditer(pattern, work):
                if value not in found:
                    found.append(value)
            work = re.sub(pattern, lambda m: " " * len(m.group(0)), work)
        if name == "border" and found:                        # definition first, then regularity
            found.sort(key=lambda v: v not in ("well-demarcated", "ill-defined"))
        fields[name] = ", ".join(found) if found else "none"
    return fields


@dataclass
class CaptionRecord:
    """One SkinCAP row: the free-text caption, its 8-field mapping, and the Fitzpatrick17k record it
    describes (None when the image is not from Fitzpatrick17k, e.g. SkinCAP's DDI images)."""
    id: str               # md5hash (file stem of ori_file_path)
    file: str             # ori_file_path as given
    caption: str          # English free text
    fields: dict[str, str]
    disease: str = ""
    record: Record | None = None   # the joined Fitzpatrick17k record (None for DDI / unknown images)


def load_skincap(csv_path, f17k_records: list | None = None, attach: bool = True) -> list[CaptionRecord]:
    """Load SkinCAP's CSV (skincap_v240623.csv): captions joined to Fitzpatrick17k by md5 / file name.

    Needs `ori_file_path` and one caption column (SKINCAP_CAPTION_COLUMNS, English first). When
    f17k_records is given, matching records get `.caption` and `.fields` (attach=True) so iterate can use
    them as Stage I targets; unmatched rows (e.g. DDI images) keep record=None.
    """
    with _open_text(csv_path) as fh:
        header = csv.DictReader(fh).fieldnames or []
    col = next((c for c in SKINCAP_CAPTION_COLUMNS if c in header), None)
    rows = _read_csv(csv_path, ("ori_file_path",) + ((col,) if col else SKINCAP_CAPTION_COLUMNS[:1]), "SkinCAP")
    by_id = {r.id: r for r in (f17k_records or [])}
    out = []
    # The join key is the file stem, lower-cased: SkinCAP stores "<md5hash>.png" while Fitzpatrick17k's
    # own dump uses .jpg, so the extension must not take part in the match.
    for row in rows:
        file = row["ori_file_path"].strip()
        stem = Path(file).stem.lower()
        text = row[col].strip()
        rec = by_id.get(stem)
        cap = CaptionRecord(id=stem, file=file, caption=text, fields=caption_to_fields(text),
                            disease=row.get("disease", ""), record=rec)
        if rec is not None and attach:
            rec.caption, rec.fields = text, cap.fields
        out.append(cap)
    return out


def skincap_guard(test_records: list, caption_ids) -> tuple[list, int]:
    """Remove every image with a Stage I caption from a test split: returns (kept, n_removed).

    SkinCAP captions the very Fitzpatrick17k images one would test on; a Stage II score measured on
    images whose description the model was trained on would be inflated.
    """
    ids = {c.id if hasattr(c, "id") else str(c) for c in caption_ids}
    kept = [r for r in test_records if r.id not in ids]
    removed = len(test_records) - len(kept)
    if removed:
        print(f"skincap_guard: removed {removed} captioned image(s) from the test split", file=sys.stderr)
    return kept, removed


# ---------------------------------------------------------------------------------------------------
# Real photos: ONE opener for every entry point, and near-duplicate groups (issue 12)
#
# Fitzpatrick17k is two web atlases scraped in 2021, so its files are whatever the atlases served: JPEGs
# from 60 px thumbnails to multi-megapixel scans, grayscale, palette PNGs, RGBA, the odd CMYK or 16-bit
# file, phone photos whose orientation lives only in the EXIF tag, and PNG bytes saved under a .jpg name.
# Every one of them must reach the model as the same thing: an 8-bit RGB PIL image, upright, that
# skinflow.preprocess_image then resizes within max_pixels exactly like a SynthDerm image. open_image is
# the one place that knows how; eval.py generate --image, `diagnose`, eval.py and rl.py (through iterate /
# Fitzpatrick17kData) all call it, so a broken file gives the same one-line ImageError everywhere.
# ---------------------------------------------------------------------------------------------------
class ImageError(ValueError):
    """An image file that cannot be used: missing, a directory, not an image, truncated or corrupt.

    A ValueError, so the CLIs that already turn ValueError into "error: ..." + exit 2 need no new code;
    `reason` is a short machine-readable cause ("missing", "unreadable") used by the skip counters."""

    def __init__(self, message: str, reason: str = "unreadable"):
        super().__init__(message)
        self.reason = reason


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB.

    * 16-bit / 32-bit integer and float greyscale ("I;16", "I", "F"): scaled by the range the mode can
      hold (65535 for 16-bit, the image's own max for I/F when it exceeds 255), because PIL's own
      convert("L") CLIPS at 255 and would turn almost every 16-bit photo pure white;
    * transparency (RGBA, LA, PA, P with a transparent index): composited onto WHITE. convert("RGB")
      would keep whatever colour the fully transparent pixels happen to store (often black), i.e. paint
      a frame that is not in the photo; white is what a viewer shows;
    * CMYK, YCbCr, LAB, 1-bit, palette, L: PIL's own conversion (CMYK through its naive inverse).
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)                                     # [H, W]
        top = 65535.0 if im.mode.startswith("I;16") else max(255.0, float(a.max()) if a.size else 255.0)
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P":
        # a palette image may mark one index transparent (GIF-style); only then does it need the alpha path
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def open_image(path, draft: int | None = None) -> Image.Image:
    """Open and FULLY decode an image file -> upright 8-bit RGB PIL image, or raise ImageError (one line).

    * the format is read from the bytes, never from the extension (PNG bytes under .jpg just work);
    * the EXIF orientation tag is applied (ImageOps.exif_transpose), so a phone photo stored sideways
      reaches the model upright, exactly as any image viewer shows it;
    * modes are normalised by _to_rgb (16-bit scaled, transparency on white, CMYK/greyscale -> RGB);
    * decoding is forced here: a truncated JPEG fails now with "corrupt or truncated", not deep inside
      preprocessing three stages later;
    * draft=N (optional) lets a JPEG decode at a reduced scale whose shorter side stays >= N px (libjpeg's
      1/2, 1/4, 1/8 IDCT): used by the near-duplicate hash, which needs 32 px, not 12 Mpx.
    Pillow's decompression-bomb guard stays on (an image over ~179 Mpx is refused with a clear line).
    """
    from PIL import ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ImageError(f"{path}: no such file", "missing")
    if p.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file", "missing")
    try:
        with Image.open(p) as im:
            if draft is not None and im.format == "JPEG":
                im.draft("RGB", (draft, draft))               # decode at 1/2..1/8 scale: far faster
            im.load()                                         # a truncated JPEG/PNG fails here
            im = ImageOps.exif_transpose(im)                  # upright, as a viewer shows it
            img = _to_rgb(im)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file that pillow can read", "unreadable") from None
    except PermissionError:
        raise ImageError(f"{path}: permission denied", "unreadable") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        why = str(exc).strip().splitlines()[0][:80] if str(exc).strip() else type(exc).__name__
        raise ImageError(f"{path}: corrupt or truncated image ({why})", "unreadable") from None
    if min(img.size) < 1:
        raise ImageError(f"{path}: image has an empty side {img.size}", "unreadable")
    return img


# --- near-duplicate groups --------------------------------------------------------------------------
# About a fifth of Fitzpatrick17k are near-duplicates (the same clinical photo uploaded twice, resized,
# re-compressed, cropped a little, brightened; the cleaned variants in the literature remove them). A
# random split then puts one copy in train and the other in test, and the test score measures memory.
# We find the copies with a perceptual hash (pHash) and keep each group on one side of every split.
#
# pHash of an image (numpy + pillow only):
#   g   = 32 x 32 greyscale thumbnail (box filter: every source pixel counts, so resampling noise of a
#         resized copy averages out)
#   C   = D g D^T,  D the 32 x 32 orthonormal DCT-II matrix  D[k, n] = s_k cos(pi (2n + 1) k / 64)
#   h   = the 64 bits  C[u, v] > median(C[0:8, 0:8] without C[0, 0])  for u, v in 0..7
# The low 8 x 8 frequencies are the photo's coarse layout: what survives resizing, re-compression and a
# small crop. The DC term (mean brightness) is left out and the threshold is the median, so a brightened
# copy (which shifts DC and scales every coefficient alike) keeps its bits. Two images are copies when
#   hamming(h_a, h_b) <= NEAR_DUP_BITS (10 of 64)
# Distinct photos sit near 32 bits apart (independent bits; the closest of 19,900 SynthDerm pairs: 12).
# Edited copies (measured: one smooth 300 px photo, and 60 SynthDerm images at 160 px): a third of the
# size 2 bits, JPEG q=30 0, brightness x0.8 / x1.1 / +30 levels <= 6, x1.2 mean 2.5 but 14 once (the
# highlights clip), a crop of 3 % off one side <= 10 (mean 5); re-encoded at 2x q=75 <= 6, but shrunk to
# 80 px at q=40-60 mean 3 and max 12-14 (1 of 40 images missed: a few coefficients sit on the median and
# flip). The limit of a global hash: 8 px (5 %) off
# two sides moves it up to 22 bits, so such copies are NOT found. We tried matching each hash against 9
# cropped variants of the other image: every crop was found, but 10 of 7,140 distinct SynthDerm pairs
# merged too, and a false merge costs more than a missed copy (it drags whole groups across the split).
# Groups are the connected components of "is a copy of" (union-find): A~B and B~C put A, B, C together.
# A flat image (no structure above 2 grey levels: a colour card, a blank placeholder) has a hash of
# pure noise and would match other flat ones by chance; it stays alone.
# ---------------------------------------------------------------------------------------------------
NEAR_DUP_BITS = 10       # Hamming threshold on the 64-bit pHash
_PHASH_SIZE = 32         # thumbnail side (px)


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix [n, n]: D[k, j] = sqrt((1 + (k > 0)) / n) cos(pi (2j + 1) k / (2n))."""
    k, j = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * j + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


_DCT32 = _dct_matrix(_PHASH_SIZE)


def phash(image: Image.Image) -> int | None:
    """64-bit perceptual hash of a PIL image (see the block above), or None for a flat image."""
    g = np.asarray(image.convert("L").resize((_PHASH_SIZE, _PHASH_SIZE), Image.BOX), np.float64)  # [32, 32]
    if g.std() < 2.0:                                       # no structure: a hash would be noise
        return None
    c = (_DCT32 @ g @ _DCT32.T)[:8, :8].ravel()             # [64] lowest frequencies, DC first
    bits = c > np.median(c[1:])                              # DC excluded from the threshold ...
    bits[0] = False                                          # ... and from the hash (brightness-free)
    return int(sum(1 << i for i in np.flatnonzero(bits).tolist()))


def _hash_files(paths: list, cache_path=None, stats: dict | None = None) -> list[int | None]:
    """pHash of every file (None: flat, missing or unreadable), cached per image in a JSON file.

    The cache key is (absolute path, size, mtime in ns): a file replaced by a new download is hashed
    again. Hashing 16k photos costs minutes once (docs/real-data.md, "Near-duplicate groups"); the cache makes
    every later split instant.
    """
    import json

    cache: dict = {}
    cp = Path(cache_path) if cache_path else None
    if cp is not None and cp.is_file():
        try:
            cache = json.loads(cp.read_text())
        except (OSError, ValueError):
            cache = {}                                       # a torn cache is rebuilt, never fatal
    # dirty: whether any hash was computed (only then is the cache rewritten; a fully cached call
    # touches no file, so a read-only image folder works once it has been hashed)
    out, dirty = [], False
    stats = {} if stats is None else stats
    stats.setdefault("unreadable", 0)
    for path in paths:
        if path is None:
            out.append(None)
            continue
        p = Path(path)
        try:
            st = p.stat()
        except OSError:
            stats["unreadable"] += 1
            out.append(None)
            continue
        # size + mtime in the key: a re-download under the same name must not reuse the old hash
        key = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key in cache:
            out.append(None if cache[key] is None else int(cache[key], 16))
            continue
        try:
            h = phash(open_image(p, draft=2 * _PHASH_SIZE))
        except ImageError:
            stats["unreadable"] += 1
            h = None
        cache[key] = None if h is None else f"{h:016x}"
        dirty = True
        out.append(h)
    if cp is not None and dirty:
        try:
            tmp = cp.with_name(cp.name + ".tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cp)                              # atomic: a crash never leaves half a cache
        except OSError as exc:                               # a read-only image folder: hash again next time
            print(f"near-duplicates: could not write the hash cache {cp} ({exc})", file=sys.stderr)
    return out


def near_duplicate_groups(paths, threshold: int = NEAR_DUP_BITS, cache_path=None,
                          stats: dict | None = None) -> list[int]:
    """One group id per path: images whose pHashes differ by <= threshold bits share an id.

    Ids are 0, 1, 2, ... in order of first appearance, so the result is a canonical labelling (two runs
    over the same files give the same list). A missing, unreadable or flat image gets a group of its
    own. `cache_path` (optional JSON file) stores each image's hash; `stats` receives the counts
    {"images", "groups", "merged_groups" (groups of >= 2 images), "merged_images", "unreadable"}.
    Cost: hashing (decode at <= 1/8 scale + a 32 x 32 DCT) dominates; the all-pairs comparison is
    blockwise XOR + popcount in numpy, ~n^2 / 2 64-bit operations (16k images: ~1.3e8, about a second).
    """
    paths = list(paths)
    stats = {} if stats is None else stats
    hashes = _hash_files(paths, cache_path, stats)
    n = len(paths)
    parent = list(range(n))

    def find(i: int) -> int:                                 # union-find with path halving
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    # Only images with a hash take part; idx maps a position among the hashes back to its path index.
    idx = np.array([i for i, h in enumerate(hashes) if h is not None], dtype=np.int64)     # [m]
    hv = np.array([hashes[i] for i in idx.tolist()], dtype=np.uint64)                      # [m]
    # Blocks of 1,024 rows bound the temporary [b, m] matrix (16k hashes: 16 M uint8 = 16 MB per block)
    # while keeping each numpy call large enough to be fast.
    block = 1024
    for s in range(0, len(hv), block):
        # [b, m] Hamming distances of this block against every LATER hash (upper triangle only)
        d = np.bitwise_count(hv[s:s + block, None] ^ hv[None, s:])                       # [b, m - s]
        rows, cols = np.nonzero(d <= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if c > r:                                        # column c is hash s + c; skip self and lower
                a, b = find(int(idx[s + r])), find(int(idx[s + c]))
                if a != b:
                    parent[max(a, b)] = min(a, b)
    ids, out = {}, []
    for i in range(n):
        out.append(ids.setdefault(find(i), len(ids)))
    sizes = np.bincount(np.array(out, dtype=np.int64), minlength=len(ids)) if n else np.zeros(0, np.int64)
    stats.update(images=n, groups=len(ids), merged_groups=int((sizes > 1).sum()),
                 merged_images=int(sizes[sizes > 1].sum()))
    return out


# ---------------------------------------------------------------------------------------------------
# Image downloader (Fitzpatrick17k `url` column)
# ---------------------------------------------------------------------------------------------------
def _valid_image(path) -> bool:
    """True when the project's one opener (open_image) accepts the file: a download counts as done only if
    training and evaluation will be able to read it (a truncated JPEG fails in the forced decode)."""
    try:
        open_image(path)
        return True
    except ImageError:
        return False


def _fetch(url: str, dest: Path, timeout: float, user_agent: str) -> None:
    """Stream url into dest; raise if the body is shorter than its Content-Length (truncated)."""
    # Some image hosts refuse urllib's default agent; say who we are instead. Streaming in 64 KiB chunks
    # keeps memory flat, and the length check catches servers that close the connection early.
    req = urllib.request.Request(url, headers={"User-Agent": user_agent})
    with urllib.request.urlopen(req, timeout=timeout) as resp, open(dest, "wb") as fh:
        expected = resp.headers.get("Content-Length")
        total = 0
        while True:
            chunk = resp.read(1 << 16)
            if not chunk:
                break
            fh.write(chunk)
            total += len(chunk)
    if expected is not None and total != int(expected):
        raise OSError(f"truncated body: {total} of {expected} bytes")


def download_images(items, out_dir, timeout: float = 20.0, retries: int = 3, backoff: float = 1.0,
                    progress: bool = True, user_agent: str = "skinflow-from-scratch/0.1 (research)",
                    workers: int = 8) -> dict:
    """Download (stem, url) pairs to out_dir/<stem><ext>; returns a summary dict.

    * resume: a file already present and fully decodable is skipped;
    * atomic: bytes go to <name>.part and are renamed only after the image decodes, so an interrupted or
      failed download never leaves a partial file under the final name;
    * retries with exponential backoff (backoff * 2^attempt seconds) and a per-request timeout;
    * `workers` downloads at once (threads: the work is waiting on the network, so the GIL is no limit).
      16.5k images one at a time at ~0.5 s each would take ~2.3 h; 8 at once ~20 min. Two hosts serve
      all of Fitzpatrick17k, so we stay polite: 8 connections, not 100;
    * failures are listed in out_dir/download_failures.csv (in the input's order) and summarised.
    """
    from concurrent.futures import ThreadPoolExecutor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = list(items)
    summary = {"ok": 0, "skipped": 0, "failed": 0, "no_url": 0, "failures": []}

    def one(stem: str, url: str) -> tuple[str, str | None]:
        """-> (outcome, error): outcome is "no_url", "skipped", "ok" or "failed"."""
        url = (url or "").strip()
        if not url:
            return "no_url", "no url"
        # Resume: a complete image from an earlier run is kept; a stale or broken one is fetched again.
        existing = find_image(out, stem)
        if existing and _valid_image(existing):
            return "skipped", None
        # Keep the source's extension when it is an image one (Atlas Dermatologico serves some PNGs).
        ext = Path(urllib.parse.urlparse(url).path).suffix.lower()
        ext = ext if ext in (".jpg", ".jpeg", ".png") else ".jpg"
        final = out / f"{stem}{ext}"
        part = out / f"{stem}{ext}.part"
        error = None
        for attempt in range(max(1, retries)):
            try:
                _fetch(url, part, timeout, user_agent)
                if not _valid_image(part):
                    raise ValueError("downloaded file is not a decodable image")
                os.replace(part, final)
                return "ok", None
            except Exception as exc:                          # network, HTTP, timeout, truncation, decode
                # One bad URL must not stop a 16k-image run: record the reason, clean up, retry or move on.
                error = f"{type(exc).__name__}: {exc}"
                part.unlink(missing_ok=True)
                if attempt + 1 < retries:
                    time.sleep(backoff * 2 ** attempt)
        return "failed", error

    try:
        from tqdm import tqdm
        bar = tqdm(total=len(items), desc="download", unit="img", disable=not progress)
    except ImportError:                                       # tqdm is a listed dependency; be lenient anyway
        bar = None
    # results are collected in submission order, so the failure list is ordered like the CSV
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(one, stem, url) for stem, url in items]
        for (stem, url), fut in zip(items, futures):
            outcome, error = fut.result()
            summary[outcome] += 1
            if error is not None:
                summary["failures"].append((stem, (url or "").strip(), error))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    if summary["failures"]:
        with open(out / "download_failures.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["md5hash", "url", "error"])
            w.writerows(summary["failures"])
    print(f"download: {summary['ok']} downloaded, {summary['skipped']} already present, "
          f"{summary['failed']} failed, {summary['no_url']} without url"
          + (f" (see {out / 'download_failures.csv'})" if summary["failures"] else ""), file=sys.stderr)
    return summary


def download_fitzpatrick17k(out_dir, csv_path=None, limit: int | None = None, **kw) -> dict:
    """Fetch every Fitzpatrick17k image from the CSV's `url` column into out_dir/<md5hash>.<ext>."""
    rows = _read_csv(FITZPATRICK17K_CSV if csv_path is None else csv_path, ("md5hash", "url"), "Fitzpatrick17k")
    items = [(r["md5hash"], r["url"]) for r in rows][:limit]
    return download_images(items, out_dir, **kw)


# ---------------------------------------------------------------------------------------------------
# `python data.py fetch --out DIR`: everything a GPU run needs, in one command (issue 12)
#
#   DIR/images/<md5hash>.jpg|png     Fitzpatrick17k, from the CSV's url column (download_images: retries,
#                                    resume, atomic writes, failures listed in images/download_failures.csv)
#   DIR/skincap/skincap_v240623.csv  SkinCAP captions for Stage I (gated Hub dataset, needs a token)
#   DIR/SKINCAP_MISSING.txt          written instead when SkinCAP could not be had, with the reason;
#                                    train.sh then skips Stage I loudly and says so in results.md
#   the backbone                     Qwen2.5-VL-3B/7B-Instruct into the Hugging Face cache (where
#                                    skinflow.load finds it by repo id), *.json + *.safetensors only
# HF_HUB_OFFLINE=1 touches no network: Hub files come from the cache, images are only counted.
# ---------------------------------------------------------------------------------------------------
SKINCAP_REPO = "joshuachou/SkinCAP"
SKINCAP_FILE = "skincap_v240623.csv"
SKINCAP_MISSING = "SKINCAP_MISSING.txt"


def _hf_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1 / true / yes / on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_problem(exc: Exception, repo: str, kind: str) -> str:
    """One actionable sentence for a failed Hub download (gated, no token, offline, not found, network)."""
    name = type(exc).__name__
    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{repo}"
    if name == "GatedRepoError":
        return (f"{repo} is gated and this token has not been granted access: open {page}, log in, accept "
                "the dataset's terms, wait for the approval, then rerun (the token must be of that account)")
    if name in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or _hf_offline():
        return (f"{repo}: not on disk and HF_HUB_OFFLINE=1 forbids downloading it; rerun without "
                "HF_HUB_OFFLINE=1 on a machine with network access")
    if name in ("RepositoryNotFoundError", "LocalTokenNotFoundError") or "401" in str(exc):
        return (f"{repo}: no access without a Hugging Face token: accept the terms at {page}, then run "
                "`hf auth login` (or export HF_TOKEN=hf_...) and rerun")
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return f"{repo}: {name}: {first}"


def fetch_backbone(repo: str) -> tuple[str | None, str | None]:
    """snapshot_download(repo, *.json + *.safetensors) into the HF cache -> (local path, None) or (None, why)."""
    try:
        from huggingface_hub import snapshot_download
        path = snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"])
        return path, None
    except Exception as exc:                                  # every failure becomes one line, never a trace
        return None, _hub_problem(exc, repo, "model")


def fetch_skincap(out_dir, repo: str = SKINCAP_REPO, filename: str = SKINCAP_FILE) -> tuple[str | None, str | None]:
    """The SkinCAP CSV into out_dir/skincap/ -> (path, None), or (None, why) + out_dir/SKINCAP_MISSING.txt."""
    out = Path(out_dir)
    marker = out / SKINCAP_MISSING
    try:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(repo, filename, repo_type="dataset", local_dir=str(out / "skincap"))
        marker.unlink(missing_ok=True)
        return path, None
    except Exception as exc:
        why = _hub_problem(exc, repo, "dataset")
        marker.write_text(why + "\nStage I (SkinCAP captions) will be skipped until this is fixed.\n")
        return None, why


def fetch(out_dir, csv_path=None, backbone: str | None = "3b", skincap: bool = True, images: bool = True,
          limit: int | None = None, timeout: float = 20.0, retries: int = 3, progress: bool = True,
          workers: int = 8) -> dict:
    """Download the backbone, the Fitzpatrick17k images and the SkinCAP CSV; print and return a summary.

    Each part is independent: one failing (a gated dataset, a dead image host) never stops the others.
    The summary is also written to DIR/fetch_summary.json for train.sh and for the record.
    """
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    offline = _hf_offline()
    summary: dict = {"out": str(out), "offline": offline}
    # 1. The backbone first: it is the biggest download and the one a run cannot start without, so a
    #    user who lacks network or disk finds out in the first minute, not after 20 minutes of images.
    if backbone:
        repo = {"3b": "Qwen/Qwen2.5-VL-3B-Instruct", "7b": "Qwen/Qwen2.5-VL-7B-Instruct"}.get(backbone.lower(), backbone)
        path, why = fetch_backbone(repo)
        summary["backbone"] = {"repo": repo, "path": path, "error": why}
    # 2. The images. Offline, a HEAD request per URL would still be network traffic, so nothing is
    #    fetched: the count of files already on disk is the whole report.
    if images:
        img_dir = out / "images"
        rows = _read_csv(FITZPATRICK17K_CSV if csv_path is None else csv_path, ("md5hash", "url"), "Fitzpatrick17k")
        rows = rows[:limit]
        if offline:                                           # no network: report what is already there
            img_dir.mkdir(parents=True, exist_ok=True)
            have = sum(find_image(img_dir, r["md5hash"]) is not None for r in rows)
            summary["images"] = {"ok": 0, "skipped": have, "failed": 0, "no_url": 0, "offline_missing": len(rows) - have}
        else:
            s = download_images([(r["md5hash"], r["url"]) for r in rows], img_dir, timeout=timeout,
                                retries=retries, progress=progress, workers=workers)
            summary["images"] = {k: s[k] for k in ("ok", "skipped", "failed", "no_url")}
        summary["images"]["dir"] = str(img_dir)
    # 3. SkinCAP last: the only gated part, the one most likely to fail for a first-time user, and the
    #    one whose failure must not cost the other two (Stage II runs without it).
    if skincap:
        path, why = fetch_skincap(out)
        summary["skincap"] = {"path": path, "error": why}
    (out / "fetch_summary.json").write_text(json.dumps(summary, indent=1))
    # The summary, one line per part, and the loud notice when Stage I cannot run.
    print("fetch summary:", file=sys.stderr)
    if "backbone" in summary:
        b = summary["backbone"]
        print(f"  backbone  {b['repo']}: " + (f"ok ({b['path']})" if b["path"] else f"FAILED: {b['error']}"),
              file=sys.stderr)
    if "images" in summary:
        s = summary["images"]
        print(f"  images    {s['ok']} downloaded, {s['skipped']} already on disk, {s['failed']} failed, "
              f"{s['no_url']} without url" + (f", {s['offline_missing']} missing (offline)" if offline else "")
              + f" -> {s['dir']}", file=sys.stderr)
    if "skincap" in summary:
        c = summary["skincap"]
        print("  skincap   " + (f"ok ({c['path']})" if c["path"] else f"MISSING: {c['error']}"), file=sys.stderr)
        if not c["path"]:
            print("!" * 100 + f"\n!! NOTICE: no SkinCAP captions, so Stage I will be SKIPPED (Stage II only). "
                  f"Fix: {c['error']}\n" + "!" * 100, file=sys.stderr)
    return summary


# ---------------------------------------------------------------------------------------------------
# Training / evaluation iterator and the preview contact sheet
# ---------------------------------------------------------------------------------------------------
def reference_answer(stage: str, record) -> str:
    """The canonical target text of a record for a stage (what an SFT warm-up would imitate and what the
    rewards compare against): Stage I the formatted caption, Stage II the reference differential."""
    if stage == "stage1":
        if not record.fields:
            raise ValueError(f"record {record.id} has no caption fields (Stage I needs SynthDerm or SkinCAP)")
        return format_caption(record.fields)
    if stage == "stage2":
        return format_differential(reference_differential(record.label, getattr(record, "looks_like", None)))
    raise ValueError(f"stage must be 'stage1' or 'stage2', got {stage!r}")


PHASH_CACHE = ".skinflow_phash.json"   # per-image hash cache, written into the image folder


def fitzpatrick17k_records(stage: str, split: str = "train", csv_path=None, image_dir=None, skincap_csv=None,
                           dedup: bool = True, verbose: bool = True, info: dict | None = None) -> list:
    """The Records of one stage and split of Fitzpatrick17k (images not opened yet; see iterate).

    split: "train" / "test" (the random protocol) or "<protocol>/<part>", protocol in F17K_PROTOCOLS.
    * skincap_csv attaches SkinCAP captions (`.fields`) BEFORE splitting, so every captioned image can be
      removed from every test part (skincap_guard);
    * Stage I ("stage1") trains on the captioned images: with part "train" it takes ALL of them (each is
      already barred from every test part, so none is wasted), with part "test" only the captioned ones
      left in the test part (none, by construction: a Stage I test part is empty);
    * dedup (default on when image_dir is given): near_duplicate_groups over the images found, cached in
      <image_dir>/.skinflow_phash.json, makes the split group-aware (fitzpatrick17k_split); the report
      line says how many groups were merged. `info` receives {"near_duplicates": stats}.
    """
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"stage must be 'stage1' or 'stage2', got {stage!r}")
    if stage == "stage1" and not skincap_csv:
        raise ValueError("Stage I on Fitzpatrick17k needs reference captions: pass skincap_csv=<SkinCAP CSV> "
                         "(python data.py fetch downloads it once you have accepted its terms on the Hub)")
    info = {} if info is None else info
    # "a12/test" -> protocol a12, part test; a bare "train"/"test" means the random 80/20 protocol.
    protocol, _, part = split.partition("/") if "/" in split else ("random", "", split)
    records = load_fitzpatrick17k(csv_path, image_dir, verbose=verbose)
    # Captions are joined BEFORE splitting, so the guard can drop captioned images from any test part.
    captioned = load_skincap(skincap_csv, records) if skincap_csv else []
    groups = None
    if dedup and image_dir is not None:
        # Only files on disk can be hashed; a row without its image is a singleton (and skipped later
        # anyway). The cache lives beside the images, so every stage and eval.py share one hashing pass.
        found = [r for r in records if r.image_path]
        st: dict = {}
        ids = near_duplicate_groups([r.image_path for r in found], cache_path=Path(image_dir) / PHASH_CACHE,
                                    stats=st)
        groups = {r.id: g for r, g in zip(found, ids)}
        info["near_duplicates"] = st
        if verbose:
            print(f"near-duplicates: {st['merged_groups']} group(s) merged {st['merged_images']} of "
                  f"{st['images']} images (pHash, <= {NEAR_DUP_BITS} of 64 bits); each group stays on one "
                  "side of the split", file=sys.stderr)
    recs = fitzpatrick17k_split(records, protocol, part, groups=groups,
                                exclude_from_test=[c.id for c in captioned if c.record is not None])
    if stage == "stage1":                                     # Stage I needs a reference caption
        # ALL captioned rows, not only those the split put in train: the guard above already keeps each
        # of them (and its copies) out of every test part, so dropping the ~20 % that the random split
        # would have tested on would only waste a fifth of the 3,345 captions.
        recs = [r for r in (records if part == "train" else recs) if r.fields]
    return recs


@dataclass
class RealSample:
    """One opened Fitzpatrick17k image with the fields rl.py reads from a SynthSample (duck typing):
    `.image`, `.label`, `.fields` (None without a caption), `.looks_like` (= label: a real photo has no
    separate "rendered look"), `.id`, `.fitzpatrick`."""
    id: str
    label: str
    fitzpatrick: int
    image: Image.Image
    fields: dict[str, str] | None = None
    looks_like: str = ""
    nine: str = ""
    three: str = ""


class Fitzpatrick17kData:
    """Indexable Fitzpatrick17k stream for rl.py: the same interface as SynthDerm (len, [i], spec(i)).

    Records without an image file are dropped when the dataset is built ("missing"); a file that fails
    to decode is found when item i is first opened ("unreadable"), remembered, counted once, and the next
    readable item (i + 1, i + 2, ... mod n) is served instead, so a corrupt JPEG costs one substitution,
    never a crash in the middle of a run. `skips` holds the counts and the first offending files.
    """

    def __init__(self, stage: str, split: str = "train", csv_path=None, image_dir=None, skincap_csv=None,
                 dedup: bool = True, n: int | None = None, verbose: bool = True):
        if image_dir is None:
            raise ValueError("Fitzpatrick17k needs --image-dir (the folder of <md5hash>.jpg files; "
                             "python data.py fetch --out DIR downloads them)")
        self.info: dict = {}
        recs = fitzpatrick17k_records(stage, split, csv_path, image_dir, skincap_csv, dedup, verbose, self.info)
        have = [r for r in recs if r.image_path]
        self.records = have[:n] if n is not None else have
        self.skips = {"missing": len(recs) - len(have), "unreadable": 0, "files": []}
        self._bad: set[int] = set()
        if not self.records:
            raise ImageError(f"Fitzpatrick17k {stage} {split}: no image found in {image_dir} "
                             f"({len(recs)} rows wanted; run python data.py fetch --out DIR)", "missing")

    def __len__(self) -> int:
        return len(self.records)

    def _resolve(self, i: int) -> int:
        """The index actually served for i: i itself, or the next one not known to be undecodable."""
        n = len(self.records)
        return next(((i + k) % n for k in range(n) if (i + k) % n not in self._bad), i % n)

    def spec(self, i: int) -> dict:
        """Metadata without opening the image (rl.py's vision stage reads the probe target from here).
        It follows the substitution of a known-undecodable item, so label and pixels stay paired."""
        r = self.records[self._resolve(i)]
        return {"id": r.id, "label": r.label, "looks_like": r.label, "fitzpatrick": r.fitzpatrick,
                "fields": r.fields}

    def __getitem__(self, i: int) -> RealSample:
        # Walk forward from i to the first decodable image. Deterministic (no random substitute), so a
        # resumed run (same data positions) sees exactly the same images; a known-bad index is skipped
        # without touching the disk again, so one corrupt file costs one failed decode per run.
        n = len(self.records)
        for k in range(n):
            j = (i + k) % n
            if j in self._bad:
                continue
            r = self.records[j]
            try:
                image = open_image(r.image_path)
            except ImageError as exc:
                self._bad.add(j)
                self.skips["unreadable"] += 1
                if len(self.skips["files"]) < 20:
                    self.skips["files"].append(str(exc))
                print(f"skipped: {exc}", file=sys.stderr)
                continue
            return RealSample(id=r.id, label=r.label, fitzpatrick=r.fitzpatrick, image=image, fields=r.fields,
                              looks_like=r.label, nine=r.nine, three=r.three)
        raise ImageError(f"none of the {n} images of this split can be decoded", "unreadable")


def iterate(stage: str, split: str = "train", source: str = "synthderm", n: int | None = None, seed: int = 0,
            image_size: int = 224, csv_path=None, image_dir=None, skincap_csv=None,
            stats: dict | None = None, dedup: bool = True) -> Iterator[tuple[Image.Image, str, object]]:
    """Yield (PIL image, prompt text, target record) for a stage ("stage1" captions, "stage2" diagnosis).

    source="synthderm": split is "train" / "val" / "test"; n items (default 2000 train, 500 otherwise)
      of SynthDerm(n, seed, image_size, split). The record is a SynthSample (.fields, .label, ...).
    source="fitzpatrick17k": split is "train" / "test" (random protocol) or "<protocol>/<part>" with a
      protocol from F17K_PROTOCOLS, e.g. "a12/test", "expert/test", "eval1000/test". image_dir holds the
      images; skincap_csv (optional) attaches captions, which Stage I needs, and removes every captioned
      image from test parts; dedup keeps near-duplicate groups on one side (fitzpatrick17k_records).
      Images are opened with open_image; missing or unreadable ones are counted and skipped; a summary
      line is printed at the end and the counts are written into `stats` if given.
    The record carries the target: reference_answer(stage, record) gives its canonical text.
    """
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"stage must be 'stage1' or 'stage2', got {stage!r}")
    prompt = STAGE1_PROMPT if stage == "stage1" else STAGE2_PROMPT
    stats = {} if stats is None else stats
    if source == "synthderm":
        ds = SynthDerm(n if n is not None else (2000 if split == "train" else 500), seed, image_size, split)
        for sample in ds:
            yield sample.image, prompt, sample
        stats.update(yielded=len(ds), missing=0, unreadable=0)
        return
    if source != "fitzpatrick17k":
        raise ValueError(f"source must be 'synthderm' or 'fitzpatrick17k', got {source!r}")
    recs = fitzpatrick17k_records(stage, split, csv_path, image_dir, skincap_csv, dedup)
    recs = recs[:n] if n is not None else recs
    yielded = missing = unreadable = 0
    for rec in recs:
        if rec.image_path is None:
            missing += 1
            continue
        try:
            image = open_image(rec.image_path)                # forces a full decode: truncation shows here
        except ImageError as exc:
            unreadable += 1
            print(f"skipped: {exc}", file=sys.stderr)
            continue
        yielded += 1
        yield image, prompt, rec
    stats.update(yielded=yielded, missing=missing, unreadable=unreadable)
    print(f"iterate({stage}, {split}): {yielded} images, {missing + unreadable} skipped "
          f"({missing} missing, {unreadable} unreadable)", file=sys.stderr)


def _font(size: int):
    """A PIL font of about `size` px for the contact sheet, without shipping a font file."""
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)             # scalable default font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def preview(n: int = 16, out: str = "grid.png", seed: int = 0, image_size: int = 224, split: str = "train",
            cols: int = 4) -> Path:
    """Write a labelled contact sheet of SynthDerm items: each tile shows the image and, below it, the
    label (with the mimicked look when different), skin type, lesion type and colour."""
    ds = SynthDerm(n, seed, image_size, split)
    rows = (n + cols - 1) // cols
    font_px = max(10, image_size // 16)
    text_h = 4 * (font_px + 3) + 4                           # four caption lines under every tile
    sheet = Image.new("RGB", (cols * image_size, rows * (image_size + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(font_px)
    roman = ["I", "II", "III", "IV", "V", "VI"]

    def fit(t: str) -> str:                                   # cut a line to the tile width
        # Each step replaces the last two characters (later: the previous "…" and one letter) by "…".
        while t and draw.textlength(t, font=font) > image_size - 6:
            t = t[:-2] + "…"
        return t
    for i in range(n):
        s = ds[i]
        x, y = (i % cols) * image_size, (i // cols) * (image_size + text_h)
        sheet.paste(s.image, (x, y))
        lines = (s.label,
                 f"looks like {s.looks_like}" if s.looks_like != s.label else "(no mimicry)",
                 f"FST {roman[s.fitzpatrick - 1]} | {s.fields['lesion type']} | {s.fields['location']}",
                 f"{s.fields['colour']} | {s.fields['distribution']}")
        for j, t in enumerate(lines):
            draw.text((x + 3, y + image_size + 2 + j * (font_px + 3)), fit(t),
                      fill=(150, 0, 0) if j == 1 and s.looks_like != s.label else (0, 0, 0), font=font)
    out = Path(out)
    sheet.save(out)
    return out


def bench(image_size: int = 224, n: int = 300, seed: int = 0) -> float:
    """Images per second of SynthDerm on this process (CPU time, one core: run with OMP_NUM_THREADS=1)."""
    ds = SynthDerm(n, seed, image_size)
    ds[0]                                                     # warm the noise-tile cache
    t0 = time.process_time()
    for i in range(n):
        ds[i]
    return n / (time.process_time() - t0)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help prints every flag's default: "(default: X)" is appended unless the text says it in words."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text or action.required else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser, built without running anything (test_skinflow.py walks every flag's help)."""
    H = _DefaultsHelp
    p = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n")[0], formatter_class=H)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                           help="preview | headroom | bench | download-fitzpatrick17k | fetch | near-duplicates")
    q = sub.add_parser("preview", help="write a labelled contact sheet of SynthDerm samples", formatter_class=H)
    q.add_argument("--n", type=int, default=16, help="number of samples on the sheet")
    q.add_argument("--out", default="grid.png", help="PNG to write")
    q.add_argument("--seed", type=int, default=0, help="dataset seed: which images exist (as rl.py --data-seed)")
    q.add_argument("--image-size", type=int, default=224, help="side of each rendered image in pixels")
    q.add_argument("--split", default="train", help="SynthDerm split: train | val | test")
    q = sub.add_parser("headroom", help="majority / colour-histogram / caption-oracle top-1 on SynthDerm test",
                       formatter_class=H)
    q.add_argument("--n-train", type=int, default=3000, help="rendered images the pixel baselines train on")
    q.add_argument("--n-test", type=int, default=1000, help="test images every baseline is scored on")
    q.add_argument("--image-size", type=int, default=112, help="side of the rendered images (the tiny preset's)")
    q.add_argument("--seed", type=int, default=0, help="dataset seed (the test split eval.py scores at that seed)")
    q.add_argument("--cue-amplitude", type=float, default=CUE_AMPLITUDE,
                   help="strength of the implicit texture cue that only the pixels carry; 0 removes it")
    q = sub.add_parser("bench", help="SynthDerm images/second (CPU time of this process)", formatter_class=H)
    q.add_argument("--image-size", type=int, default=224, help="side of the rendered images")
    q.add_argument("--n", type=int, default=300, help="images to render (more: a steadier rate)")
    q = sub.add_parser("download-fitzpatrick17k", help="fetch Fitzpatrick17k images from the CSV's url column",
                       formatter_class=H)
    q.add_argument("--out", required=True, help="folder for <md5hash>.jpg (required; resumable)")
    q.add_argument("--csv", default=None, help="default: assets/fitzpatrick17k.csv.gz")
    q.add_argument("--limit", type=int, default=None, help="first N CSV rows only, a quick trial (default: all)")
    q.add_argument("--timeout", type=float, default=20.0, help="seconds per request before it counts as failed")
    q.add_argument("--retries", type=int, default=3, help="attempts per image (exponential backoff between)")
    q = sub.add_parser("fetch", help="backbone + Fitzpatrick17k images + SkinCAP CSV, one command (resumable)",
                       formatter_class=H)
    q.add_argument("--out", required=True, help="images go to OUT/images, SkinCAP to OUT/skincap (required)")
    q.add_argument("--csv", default=None, help="default: assets/fitzpatrick17k.csv.gz (all 16,577 rows)")
    q.add_argument("--backbone", default="3b", help="Qwen2.5-VL weights into the HF cache: 3b | 7b | a Hub repo id "
                                                     "| none (the tiny preset needs none)")
    q.add_argument("--no-skincap", action="store_true", help="do not try the gated SkinCAP dataset (without its "
                                                              "captions train.sh skips Stage I)")
    q.add_argument("--no-images", action="store_true", help="skip the Fitzpatrick17k images")
    q.add_argument("--limit", type=int, default=None, help="first N CSV rows only, a quick trial (default: all)")
    q.add_argument("--workers", type=int, default=8, help="parallel image downloads")
    q.add_argument("--dry-run", action="store_true", help="check the flags and exit (train.sh DRY_RUN=1)")
    q.add_argument("--timeout", type=float, default=20.0, help="seconds per request before it counts as failed")
    q.add_argument("--retries", type=int, default=3, help="attempts per image (exponential backoff between)")
    q = sub.add_parser("near-duplicates", help="pHash groups of an image folder (timed, cached)", formatter_class=H)
    q.add_argument("image_dir", help="folder of images (the hash cache is written into it)")
    q.add_argument("--limit", type=int, default=None, help="first N files (sorted) only (default: all)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The CLI (subcommands in the module docstring); returns the process exit status."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.cmd == "preview":
        print(preview(args.n, args.out, args.seed, args.image_size, args.split))
    elif args.cmd == "headroom":
        headroom(args.n_train, args.n_test, args.image_size, args.seed, cue_amplitude=args.cue_amplitude)
    elif args.cmd == "bench":
        print(f"SynthDerm {args.image_size}px: {bench(args.image_size, args.n):.0f} images/s (one core, CPU time)")
    elif args.cmd == "download-fitzpatrick17k":
        s = download_fitzpatrick17k(args.out, args.csv, args.limit, timeout=args.timeout, retries=args.retries)
        return 1 if s["failed"] and not (s["ok"] or s["skipped"]) else 0
    elif args.cmd == "fetch" and args.dry_run:
        return 0
    elif args.cmd == "fetch":
        s = fetch(args.out, args.csv, None if args.backbone.lower() == "none" else args.backbone,
                  skincap=not args.no_skincap, images=not args.no_images, limit=args.limit,
                  timeout=args.timeout, retries=args.retries, workers=args.workers)
        # failure = the run cannot start: no backbone, or not a single image; a missing SkinCAP only
        # costs Stage I (the loud notice above), so it is not an error
        no_images = "images" in s and not (s["images"]["ok"] or s["images"]["skipped"])
        return 1 if (s.get("backbone") or {}).get("error") or no_images else 0
    elif args.cmd == "near-duplicates":
        files = sorted(str(f) for f in Path(args.image_dir).iterdir()
                       if f.suffix in IMAGE_EXTENSIONS)[:args.limit]
        st: dict = {}
        t0 = time.perf_counter()
        near_duplicate_groups(files, cache_path=Path(args.image_dir) / PHASH_CACHE, stats=st)
        dt = time.perf_counter() - t0
        print(f"{st['images']} images -> {st['groups']} groups; {st['merged_groups']} merged groups hold "
              f"{st['merged_images']} images; {dt:.2f} s ({1000 * dt / max(1, st['images']):.2f} ms/image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
