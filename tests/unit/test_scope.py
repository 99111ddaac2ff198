from routecache.cache.scope import exact_key, normalise_prompt, scope_key
from routecache.domain import (
    ChatRequest,
    GenerationParams,
    Message,
    ResponseFormat,
    ResponseFormatType,
    Role,
)


def ask(prompt: str, *earlier: Message, params: GenerationParams | None = None) -> ChatRequest:
    return ChatRequest(
        messages=(*earlier, Message(Role.USER, prompt)), params=params or GenerationParams()
    )


def test_same_request_same_scope() -> None:
    assert scope_key("acme", ask("hi")) == scope_key("acme", ask("other prompt"))


def test_tenant_system_prompt_context_and_params_each_change_the_scope() -> None:
    base = scope_key("acme", ask("q"))
    variants = [
        scope_key("globex", ask("q")),
        scope_key("acme", ask("q", Message(Role.SYSTEM, "be brief"))),
        scope_key(
            "acme", ask("q", Message(Role.USER, "about Rome"), Message(Role.ASSISTANT, "ok"))
        ),
        scope_key("acme", ask("q", params=GenerationParams(temperature=0.7))),
        scope_key("acme", ask("q", params=GenerationParams(max_tokens=10))),
        scope_key(
            "acme",
            ask(
                "q",
                params=GenerationParams(
                    response_format=ResponseFormat(ResponseFormatType.JSON_OBJECT)
                ),
            ),
        ),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)


def test_scope_starts_with_the_tenant() -> None:
    assert scope_key("acme", ask("q")).startswith("acme:")


def test_normalisation_folds_case_space_and_end_punctuation() -> None:
    assert (
        normalise_prompt("  What IS   the capital\tof France?? ") == "what is the capital of france"
    )
    assert normalise_prompt("ﬁle") == "file"  # NFKC ligature


def test_exact_key_differs_by_meaningful_text() -> None:
    assert exact_key("s", "What is 2+2?") == exact_key("s", "what is 2+2")
    assert exact_key("s", "What is 2+2?") != exact_key("s", "What is 2+3?")
    assert exact_key("s", "x") != exact_key("t", "x")
