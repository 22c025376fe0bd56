"""The HTTP layer alone: `parse_chat_request` checks a body and returns plain parsed fields without
a model (no tokenizer, no image decoding)."""

import base64

import pytest

from llava_jax.inference.openai_protocol import ApiError, Limits, ParsedChat, parse_chat_request
from llava_jax.inference.sampling import Sampling

PNG_HEADER = b"\x89PNG\r\n\x1a\n"  # the bytes are carried, not decoded, at this layer


def _body(**fields):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_plain_fields_and_defaults():
    limits = Limits(default_temperature=0.5, default_top_p=0.6)
    parsed = parse_chat_request(
        _body(stop="###", seed=2**31 + 3, stream=True, top_k=0, stream_options={"include_usage": True}), limits, "m"
    )
    assert isinstance(parsed, ParsedChat)
    assert (parsed.system, parsed.turns, parsed.image, parsed.image_message) == (None, ["hi"], None, None)
    assert parsed.sampling == Sampling(0.5, 0.6, None)
    assert (parsed.seed, parsed.stops, parsed.stream, parsed.include_usage) == (3, ("###",), True, True)
    assert (parsed.max_tokens, parsed.max_tokens_param, parsed.return_token_ids) == (None, "max_tokens", False)


def test_conversation_with_system_and_image_bytes():
    url = "data:image/png;base64," + base64.b64encode(PNG_HEADER).decode()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is"},
                {"type": "text", "text": "this?"},
                {"type": "image_url", "image_url": {"url": url}},
            ],
        },
    ]
    parsed = parse_chat_request({"model": "m", "messages": messages, "max_completion_tokens": 7}, Limits(), "m")
    assert parsed.system == "be brief"
    assert parsed.turns == ["first", "ok", "what is\nthis?"]
    assert parsed.image == PNG_HEADER
    assert parsed.image_message == 2
    assert parsed.image_param == "messages[3].content[2].image_url"
    assert (parsed.max_tokens, parsed.max_tokens_param) == (7, "max_completion_tokens")


@pytest.mark.parametrize(
    "fields,status,param",
    [
        ({"model": "other"}, 404, "model"),
        ({"n": 2}, 400, "n"),
        ({"max_tokens": 2000}, 400, "max_tokens"),
        ({"temperature": 3}, 400, "temperature"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ],
)
def test_refusals_name_the_field(fields, status, param):
    with pytest.raises(ApiError) as e:
        parse_chat_request(_body(**fields), Limits(max_output_tokens=1024), "m")
    assert (e.value.status, e.value.param) == (status, param)
