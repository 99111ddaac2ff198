"""uncased_form: the one normal form of what the uncased MiniLM sees of a text (checked against
the packaged tokenizer itself in tests/integration/test_onnx_embedder.py)."""

from __future__ import annotations

from routecache.unicode_text import uncased_form


def test_uncased_form_folds_case_spacing_unicode_form_and_nonspacing_marks() -> None:
    # The uncased MiniLM's tokenizer lower-cases, strips the nonspacing marks of the NFD form
    # and splits on white space and punctuation: these all embed identically (cosine 1.0).
    forms = {"Wie zählen wir das?", "wie za\u0308hlen\n wir  DAS ?", " WIE ZAHLEN WIR DAS? "}
    assert {uncased_form(text) for text in forms} == {"wie zahlen wir das ?"}
    assert uncased_form("What is 2+2?") == uncased_form("what is 2 + 2 ?")
    assert uncased_form("你好世界") == uncased_form("你 好 世 界")
    assert uncased_form("कुल") == "कल"  # a Hindi vowel sign is a nonspacing mark too


def test_uncased_form_keeps_what_the_model_sees() -> None:
    assert uncased_form("count apples 1") != uncased_form("count apples 10")
    assert uncased_form("ab") != uncased_form("a b")
    # Lower-cased, not casefolded: the model reads ß and ss, ﬁ and fi, apart.
    assert uncased_form("Straße") != uncased_form("STRASSE")
    assert uncased_form("\ufb01le") != uncased_form("file")
    assert uncased_form("ΟΔΟΣ") == "οδοσ"  # one character at a time: no final-sigma rule
