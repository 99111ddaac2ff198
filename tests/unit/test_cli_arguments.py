"""Bad values on the `routecache` command line: a usage error or one line, exit 2."""

from __future__ import annotations

import pytest

from routecache.router.cli import main


@pytest.mark.parametrize(
    "flags",
    [["--concurrency", "0"], ["--concurrency", "-1"], ["--recorded", "0"],
     ["--upstream-latency-ms", "-5"]],
    ids=["concurrency 0", "negative concurrency", "nothing recorded", "negative latency"],
)  # fmt: skip
def test_demo_refuses_counts_that_cannot_run(
    capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    # --concurrency 0 was a Semaphore(0): the demo hung for ever after starting the service.
    with pytest.raises(SystemExit) as exit_:
        main(["demo", *flags])
    assert exit_.value.code == 2
    assert f"argument {flags[0]}" in capsys.readouterr().err
