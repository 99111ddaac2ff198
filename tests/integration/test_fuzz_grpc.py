"""Malformed requests over real gRPC never crash the server: every reply is a valid answer or
a caller-side status (INVALID_ARGUMENT, UNAUTHENTICATED, RESOURCE_EXHAUSTED for size, NOT_FOUND
for feedback on an unknown id, FAILED_PRECONDITION when the caller's own validators reject
every answer), never UNKNOWN, INTERNAL or UNAVAILABLE.

Hypothesis draws every field of the protos: huge, empty and any-Unicode strings, unknown enum
numbers, negative, NaN and infinite numbers, missing messages, random roles, validators and
metadata. The example count is bounded so the run takes seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from routecache.v1 import routecache_pb2 as pb
from routecache.v1 import routecache_pb2_grpc as pb_grpc
from tests.threaded_service import ThreadedService, threaded_service

pytestmark = pytest.mark.integration

KEYS = {"acme": "fuzz-key-acme", "globex": "fuzz-key-globex"}
MAX_REQUEST_BYTES = 64 * 1024  # small, so oversized messages are cheap to send

Code = grpc.StatusCode
ALWAYS_ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED}

# Protobuf strings are UTF-8: lone surrogates cannot be sent at all.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
prompts = st.sampled_from(["What is 2 + 2?", "Name a colour", "  ", "\u0000", "日本の首都は?"])
texts = st.one_of(any_text, any_text, prompts, st.just(""))
enums = st.integers(-3, 6)
uint32 = st.integers(0, 2**32 - 1)
doubles = st.floats(allow_nan=True, allow_infinity=True)
# Mostly plausible values, so that requests also get past the checks and are answered.
roles = st.one_of(st.just(pb.ROLE_USER), st.just(pb.ROLE_USER), st.just(pb.ROLE_SYSTEM), enums)
schemas = st.sampled_from(
    [
        '{"type": "object", "required": ["answer"]}',
        '{"$ref": "http://127.0.0.1:9/evil.json"}',
        '{"$ref": "#/$defs/missing"}',
        '{"type": "nope"}',
        '{"pattern": "["}',
        "[" * 3000,
        "not json",
    ]
)
validators = st.builds(
    pb.RequestValidator,
    kind=st.one_of(
        st.sampled_from(["json_schema", "regex", "length", "pii", "refusal", "custom"]), any_text
    ),
    name=any_text,
    on_fail=st.one_of(st.sampled_from(["escalate", "retry", "redact", "flag", "block"]), any_text),
    must_match=st.lists(st.one_of(any_text, st.just("(a+)+[")), max_size=3),
    must_not_match=st.lists(any_text, max_size=3),
    min_chars=st.one_of(st.integers(0, 50), uint32),
    max_chars=st.one_of(st.integers(0, 50), uint32),
    pii=st.lists(st.one_of(st.sampled_from(["email", "phone", "card"]), any_text), max_size=3),
)


def maybe(values: st.SearchStrategy[Any], plausible: st.SearchStrategy[Any]) -> Any:
    return st.one_of(plausible, plausible, values)


FIELDS = ("messages", "role", "content", "end_user_id", "validators", "temperature", "top_p",
          "max_tokens", "format", "schema", "ttl", "tags", "force_tier")  # fmt: skip


@st.composite
def complete_requests(draw: st.DrawFn) -> pb.CompleteRequest:
    # One field (or none) is drawn from anything, the rest from plausible values: so the
    # check of each field is reached, and so is the answering path behind the checks.
    odd = draw(st.sampled_from((None, None, None, *FIELDS)))

    def pick(
        field: str, anything: st.SearchStrategy[Any], plausible: st.SearchStrategy[Any]
    ) -> Any:
        return draw(anything if field == odd else plausible)

    role = pick("role", roles, st.just(pb.ROLE_USER))
    content = pick("content", texts, prompts)
    request = pb.CompleteRequest(
        messages=pick(
            "messages",
            st.lists(st.builds(pb.ChatMessage, role=roles, content=texts), max_size=4),
            st.lists(
                st.builds(pb.ChatMessage, role=st.just(pb.ROLE_SYSTEM), content=prompts), max_size=1
            ),
        ),
        end_user_id=pick("end_user_id", any_text, st.sampled_from(["", "user-1"])),
        validators=pick("validators", st.lists(validators, min_size=1, max_size=2), st.just([])),
    )
    request.messages.add(role=role, content=content)
    params = request.params
    if draw(st.booleans()):
        params.temperature = pick("temperature", doubles, st.floats(0, 2))
    if draw(st.booleans()):
        params.top_p = pick("top_p", doubles, st.floats(0.01, 1))
    if draw(st.booleans()):
        params.max_tokens = pick("max_tokens", uint32, st.integers(1, 4096))
    params.response_format.type = pick("format", enums, st.sampled_from([0, 1, 2, 3, 3]))
    if params.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA or odd == "schema":
        plausible_schema = st.just('{"type": "object"}')
        params.response_format.json_schema = pick("schema", st.one_of(schemas, any_text),
                                                  plausible_schema)  # fmt: skip
    request.cache.no_cache = draw(st.booleans())
    request.cache.no_store = draw(st.booleans())
    request.cache.ttl_seconds = pick("ttl", uint32, st.integers(0, 10**6))
    request.cache.tags.extend(pick("tags", st.lists(any_text, max_size=3), st.lists(st.just("t"))))
    request.routing.force_tier = pick("force_tier", enums, st.sampled_from([0, 1, 2]))
    oversize = draw(st.sampled_from([0] * 8 + [20_000, 70_000]))
    if oversize:  # one huge field, just under or over the size limit
        target = draw(st.sampled_from(["content", "end_user_id", "tag"]))
        huge = "é" * oversize
        if target == "content":
            request.messages.add(role=pb.ROLE_USER, content=huge)
        elif target == "end_user_id":
            request.end_user_id = huge
        else:
            request.cache.tags.append(huge)
    return request


ascii_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
VALID_AUTH = [f"Bearer {KEYS['acme']}", f"bearer {KEYS['globex']}"]
odd_auth = st.one_of(st.sampled_from(["Bearer ", "Basic x", "Bearer nope", KEYS["acme"]]),
                     ascii_values)  # fmt: skip
extra_metadata = st.lists(
    st.one_of(
        st.tuples(st.just("authorization"), odd_auth),
        st.tuples(st.just("x-request-id"), ascii_values),
        st.tuples(st.from_regex(r"\Ax-[a-z0-9_.-]{1,20}\Z"), ascii_values),
    ),
    max_size=3,
)


@st.composite
def metadata(draw: st.DrawFn) -> list[tuple[str, str]]:
    """Mostly a valid key first (so the calls get past auth), else none or an odd one."""
    kind = draw(st.sampled_from(["valid"] * 6 + ["none", "odd"]))
    first = {"valid": st.sampled_from(VALID_AUTH), "odd": odd_auth}.get(kind)
    auth = [] if first is None else [("authorization", draw(first))]
    return [*auth, *draw(extra_metadata)]


feedbacks = st.builds(
    pb.FeedbackRequest,
    response_id=st.one_of(any_text, st.just("f" * 300)),
    rating=enums,
    correction=any_text,
    comment=st.one_of(any_text, st.just("c" * 9000)),
)
invalidations = st.one_of(
    st.just(pb.InvalidateRequest()),
    st.builds(pb.InvalidateRequest, entry_id=st.one_of(any_text, st.just("e" * 300))),
    st.builds(pb.InvalidateRequest, tag=any_text),
    st.builds(pb.InvalidateRequest, all=st.booleans()),
)
calls = st.one_of(
    st.tuples(st.just("Complete"), complete_requests()),
    st.tuples(st.just("Complete"), complete_requests()),
    st.tuples(st.just("CompleteStream"), complete_requests()),
    st.tuples(st.just("Feedback"), feedbacks),
    st.tuples(st.just("Invalidate"), invalidations),
    st.tuples(
        st.just("GetStats"),
        st.builds(pb.GetStatsRequest, top_n=maybe(uint32, st.integers(0, 120))),
    ),
)


@pytest.fixture(scope="module")
def running() -> Iterator[ThreadedService]:
    with threaded_service(KEYS, limits={"max_request_bytes": MAX_REQUEST_BYTES}) as service:
        yield service


@pytest.fixture(scope="module")
def stub(running: ThreadedService) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        yield pb_grpc.RouteCacheStub(channel), health_pb2_grpc.HealthStub(channel)


def allowed(method: str, request: Any) -> set[grpc.StatusCode]:
    codes = set(ALWAYS_ALLOWED)
    if request.ByteSize() > MAX_REQUEST_BYTES:
        codes.add(Code.RESOURCE_EXHAUSTED)
    if method == "Feedback":
        codes.add(Code.NOT_FOUND)
    wants_json = request.params.response_format.type != 0 if method.startswith("C") else False
    if method.startswith("Complete") and (request.validators or wants_json):
        # The caller's own validators can reject any answer, and a JSON answer cut short by a
        # small max_tokens fails the JSON check of both models: the defined outcome of both.
        codes.add(Code.FAILED_PRECONDITION)
    return codes


def send(stub: Any, method: str, request: Any, md: list[tuple[str, str]]) -> grpc.StatusCode:
    try:
        if method == "CompleteStream":
            for _ in stub.CompleteStream(request, metadata=md, timeout=20):
                pass
        else:
            getattr(stub, method)(request, metadata=md, timeout=20)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        import os

        if os.environ.get("FUZZ_DEBUG"):
            print("DBG", method, code.name, (error.details() or "")[:80])
        return code
    return Code.OK


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large],
)  # fmt: skip
@given(call=calls, md=metadata())
def test_fuzzed_requests_get_a_caller_status_or_an_answer(
    stub: Any, call: tuple[str, Any], md: list[tuple[str, str]]
) -> None:
    method, request = call
    routecache, _ = stub
    code = send(routecache, method, request, md)
    event(f"{method} {code.name}")  # pytest --hypothesis-show-statistics: what was reached
    assert code in allowed(method, request), f"{method} -> {code.name}"


def test_the_server_still_serves_after_the_fuzzing(stub: Any) -> None:
    routecache, health = stub
    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    request = pb.CompleteRequest(messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hi there")])
    answer = routecache.Complete(
        request, metadata=[("authorization", f"Bearer {KEYS['acme']}")], timeout=20
    )
    assert answer.text
