import re

import pytest
import regex

from routecache.domain import ChatRequest, Message, RequestValidator, Role
from routecache.errors import InvalidArgument
from routecache.router.pii import PiiValidator, find_pii, iban_valid, luhn_valid
from routecache.router.settings import ConfigError, LimitSettings, ValidatorSpec
from routecache.router.validation import (
    Configured,
    OnFail,
    RequestValidators,
    build_validator,
    build_validators,
)
from routecache.router.validators import (
    LengthValidator,
    RefusalValidator,
    RegexValidator,
    check_python_syntax,
)

REQUEST = ChatRequest(messages=(Message(Role.USER, "q"),))
LIMITS = LimitSettings()


def test_luhn_and_iban_checksums() -> None:
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid(
        "GB82 WEST 1234 5698 7654 33"
    )


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("write to jane.doe+work@mail.example.org today", "email"),
        ("call +44 20 7946 0958 now", "phone"),
        ("call (415) 555-0132 now", "phone"),
        ("card 4111-1111-1111-1111 expires", "card"),
        ("card 5500 0000 0000 0004 expires", "card"),
        ("SSN 123-45-6789", "ssn"),
        ("pay to DE89 3704 0044 0532 0130 00", "iban"),
        ("call 415 555 0132 now", "phone"),  # ten digits need no prefix
        ("call (08) 1234 567 now", "phone"),  # nine digits with an area code
        # Also shaped like a phone number: found first as the card it is, and only once.
        ("amex 3782 8224 6310 005 expires", "card"),
    ],
)
def test_pii_is_found(text: str, kind: str) -> None:
    assert [f.kind for f in find_pii(text)] == [kind]


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112 fails the Luhn check",
        "The total is 12345678 apples and 3.5 - 1.25 = 2.25",
        "On 2023-10-05 she sold 48 + 24 = 72 clips",
        "1,234,567 people",
        "order 415 555 013 shipped",  # nine digits, no prefix: not a phone number
        "code 666-45-6789",  # no SSN starts with 666
    ],
)
def test_no_false_pii(text: str) -> None:
    assert find_pii(text) == []


def test_pii_redaction_replaces_each_finding() -> None:
    validator = PiiValidator()
    text = "Mail a@b.io, card 4111 1111 1111 1111."
    assert not validator.check(text, REQUEST).passed
    assert validator.check(text, REQUEST).message == "personal data found: 1 email, 1 card"
    assert validator.redact(text) == "Mail [REDACTED EMAIL], card [REDACTED CARD]."
    assert validator.check(validator.redact(text), REQUEST).passed


def test_pii_findings_are_counted_by_kind() -> None:
    result = PiiValidator().check("a@b.io or c@d.io", REQUEST)
    assert result.message == "personal data found: 2 email"


def test_pii_kinds_can_be_narrowed() -> None:
    assert PiiValidator(["email"]).check("call +1 415 555 0132", REQUEST).passed
    narrowed = PiiValidator(["email"]).redact("a@b.io or +1 415 555 0132")
    assert narrowed == "[REDACTED EMAIL] or +1 415 555 0132"
    with pytest.raises(ValueError):
        PiiValidator(["passport"])


def test_regex_must_and_must_not() -> None:
    validator = RegexValidator([r"\d+"], [r"(?i)lorem"])
    assert validator.check("the answer is 42", REQUEST).passed
    assert "does not match" in validator.check("no digits", REQUEST).message
    assert "matches" in validator.check("42 lorem", REQUEST).message


def test_regex_patterns_take_python_syntax_only() -> None:
    # The `regex` module that runs them would take \p{L}; docs/validators.md promises Python's.
    with pytest.raises(re.error, match=r"bad escape \\p"):
        RegexValidator([r"\p{L}"], [])


@pytest.mark.parametrize(
    "pattern",
    [r"[[:digit:]]", r"[a[:^alpha:]]", r"[:digit:]", r"\\[[:digit:]]", r"a{e<=1}", r"(?:foo){e}",
     r"x{1<=e<=2}", r"x{2i+2d+1s<=4}"],
)  # fmt: skip
def test_regex_patterns_the_matching_engine_reads_otherwise_are_refused(pattern: str) -> None:
    # Checked as Python's `re` reads them ("[[:digit:]]": the characters "[:digt", then "]";
    # "{e<=1}": literal text) but matched by `regex`, which reads a POSIX class and a fuzzy
    # match: "[[:digit:]]" passed the check, then matched "5" in a must_not_match.
    with pytest.raises(re.error, match=r"reads .* differently"):
        RegexValidator([], [pattern])


@pytest.mark.parametrize(
    ("pattern", "text"),
    [(r"\[:digit:]", "say [:digit:]"), (r"x{name}", "say x{name}"), (r"a\{e<=1\}", "say a{e<=1}"),
     (r"a{2,3}", "say aa"), (r"[[]", "say ["),
     # Braces that hold no fuzzy constraint, or stand in a set: literal text in both engines.
     (r"^\s*{[\s\S]*}\s*$", ' {"a": 1} '), (r'{"d": 1}', 'say {"d": 1}'), (r"[{]i[}]", "say {i}")],
)  # fmt: skip
def test_regex_patterns_both_engines_read_alike_are_kept(pattern: str, text: str) -> None:
    assert not RegexValidator([], [pattern]).check(text, REQUEST).passed


# (pattern, texts that tell the two engines' readings apart where they differ, refused?)
_DIALECT_CASES = [
    (r"a{e<=1}", ["a{e<=1}", "b"], True),
    (r"(?:foo){e}", ["(?:foo){e}", "fo"], True),
    (r"a{d}", ["a{d}", "", "a"], True),
    (r"x{1<=e<=2}", ["x{1<=e<=2}", "y"], True),
    (r"x{2i+2d+1s<=4}", ["x{2i+2d+1s<=4}", "y"], True),
    (r"ab{e<=0}", ["ab{e<=0}", "ab"], True),  # not fuzzy after all, but the braces vanish
    (r"a{e<=1:[a-z]}", ["a{e<=1:[a-z]}", "b"], True),
    (r"x{data}", ["x{data}"], True),  # `regex` refuses it ("expected }")
    (r"{e}", ["{e}"], True),  # `regex`: "nothing for fuzzy constraint"
    (r"\\{i}", ["\\{i}", "\\"], True),  # an escaped backslash, then the brace
    (r"(?x) a { e }", ["a{e}", "b"], True),  # verbose: the spaces are not read
    (r"^\s*{[\s\S]*}\s*$", [' {"a": 1} ', "no", "{i}"], False),
    (r'{"d": 1}', ['{"d": 1}', "d", ""], False),
    (r"[{]i[}]", ["{i}", "i", ""], False),
    (r"[{] s [}]", ["{ s }", "s", ""], False),
    (r"{{ s }}", ["{{ s }}", "{s}", ""], False),  # not verbose: a space is no constraint
    (r"x{ e }", ["x{ e }", "x"], False),
    (r"x{name}", ["x{name}", "x"], False),
    (r"(a)\{e\}", ["a{e}", "a"], False),
    (r"a{2,3}", ["aa", "a"], False),
    (r"[^}{]{e}x", ["{e}x", "ax", "x"], True),  # a set, then a fuzzy constraint on it
    (r"(?#{e})a", ["a", ""], False),  # a comment
    (r"\N{digit one}{2}", ["11", "1"], False),  # a named character, then a count
]


@pytest.mark.parametrize(("pattern", "texts", "refused"), _DIALECT_CASES)
def test_regex_patterns_are_refused_exactly_where_the_engines_read_them_differently(
    pattern: str, texts: list[str], refused: bool
) -> None:
    # Compared on the engines themselves: the check must neither let a pattern `regex` reads
    # otherwise through nor refuse one both read alike (a config that worked would not start).
    assert _engines_differ(pattern, texts) is refused
    try:
        check_python_syntax(pattern)
    except re.error:
        assert refused
    else:
        assert not refused


def _engines_differ(pattern: str, texts: list[str]) -> bool:
    python = re.compile(pattern)
    try:
        matching = regex.compile(pattern)
    except (regex.error, ValueError):
        return True
    return any(bool(python.search(t)) != bool(matching.search(t)) for t in texts)


def test_a_configured_pattern_the_engines_read_differently_is_a_config_error() -> None:
    # It was an re.error traceback out of `routecache serve`, not its one-line exit 2.
    spec = ValidatorSpec(kind="regex", name="fuzzy", must_not_match=[r"a{e<=1}"])
    with pytest.raises(ConfigError, match=r"validator fuzzy: pattern 'a\{e<=1\}': a fuzzy"):
        build_validators([spec], LIMITS)


@pytest.mark.parametrize(
    ("text", "passed"),
    [
        ("", False),
        ("   ", False),
        ("I'm sorry, but I can't help with that.", False),
        ("As an AI language model, I do not have opinions.", False),
        ("I cannot assist with this request.", False),
        ("The answer is 4. Some would say 'I cannot help with that', but here it is.", True),
        ("I\u2019m sorry, but I can\u2019t help with that.", False),  # typographic apostrophes
        ('\n\n"I cannot assist with this request."', False),  # after blank lines and a quote
    ],
)
def test_refusal_and_empty_answers(text: str, passed: bool) -> None:
    assert RefusalValidator().check(text, REQUEST).passed is passed


def test_length_bounds() -> None:
    validator = LengthValidator(3, 5)
    assert validator.check("abcd", REQUEST).passed
    assert "fewer than 3" in validator.check("ab", REQUEST).message
    assert "more than 5" in validator.check("abcdef", REQUEST).message
    assert validator.check("  ", REQUEST).message == "empty answer"


def test_specs_build_with_default_actions() -> None:
    built = build_validators(
        [ValidatorSpec(kind="pii"), ValidatorSpec(kind="refusal"), ValidatorSpec(kind="length")],
        LIMITS,
    )
    assert [(c.name, c.on_fail) for c in built] == [
        ("pii", OnFail.REDACT),
        ("refusal", OnFail.ESCALATE),
        ("length", OnFail.ESCALATE),
    ]


def test_custom_validator_by_import_path() -> None:
    spec = ValidatorSpec(
        kind="custom",
        import_path="tests.unit.custom_validator:Banned",
        options={"word": "lorem"},
        on_fail="redact",
    )
    configured = build_validator(spec, LIMITS)
    assert configured.name == "banned_word" and configured.on_fail is OnFail.REDACT
    assert not configured.validator.check("lorem ipsum", REQUEST).passed


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"kind": "custom", "import_path": "tests.unit.nowhere:X"}, "No module"),
        ({"kind": "custom", "import_path": "tests.unit.custom_validator:Nope"}, "Nope"),
        ({"kind": "custom", "import_path": "tests.unit.custom_validator:Banned"}, "word"),
        ({"kind": "custom", "import_path": "builtins:object"}, "lacks name, applies_to, check"),
        (
            {
                "kind": "custom",
                "import_path": "routecache.router.validators:RefusalValidator",
                "on_fail": "redact",
            },
            "no redact",
        ),
        (
            {
                "kind": "custom",
                "import_path": "routecache.router.pii:PiiValidator",
                "options": {"kinds": ["passport"]},
            },
            "unknown PII kind",
        ),
    ],
)
def test_bad_custom_validators_fail_at_start(spec: dict[str, str], problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        build_validator(ValidatorSpec.model_validate(spec), LIMITS)


def test_inconsistent_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="redact"):
        ValidatorSpec(kind="length", on_fail="redact")
    with pytest.raises(ValueError, match="must_match"):
        ValidatorSpec(kind="regex")
    with pytest.raises(ConfigError, match="unique"):
        build_validators([ValidatorSpec(kind="pii"), ValidatorSpec(kind="pii")], LIMITS)


def test_ask_cli_parses_request_validators() -> None:
    from routecache.router.ask import _validators

    parsed = _validators(['{"kind": "regex", "must_not_match": ["x"], "on_fail": "flag"}'])
    assert parsed[0].kind == "regex" and list(parsed[0].must_not_match) == ["x"]
    with pytest.raises(ConfigError, match="--validator"):
        _validators(['{"kind": "pii", "colour": "red"}'])


@pytest.mark.parametrize("flag", ["1", "null", "true", "[]"])
def test_ask_cli_refuses_a_validator_that_is_not_a_json_object(flag: str) -> None:
    # A number or null was a TypeError traceback from ParseDict ("'int' object is not iterable").
    from routecache.router.ask import _validators

    with pytest.raises(ConfigError, match=f"--validator {re.escape(flag)}: not a JSON object"):
        _validators([flag])


def test_request_validators_are_each_named_once() -> None:
    validators = RequestValidators(LIMITS)
    twice = ChatRequest((Message(Role.USER, "q"),), validators=(RequestValidator("pii"),) * 2)
    with pytest.raises(InvalidArgument, match="already in use") as error:
        validators.build(twice, [])
    assert error.value.field == "validators[1]"


@pytest.mark.parametrize("field", ["must_match", "must_not_match"])
def test_request_patterns_are_limited_to_200_characters(field: str) -> None:
    validators = RequestValidators(LIMITS)
    at_limit = RequestValidator("regex", **{field: ("a" * 200,)})  # type: ignore[arg-type]
    validators.build(ChatRequest((Message(Role.USER, "q"),), validators=(at_limit,)), [])
    too_long = RequestValidator("regex", **{field: ("a" * 201,)})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="200 characters"):
        validators.build(ChatRequest((Message(Role.USER, "q"),), validators=(too_long,)), [])


def test_request_validator_cache_is_bounded() -> None:
    validators = RequestValidators(LIMITS, max_cached=2)

    def build(kind: str) -> object:
        asked = ChatRequest((Message(Role.USER, "q"),), validators=(RequestValidator(kind),))
        return validators.build(asked, [], "A")[0]

    first = build("pii")
    assert build("pii") is first
    build("refusal")
    build("length")  # the cache was full: flushed
    assert build("pii") is not first


def build_one(*asked: RequestValidator, reserved: tuple[str, ...] = ()) -> list[Configured]:
    return RequestValidators(LIMITS).build(
        ChatRequest((Message(Role.USER, "q"),), validators=asked), reserved
    )


def test_request_validators_keep_their_names_bounds_patterns_and_kinds() -> None:
    length, regex, pii = build_one(
        RequestValidator("length", name="short", min_chars=3, max_chars=5),
        RequestValidator("regex", must_match=(r"\d",), must_not_match=("lorem",)),
        RequestValidator("pii", pii=("email",)),
    )
    assert (length.name, regex.name, pii.name) == ("short", "regex", "pii")
    assert "fewer than 3" in length.validator.check("ab", REQUEST).message
    assert "more than 5" in length.validator.check("abcdef", REQUEST).message
    assert regex.validator.check("42", REQUEST).passed
    assert not regex.validator.check("no digits", REQUEST).passed
    assert not regex.validator.check("42 lorem", REQUEST).passed
    assert not pii.validator.check("mail jane@example.org", REQUEST).passed
    assert pii.validator.check("call +44 20 7946 0958 now", REQUEST).passed  # not asked for


def test_a_request_validator_keeps_its_on_fail() -> None:
    (flagged,) = build_one(RequestValidator("pii", on_fail="flag"))
    assert flagged.on_fail is OnFail.FLAG


def test_tenant_validators_keep_the_names_they_are_given() -> None:
    # Two regex validators under their own names are two validators, not one name repeated.
    built = build_validators(
        [ValidatorSpec(kind="regex", name="no_urls", must_not_match=["https?://"]),
         ValidatorSpec(kind="regex", name="no_ids", must_not_match=[r"id\d+"]),
         ValidatorSpec(kind="pii", name="no_mail", pii=["email"]),
         ValidatorSpec(kind="refusal", name="answers"),
         ValidatorSpec(kind="json_schema", name="strict_json")],
        LIMITS,
    )  # fmt: skip
    # Before: a json_schema validator was always named "json_schema", whatever it was given.
    names = ["no_urls", "no_ids", "no_mail", "answers", "strict_json"]
    assert [c.name for c in built] == names
    texts = ["see http://x", "see id42", "mail a@b.io", "I cannot help with that.", "no json"]
    assert [c.validator.check(t, REQUEST).name for c, t in zip(built, texts, strict=True)] == names


def test_a_tenant_length_validator_keeps_its_own_maximum() -> None:
    configured = build_validator(ValidatorSpec(kind="length", max_chars=5), LIMITS)
    assert "more than 5" in configured.validator.check("abcdef", REQUEST).message


def test_a_custom_validator_named_other_than_its_plugin_is_refused_at_load() -> None:
    # Before: the configured name was dropped silently; results and metrics used the plugin's.
    plugin = {"kind": "custom", "import_path": "tests.unit.custom_validator:Banned",
              "options": {"word": "x"}}  # fmt: skip
    with pytest.raises(ConfigError, match="named by its plugin"):
        build_validator(ValidatorSpec(**plugin, name="mine"), LIMITS)
    named = build_validator(ValidatorSpec(**plugin, name="banned_word"), LIMITS)
    assert named.name == "banned_word"


def test_a_named_request_json_schema_validator_beside_the_tenants_own_is_accepted() -> None:
    # Before: refused, "the name 'json_schema' is already in use", though named otherwise.
    (strict,) = build_one(RequestValidator("json_schema", name="strict"), reserved=("json_schema",))
    assert strict.name == "strict"


def test_a_request_validator_may_not_take_the_name_of_one_of_the_tenants() -> None:
    with pytest.raises(InvalidArgument, match="already in use") as error:
        build_one(RequestValidator("pii"), reserved=("pii",))
    assert error.value.field == "validators[0]"


@pytest.mark.parametrize(
    ("asked", "problem"),
    [
        (RequestValidator("pii", pii=("bogus",)), "pii.0: Input should be"),
        (RequestValidator("length", min_chars=9, max_chars=3), "spec: Value error, min_chars"),
        (RequestValidator("custom"), "configured per tenant"),
        (RequestValidator("regex", must_match=("(?:a{1000}){1000}",)), "repeats too large"),
        (RequestValidator("regex", must_match=("a{4294967296}",)), "too large"),
        (RequestValidator("regex", must_match=("(",)), "missing ), unterminated subpattern"),
        # `regex` would take \p{L}; the documented syntax is Python's, which has no \p.
        (RequestValidator("regex", must_not_match=(r"\p{L}",)), "bad escape \\p"),
        (RequestValidator("regex", must_match=("[[:digit:]]",)), "POSIX class"),
    ],
)
def test_a_bad_request_validator_is_named_by_its_place_and_its_field(
    asked: RequestValidator, problem: str
) -> None:
    with pytest.raises(InvalidArgument) as error:
        build_one(RequestValidator("refusal"), asked)
    assert error.value.field == "validators[1]"
    assert str(error.value).startswith("validators[1]: ") and problem in str(error.value)
