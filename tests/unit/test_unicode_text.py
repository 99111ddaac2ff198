"""uncased_form: the one normal form of what the uncased MiniLM sees of a text."""

from __future__ import annotations

from routecache.unicode_text import uncased_form


def test_uncased_form_folds_case_spacing_unicode_form_and_nonspacing_marks() -> None:
    # The uncased MiniLM's tokenizer lower-cases, strips the nonspacing marks of the NFD form
    # and splits on white space: these all embed identically (cosine 1.0).
    forms = {"Wie zählen wir das?", "wie za\u0308hlen\n wir  DAS?", " WIE ZAHLEN WIR DAS? "}
    assert {uncased_form(text) for text in forms} == {"wie zahlen wir das?"}
    assert uncased_form("Stra\u00dfe") == "strasse"  # casefold, as the exact cache key's
    assert uncased_form("कुल") == "कल"  # a Hindi vowel sign is a nonspacing mark too


def test_uncased_form_keeps_what_the_model_sees() -> None:
    assert uncased_form("count apples 1") != uncased_form("count apples 10")
    assert uncased_form("ab") != uncased_form("a b")
