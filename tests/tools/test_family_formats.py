"""Each family's tool-call format with its real chat template (tests/chat_templates/SOURCES.md).

For every template: the format is detected from it; a conversation with tools, a past
call and its result renders with all three in it; the call text the family's models
write parses back to the calls; and a tiny random-weight model carrying the template,
constrained with tool_choice=required, writes calls that parse and validate.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from transformers import AutoTokenizer

from selfhost import LLM, SamplingParams
from selfhost.tools.calls import ToolCall, ToolChoice, ToolSpec
from selfhost.tools.formats import detect_format
from selfhost.tools.model_tools import ModelTools
from tests.tiny_models import make_tiny_model, save_tiny_tokenizer

TEMPLATES = Path(__file__).parent.parent / "chat_templates"

WEATHER = ToolSpec("get_weather", "Current weather in a city", {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"]})

# file -> (format, the family's special tokens, a call as the family's models write it)
FAMILIES = {
    "qwen2_5": ("hermes", {"tokens": ["<tool_call>", "</tool_call>"]},
                'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n'
                '</tool_call>'),
    "qwen3": ("hermes", {"tokens": ["<tool_call>", "</tool_call>"]},
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'),
    "mistral_v0_3": ("mistral", {"special": ["[TOOL_CALLS]"]},
                     '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]'),
    "phi4_mini": ("phi4", {"special": ["<|tool_call|>", "<|/tool_call|>"]},
                  '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}]<|/tool_call|>'),
    "llama3_1": ("llama3", {"special": ["<|python_tag|>"]},
                 '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}'),
    "llama3_2": ("llama3", {"special": ["<|python_tag|>"]},
                 '{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}'),
    "gemma2": ("prompted", {},
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'),
    "gemma3": ("prompted", {},
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'),
}


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("weights"), max_position_embeddings=4096)


def _checkpoint(family: str, weights: Path, out: Path) -> Path:
    """The tiny weights with a tokenizer that has the family's template and call-marker tokens."""
    for f in weights.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    save_tiny_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokens = FAMILIES[family][1]
    tokenizer.add_tokens(tokens.get("tokens", []))
    tokenizer.add_special_tokens({"additional_special_tokens": tokens.get("special", [])})
    tokenizer.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family_llm(tiny_weights, tmp_path_factory):
    cache = {}

    def build(family: str) -> LLM:
        if family not in cache:
            folder = _checkpoint(family, tiny_weights, tmp_path_factory.mktemp(family))
            cache[family] = LLM(str(folder), kv_cache_memory="32MiB")
        return cache[family]

    return build


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Oslo for 2 days?"},
    {"role": "assistant", "content": "", "tool_calls": [ToolCall("call_abc", "get_weather", '{"city": "Oslo", "days": 2}')]},
    {"role": "tool", "tool_call_id": "call_abc", "name": "get_weather", "content": "Sunny, 3 C"},
    {"role": "assistant", "content": "Sunny in Oslo."},
    {"role": "user", "content": "And Paris?"},
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_format_is_detected_from_the_template(family):
    assert detect_format((TEMPLATES / f"{family}.jinja").read_text()).name == FAMILIES[family][0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tools_past_calls_and_results_render(family, family_llm):
    llm = family_llm(family)
    tools = ModelTools(llm.tokenizer)
    rendered = llm.tokenizer.hf.decode(tools.encode_chat(CONVERSATION, [WEATHER]))
    assert "get_weather" in rendered and "Current weather in a city" in rendered  # the tool
    assert "Sunny, 3 C" in rendered  # the result
    assert '"Oslo"' in rendered and "And Paris?" in rendered  # the past call's arguments, the new turn


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_familys_call_text_parses(family, family_llm):
    llm = family_llm(family)
    tools = ModelTools(llm.tokenizer)
    ids = llm.tokenizer.hf.encode(FAMILIES[family][2], add_special_tokens=False)
    parsed = tools.parse(ids)
    assert [(c.name, c.arguments_dict) for c in parsed.calls] == [("get_weather", {"city": "Oslo", "days": 2})]
    stream = tools.stream()
    streamed = "".join(stream.update(tools.output_text(ids[:n])) for n in range(1, len(ids) + 1))
    rest, calls = stream.finish()
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in parsed.calls]
    assert (streamed + rest).strip() == parsed.content


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_required_call_is_a_valid_call(family, family_llm):
    llm = family_llm(family)
    tools = ModelTools(llm.tokenizer)
    prompt = tools.encode_chat(CONVERSATION[:2], [WEATHER])
    # One call: this tokenizer spells JSON almost byte by byte, ~90 tokens a call.
    constraint = tools.constraint([WEATHER], ToolChoice("required"), parallel=False)
    for seed in range(3):
        out = llm.generate([prompt], SamplingParams(max_tokens=300, temperature=1.0, seed=seed,
                                                    structured_output=constraint))[0]
        assert out.finish_reason == "stop", out.text
        calls = tools.parse(out.token_ids).calls
        assert calls and all(c.name == "get_weather" for c in calls)
        for call in calls:
            jsonschema.validate(call.arguments_dict, WEATHER.parameters)


def test_mistral_ids_are_made_nine_characters(family_llm):
    llm = family_llm("mistral_v0_3")
    rendered = llm.tokenizer.hf.decode(ModelTools(llm.tokenizer).encode_chat(CONVERSATION, [WEATHER]))
    ids = [m for m in json.loads(rendered.split("[TOOL_CALLS]")[1].split("</s>")[0])]
    assert len(ids[0]["id"]) == 9


@pytest.mark.parametrize("family", ["qwen2_5", "gemma2", "llama3_1", "mistral_v0_3"])
def test_auto_leaves_text_free_and_constrains_a_call_once_opened(family, family_llm):
    llm = family_llm(family)
    tools = ModelTools(llm.tokenizer)
    grammar = llm.engine.grammars
    constraint = tools.constraint([WEATHER], ToolChoice("auto"))
    encode = lambda text: llm.tokenizer.hf.encode(text, add_special_tokens=False)  # noqa: E731

    def accepts(text: str) -> bool:
        matcher = grammar.matcher(constraint)
        return matcher.consume_tokens(encode(text)) and matcher.is_accepting()

    call = FAMILIES[family][2]
    assert accepts("It is sunny today.")  # free text
    assert accepts(call)  # a valid call
    bad_call = call.replace('"days": 2', '"days": 9')  # outside the schema's bounds
    assert not accepts(bad_call)
