"""Toolbox: schemas from typed, documented functions; every failing call answered as an ``Error:`` text."""

import time

import pytest
from scripted import add

from gspo_lightning.agents import ToolCall
from gspo_lightning.agents.tools import CallTimer, Toolbox, ToolResult, render_result, tool_schema


def lookup(key: str, default: int = 0) -> dict:
    """Look a key up in the table.

    Args:
        key: the name to look up.
        default: returned when the key is missing.
    """
    return {"key": key, "value": {"x": 7}.get(key, default)}


def untyped(a, b):
    """Add.

    Args:
        a: one.
        b: two.
    """
    return a + b


def undocumented(a: int) -> int:
    return a


def fails(x: int) -> int:
    """Always fails.

    Args:
        x: ignored.
    """
    raise RuntimeError(f"boom {x}")


def slow(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: how long to sleep.
    """
    time.sleep(seconds)
    return "slept"


def own_timeout() -> str:
    """A tool whose own I/O timed out (socket.timeout is TimeoutError)."""
    raise TimeoutError("the server did not answer")


def test_schema_from_a_typed_documented_function():
    schema = tool_schema(lookup)
    assert schema["type"] == "function"
    fn = schema["function"]
    assert fn["name"] == "lookup" and fn["description"] == "Look a key up in the table."
    assert fn["parameters"]["properties"]["key"] == {"type": "string", "description": "the name to look up."}
    assert fn["parameters"]["properties"]["default"]["type"] == "integer"
    assert fn["parameters"]["required"] == ["key"]


@pytest.mark.parametrize("fn", [untyped, undocumented], ids=["no type hints", "no docstring"])
def test_tool_that_cannot_be_described_is_refused_naming_the_fix(fn):
    with pytest.raises(ValueError) as info:
        Toolbox([add, fn])
    message = str(info.value)
    assert fn.__name__ in message and "\n" not in message
    assert "type hint" in message and "docstring" in message and "Args:" in message


def test_two_tools_with_one_name_are_refused():
    def add(x: int) -> int:
        """Another add.

        Args:
            x: x.
        """
        return x

    from scripted import add as first

    with pytest.raises(ValueError, match=r"\['add'\]"):
        Toolbox([first, add])


def test_a_good_call_and_its_rendering():
    box = Toolbox([add, lookup])
    assert box.names == ["add", "lookup"] and len(box) == 2
    assert box.call(ToolCall("add", {"a": 2, "b": 3})) == ToolResult("5", False)
    assert box.call(ToolCall("lookup", {"key": "x"})) == ToolResult('{"key": "x", "value": 7}', False)
    assert render_result([1, (2, 3)]) == "[1, [2, 3]]" and render_result({1, 2}) in ("{1, 2}", "{2, 1}")


def _assert_error(result: ToolResult, *words: str) -> None:
    assert isinstance(result, ToolResult) and result.error
    assert result.text.startswith("Error:")
    for word in words:
        assert word in result.text, result.text


def test_unknown_tool_names_the_tools():
    _assert_error(Toolbox([add, lookup]).call(ToolCall("sub", {"a": 1})), "'sub'", "add, lookup")


@pytest.mark.parametrize("arguments", [{"a": 1}, {"a": 1, "b": 2, "c": 3}, {"x": 1, "y": 2}])
def test_bad_arguments(arguments):
    _assert_error(Toolbox([add]).call(ToolCall("add", arguments)), "bad arguments", "'add'")


def test_a_raising_tool_is_answered_not_raised():
    _assert_error(Toolbox([fails]).call(ToolCall("fails", {"x": 4})), "RuntimeError", "boom 4")


def test_a_tool_past_its_timeout_is_abandoned():
    box = Toolbox([slow, add], CallTimer(0.2))
    start = time.perf_counter()
    result = box.call(ToolCall("slow", {"seconds": 1.5}))
    assert time.perf_counter() - start < 1.0
    _assert_error(result, "timed out", "0.2")
    # the next call gets a fresh worker thread and works
    assert box.call(ToolCall("add", {"a": 1, "b": 1})) == ToolResult("2", False)
    assert box.call(ToolCall("slow", {"seconds": 0.0})) == ToolResult("slept", False)


@pytest.mark.parametrize("timeout_s", [None, 5.0])
def test_a_tool_raising_its_own_timeout_error_is_answered(timeout_s):
    result = Toolbox([own_timeout], CallTimer(timeout_s)).call(ToolCall("own_timeout", {}))
    _assert_error(result, "TimeoutError", "the server did not answer")


def test_call_timer_without_limit_runs_in_the_callers_thread():
    import threading

    timer = CallTimer(None)
    assert timer.run(lambda: threading.current_thread(), {}) is threading.current_thread()
    with pytest.raises(ValueError):
        CallTimer(0)
