"""HermesToolParser: ``<tool_call>{json}</tool_call>`` blocks in a model turn -> calls, errors and the rest."""

import pytest

from gspo_lightning.agents import TOOL_PARSERS, HermesToolParser, ToolCall

P = HermesToolParser()


def test_one_call():
    turn = P.parse('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')
    assert turn.calls == [ToolCall("add", {"a": 1, "b": 2})]
    assert turn.errors == [] and turn.content == "" and turn.has_calls


def test_two_calls_in_order_and_content_outside_them():
    text = (
        'let me add. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> then'
        '<tool_call>\n{"name": "mul", "arguments": {"x": [3]}}\n</tool_call> done'
    )
    turn = P.parse(text)
    assert [c.name for c in turn.calls] == ["add", "mul"]
    assert turn.calls[1].arguments == {"x": [3]}
    assert turn.content == "let me add.  then done"
    assert turn.errors == []


def test_no_call():
    turn = P.parse("the answer is 3")
    assert turn.calls == [] and turn.errors == [] and not turn.has_calls
    assert turn.content == "the answer is 3"


def test_malformed_json_is_an_error_and_the_good_call_still_runs():
    turn = P.parse('<tool_call>{"name": "add", </tool_call><tool_call>{"name": "add", "arguments": {}}</tool_call>')
    assert turn.calls == [ToolCall("add", {})]
    assert len(turn.errors) == 1 and turn.errors[0].startswith("Error:") and "JSON" in turn.errors[0]
    assert turn.has_calls


@pytest.mark.parametrize("body", ['{"arguments": {"a": 1}}', '{"name": 3}', "[1, 2]", '"add"'])
def test_missing_or_non_string_name_is_an_error(body):
    turn = P.parse(f"<tool_call>{body}</tool_call>")
    assert turn.calls == []
    assert turn.errors == ['Error: a tool call must be a JSON object with a string "name".']
    assert turn.has_calls  # a malformed call is answered with its error


def test_arguments_as_a_json_string_are_accepted():
    turn = P.parse('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    assert turn.calls == [ToolCall("add", {"a": 1, "b": 2})] and turn.errors == []


@pytest.mark.parametrize("arguments", ['"not json"', "[1, 2]", "5"])
def test_arguments_not_an_object_are_an_error(arguments):
    turn = P.parse(f'<tool_call>{{"name": "add", "arguments": {arguments}}}</tool_call>')
    assert turn.calls == []
    assert len(turn.errors) == 1 and "'add'" in turn.errors[0] and "JSON object" in turn.errors[0]


def test_missing_arguments_default_to_none():
    assert P.parse('<tool_call>{"name": "now"}</tool_call>').calls == [ToolCall("now", {})]


def test_unclosed_tag_is_an_error_and_cut_from_the_content():
    turn = P.parse('thinking <tool_call>{"name": "add", "arguments": {"a": 1')
    assert turn.calls == []
    assert turn.errors == ["Error: the tool call was not closed with </tool_call>."]
    assert turn.content == "thinking "


def test_closed_call_then_unclosed_one():
    turn = P.parse('<tool_call>{"name": "a", "arguments": {}}</tool_call> x <tool_call>{"name": "b"')
    assert turn.calls == [ToolCall("a", {})] and len(turn.errors) == 1 and turn.content == " x "


def test_custom_tags_and_registry():
    parser = TOOL_PARSERS.build("HermesToolParser", start="[call]", end="[/call]")
    assert parser.parse('[call]{"name": "f", "arguments": {}}[/call]').calls == [ToolCall("f", {})]
    assert parser.parse('<tool_call>{"name": "f"}</tool_call>').calls == []
    with pytest.raises(ValueError, match="non-empty"):
        HermesToolParser(start="")


def test_as_message_call():
    assert ToolCall("f", {"x": 1}).as_message_call() == {
        "type": "function",
        "function": {"name": "f", "arguments": {"x": 1}},
    }
