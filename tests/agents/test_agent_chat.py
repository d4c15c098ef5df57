"""MessageRenderer and the template checks on the demo's tool-capable chat tokenizer."""

import pytest
from scripted import add, chat_tokenizer, encode

from gspo_lightning.agents.tools import Toolbox
from gspo_lightning.data.chat import MessageRenderer, check_tool_template, renders_tools, rewrites_history
from gspo_lightning.demo.tokenizer import CHAT_TEMPLATE, build_char_tokenizer

SCHEMAS = Toolbox([add]).schemas

# the demo template without its tools block: it never shows the tools to the model
NO_TOOLS_TEMPLATE = CHAT_TEMPLATE[CHAT_TEMPLATE.index("{%- for m in messages %}") :]

# a template that drops the content of assistant turns before the last user turn (as Qwen3 drops <think>)
FORGETFUL_TEMPLATE = (
    "{%- set ns = namespace(last=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}<|user|>{{ m.content }}<eos>"
    "{%- elif m.role == 'assistant' %}<|assistant|>{% if loop.index0 > ns.last %}{{ m.content }}{% endif %}<eos>"
    "{%- elif m.role == 'tool' %}<|user|><tool_response>{{ m.content }}</tool_response><eos>"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def test_tool_message_ids_are_the_tokenised_template_suffix(tok):
    renderer = MessageRenderer(tok, SCHEMAS)
    assert renderer.ends_with_eos
    expected = "<|user|><tool_response>3</tool_response><eos><|assistant|>"
    assert renderer.text([{"role": "tool", "name": "add", "content": "3"}]) == expected
    ids = renderer.ids([{"role": "tool", "name": "add", "content": "3"}])
    assert ids == encode(tok, expected)
    assert tok.convert_ids_to_tokens(ids) == [
        "<|user|>", "<tool_response>", "3", "</tool_response>", "<eos>", "<|assistant|>",
    ]  # fmt: skip


def test_consecutive_tool_messages_share_one_user_turn(tok):
    ids = MessageRenderer(tok, SCHEMAS).ids([{"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}])
    assert ids == encode(
        tok, "<|user|><tool_response>1</tool_response><tool_response>2</tool_response><eos><|assistant|>"
    )


def test_appended_ids_equal_the_full_rendering_for_a_prefix_stable_template(tok):
    """prompt + the model's turn (as the template would write it) + suffix == the whole conversation rendered."""
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    user = [{"role": "user", "content": "1+2"}]
    assistant = {"role": "assistant", "content": "", "tool_calls": [call]}
    tool = [{"role": "tool", "name": "add", "content": "3"}]
    prompt = tok.apply_chat_template(user, tools=SCHEMAS, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([*user, assistant, *tool], tools=SCHEMAS, add_generation_prompt=True, tokenize=False)
    model_turn = '<tool_call>{"name":"add","arguments":{"a": 1, "b": 2}}</tool_call><eos>'
    assert full.startswith(prompt + model_turn)
    ids = encode(tok, prompt) + encode(tok, model_turn) + MessageRenderer(tok, SCHEMAS).ids(tool)
    assert ids == encode(tok, full)


def test_renderer_refuses_a_tokenizer_without_chat_template():
    with pytest.raises(ValueError, match="chat template"):
        MessageRenderer(build_char_tokenizer())


def test_check_tool_template_accepts_the_demo_template(tok):
    assert renders_tools(tok, SCHEMAS)
    check_tool_template(tok, SCHEMAS)  # no error


def test_check_tool_template_refuses_no_template():
    with pytest.raises(ValueError) as info:
        check_tool_template(build_char_tokenizer(), SCHEMAS)
    assert "no chat template" in str(info.value) and "\n" not in str(info.value)


def test_check_tool_template_refuses_a_template_ignoring_tools():
    tok = chat_tokenizer()
    tok.chat_template = NO_TOOLS_TEMPLATE
    assert not renders_tools(tok, SCHEMAS)
    with pytest.raises(ValueError) as info:
        check_tool_template(tok, SCHEMAS)
    assert "ignores tools" in str(info.value) and "\n" not in str(info.value)


def test_check_tool_template_refuses_a_template_dropping_tool_messages():
    tok = chat_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace("<tool_response>{{ m.content }}</tool_response>", "<tool_response>")
    with pytest.raises(ValueError, match="drops tool messages"):
        check_tool_template(tok, SCHEMAS)


def test_rewrites_history(tok):
    assert not rewrites_history(tok)
    assert not rewrites_history(tok, SCHEMAS)
    forgetful = chat_tokenizer()
    forgetful.chat_template = FORGETFUL_TEMPLATE
    assert rewrites_history(forgetful)
    # the same template keeping every assistant turn's content is prefix-stable
    forgetful.chat_template = FORGETFUL_TEMPLATE.replace("{% if loop.index0 > ns.last %}{{ m.content }}{% endif %}",
                                                         "{{ m.content }}")  # fmt: skip
    assert not rewrites_history(forgetful)
