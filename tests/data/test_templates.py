"""Conversation templates render the original LLaVA strings, character for character.

Expected strings are written out by hand from the original's template definitions
(``llava/conversation.py``, ``_add_speaker_and_signal`` / ``preprocess_plain`` in
``llava/train/train.py``).
"""

import pytest

from llava_jax.data.templates import TEMPLATES, Segment, get_template, move_image_placeholder

USER_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
HUMAN_SYS = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
LLAVA_LLAMA_2_SYS = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
LLAMA_2_SYS = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or "
    "illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)

CONV = ["What is in the picture?\n<image>", "A dog on a sofa.", "What colour is it?", "Brown."]


def test_image_placeholder_is_moved_to_the_front():
    assert move_image_placeholder("What is it?\n<image>") == "<image>\nWhat is it?"
    assert move_image_placeholder("  <image> What is it? ") == "<image>\nWhat is it?"
    assert move_image_placeholder("Left <image> right") == "<image>\nLeft  right"
    assert move_image_placeholder("<image>") == "<image>"
    assert move_image_placeholder("no image here ") == "no image here "


def test_system_texts_are_exact():
    assert get_template("v1").system == USER_SYS
    assert get_template("vicuna_v1").system == USER_SYS
    assert get_template("llava_v1").system == HUMAN_SYS
    assert get_template("v0").system == HUMAN_SYS
    assert get_template("llava_v0").system == HUMAN_SYS
    assert get_template("llama_2").system == LLAMA_2_SYS
    assert get_template("llava_llama_2").system == LLAVA_LLAMA_2_SYS
    assert get_template("plain").system == ""


def test_v1_training_string_and_targets():
    t = get_template("v1")
    expected = (
        USER_SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A dog on a sofa.</s>"
        "USER: What colour is it? ASSISTANT: Brown.</s>"
    )
    assert t.render(CONV) == expected
    segs = t.segments(CONV)
    assert "".join(s.text for s in segs) == expected
    assert [s.text for s in segs if s.target] == [" A dog on a sofa.</s>", " Brown.</s>"]
    assert get_template("llava_v1").render(CONV) == expected.replace(USER_SYS, HUMAN_SYS)


def test_v1_prompt():
    t = get_template("vicuna_v1")
    assert t.prompt(["<image>\nDescribe it."]) == USER_SYS + " USER: <image>\nDescribe it. ASSISTANT:"
    assert t.prompt(CONV + ["And the sofa?"]) == (
        USER_SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A dog on a sofa.</s>"
        "USER: What colour is it? ASSISTANT: Brown.</s>USER: And the sofa? ASSISTANT:"
    )
    assert t.stop_str == "</s>"


def test_trailing_human_turn_is_rendered_but_not_a_target():
    segs = get_template("v1").segments(CONV + ["Anything else?"])
    assert segs[-1] == Segment("USER: Anything else? ", False)


def test_llama_2_strings():
    t = get_template("llava_llama_2")
    expected = (
        "[INST] <<SYS>>\n" + LLAVA_LLAMA_2_SYS + "\n<</SYS>>\n\n<image>\nWhat is in the picture? [/INST] "
        "A dog on a sofa. </s><s>[INST] What colour is it? [/INST] Brown. </s>"
    )
    assert t.render(CONV) == expected
    assert [s.text for s in t.segments(CONV) if s.target] == [" A dog on a sofa. </s>", " Brown. </s>"]
    assert t.prompt(CONV[:3]) == (
        "[INST] <<SYS>>\n" + LLAVA_LLAMA_2_SYS + "\n<</SYS>>\n\n<image>\nWhat is in the picture? [/INST] "
        "A dog on a sofa. </s><s>[INST] What colour is it? [/INST]"
    )
    assert get_template("llama_2").prompt(["Hi"]) == "[INST] <<SYS>>\n" + LLAMA_2_SYS + "\n<</SYS>>\n\nHi [/INST]"
    assert t.stop_str == "</s>"


def test_plain_drops_the_instruction():
    t = get_template("plain")
    conv = ["Render a short caption.\n<image>", "A dog on a sofa."]
    assert t.render(conv) == "<image>A dog on a sofa.\n"
    assert t.segments(conv) == [Segment("<image>", False), Segment("A dog on a sofa.\n", True)]
    assert t.prompt(["<image>\nSay what you see."]) == "<image>"
    assert t.stop_str == "\n"
    with pytest.raises(ValueError):
        t.segments(CONV)
    with pytest.raises(ValueError):
        t.segments(["no image", "caption"])


def test_v0_training_string():
    # _add_speaker_and_signal: header system + "\n\n", "### Role: text\n" per turn, closing "### ".
    expected = (
        HUMAN_SYS + "\n\n### Human: <image>\nWhat is in the picture?\n### Assistant: A dog on a sofa.\n"
        "### Human: What colour is it?\n### Assistant: Brown.\n### "
    )
    for name in ("v0", "llava_v0", "default"):
        t = get_template(name)
        assert t.render(CONV) == expected
        assert [s.text for s in t.segments(CONV) if s.target] == [" A dog on a sofa.\n###", " Brown.\n###"]
        assert t.stop_str == "###"


def test_v0_prompt_with_and_without_the_example():
    assert get_template("llava_v0").prompt(["<image>\nWhat is it?"]) == (
        HUMAN_SYS + "###Human: <image>\nWhat is it?###Assistant:"
    )
    example_q = "What are the key differences between renewable and non-renewable energy sources?"
    example_a = (
        "Renewable energy sources are those that can be replenished naturally in a relatively short amount of "
        "time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable energy sources, on the other "
        "hand, are finite and will eventually be depleted, such as coal, oil, and natural gas. Here are some key "
        "differences between renewable and non-renewable energy sources:\n"
        "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable energy "
        "sources are finite and will eventually run out.\n"
        "2. Environmental impact: Renewable energy sources have a much lower environmental impact than "
        "non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, and other "
        "negative effects.\n"
        "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically have "
        "lower operational costs than non-renewable sources.\n"
        "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
        "locations than non-renewable sources.\n"
        "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
        "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
        "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
        "non-renewable sources are not, and their depletion can lead to economic and social instability.\n"
    )
    assert get_template("v0").prompt(["Hi", "Hello!", "How are you?"]) == (
        HUMAN_SYS + "###Human: " + example_q + "###Assistant: " + example_a + "###Human: Hi###Assistant: Hello!"
        "###Human: How are you?###Assistant:"
    )


def test_registry():
    assert get_template("v1") is get_template("vicuna_v1")
    assert get_template("plain") is get_template("v0_plain")
    assert get_template(get_template("llava_v1")) is TEMPLATES["llava_v1"]
    with pytest.raises(ValueError, match="unknown conversation template"):
        get_template("vicuna_v9")
    with pytest.raises(ValueError):
        get_template("v1").prompt(CONV)  # even count: no open human turn
