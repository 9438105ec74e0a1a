"""Unit tests of the pure parts of sdk/worker.py: handler results and failure texts."""

from __future__ import annotations

import pytest

from sdk import NonRetryableError, Worker
from sdk.worker import MAX_ERROR_CHARS, error_text, normalize_result


def test_a_result_and_quality_pair_is_taken_as_it_is() -> None:
    assert normalize_result(({"n": 1}, 0.75)) == ({"n": 1}, 0.75)
    assert normalize_result([{"n": 1}, 1]) == ({"n": 1}, 1.0)


def test_a_bare_dict_means_full_quality() -> None:
    assert normalize_result({"n": 1}) == ({"n": 1}, 1.0)


@pytest.mark.parametrize(
    "value", [None, 42, ({"n": 1},), ("text", 0.5), ({"n": 1}, "high"), ({"n": 1}, True)]
)
def test_other_shapes_are_type_errors(value: object) -> None:
    with pytest.raises(TypeError):
        normalize_result(value)


@pytest.mark.parametrize("quality", [-0.1, 1.01, float("nan")])
def test_a_quality_outside_zero_to_one_is_a_value_error(quality: float) -> None:
    with pytest.raises(ValueError):
        normalize_result(({}, quality))


def test_failure_texts_name_the_exception_and_are_bounded() -> None:
    assert error_text(KeyError("path")) == "KeyError: 'path'"
    assert error_text(NonRetryableError()) == "NonRetryableError"
    assert len(error_text(RuntimeError("x" * 20_000))) == MAX_ERROR_CHARS


def test_a_worker_refuses_a_nonsense_configuration() -> None:
    async def handler(ctx: object) -> tuple[dict[str, object], float]:
        return {}, 1.0

    common = dict(name="n", capabilities={"python": 1.0}, handler=handler)
    with pytest.raises(ValueError):
        Worker("http://x", agent_id="", **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Worker("http://x", agent_id="a", max_concurrent_tasks=0, **common)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Worker("http://x", agent_id="a", heartbeat_interval_s=0, **common)  # type: ignore[arg-type]
