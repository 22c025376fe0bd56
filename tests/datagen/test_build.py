"""Response parsing, rejects, LLaVA JSON building and stage-1 caption data."""

import json

import pytest

from llava_jax.data.conversation_tokens import tokenize_record
from llava_jax.data.sources import LlavaJsonSource
from llava_jax.data.tokenizer import load_tokenizer
from llava_jax.datagen import build, captions
from llava_jax.datagen.instructions import BRIEF, DETAILED
from llava_jax.datagen.parse import Rejected, parse_qa, parse_response
from llava_jax.datagen.prompts import default_prompt_root


def test_parses_the_papers_own_few_shot_answers():
    conv = (default_prompt_root() / "conversation" / "000_conv.txt").read_text()
    pairs = parse_qa(conv)
    assert [q for q, _ in pairs] == [
        "What color is the fire hydrant in the image?",
        "Is the fire hydrant fully covered by snow or partially visible?",
        "What is the condition of the sidewalk near the fire hydrant?",
        "What does the image suggest about the winter season in the city?",
    ]
    assert pairs[0][1] == "The fire hydrant in the image is red."
    assert pairs[3][1].startswith("The image suggests that") and pairs[3][1].endswith("infrastructure.")
    assert "\n\nFor instance," in pairs[3][1]  # paragraphs inside an answer survive
    ((q, a),) = parse_qa((default_prompt_root() / "complex_reasoning" / "001_conv.txt").read_text())
    assert q == "What challenges do these people face?" and a.startswith("In the image, a group of people")


def test_tolerates_inline_labels_and_missing_final_separator():
    text = "Question: How many dogs?\n===\nAnswer: Two dogs.\n===\nquestion:\nWhere?\n===\nANSWER:\nOn the grass.\n"
    assert parse_qa(text) == [
        ("How many dogs?", "Two dogs."),
        ("Where?", "On the grass."),
    ]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("The image shows two dogs playing.", "no_blocks"),
        (
            "Sure! Here is the conversation:\nQuestion:\nWhat?\n===\nAnswer:\nDogs.",
            "text_outside_blocks",
        ),
        ("Question:\nWhat?\n===\nQuestion:\nWhere?\n===\nAnswer:\nHere.", "unpaired"),
        (
            "Question:\nWhat is it?\n===\nAnswer:\nA dog.\n===\nQuestion:\nAnd the cat?",
            "unpaired",
        ),
        ("Answer:\nA dog.\n===\nQuestion:\nWhat?", "unpaired"),
        ("Question:\nWhat is it?\n===\nAnswer:\n\n===", "empty_turn"),
        (
            "Question:\nWhat is it?\n===\nAnswer:\nBased on the bounding box, a dog.",
            "mentions_annotations",
        ),
        (
            "Question:\nWhat is it?\n===\nAnswer:\nThe captions say it is a dog.",
            "mentions_annotations",
        ),
        (
            "Question:\nWhere is it?\n===\nAnswer:\nAt [0.12, 0.3, 0.5, 0.9].",
            "mentions_annotations",
        ),
        (
            "Question:\nWhat is in the given descriptions?\n===\nAnswer:\nA dog.",
            "mentions_annotations",
        ),
        ("Question:\n<image>\nWhat?\n===\nAnswer:\nA dog.", "image_placeholder"),
    ],
)
def test_broken_qa_responses_are_rejected_with_their_reason(text, reason):
    with pytest.raises(Rejected) as e:
        parse_response("conversation", text, "stop")
    assert e.value.reason == reason


def test_detail_responses():
    assert parse_response("detail", "  A red bike by the boats.\n", "stop") == [("", "A red bike by the boats.")]
    for text, reason, finish in [
        ("Question:\nWhat?\n===\nAnswer:\nBoats.", "wrong_format", "stop"),
        ("A harbor full of boats and", "cut_off", "length"),
        ("The coordinates show a bicycle.", "mentions_annotations", "stop"),
        (" \n", "empty", "stop"),
    ]:
        with pytest.raises(Rejected) as e:
            parse_response("detail", text, finish)
        assert e.value.reason == reason


def _raw(image, kind, content, finish="stop"):
    return {
        "image": image,
        "kind": kind,
        "model": "m",
        "content": content,
        "finish_reason": finish,
        "usage": {},
    }


def _raw_log(path, records):
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "raw.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write('{"image": "torn", "kind": "detail", "cont')  # a torn last line is not a response
    return str(path)


def test_build_writes_kinds_merged_rejects_and_stats(tmp_path):
    qa = "Question:\nWhat is the dog doing?\n===\nAnswer:\nIt runs.\n===\nQuestion:\nWhere?\n===\nAnswer:\nIn a park."
    records = [_raw(f"img{i}.jpg", "conversation", qa) for i in range(40)]
    records += [_raw(f"img{i}.jpg", "detail", f"A dog number {i} runs in a park.") for i in range(20)]
    records += [_raw("img0.jpg", "complex", "Question:\nWhy?\n===\nAnswer:\nBecause it is fun.")]
    bad = [
        _raw("bad1.jpg", "conversation", "No blocks here."),
        _raw("bad2.jpg", "complex", "Question:\nWhy?\n===\nAnswer:\nThe caption says so."),
        _raw("bad3.jpg", "detail", "A long description that was cut", "length"),
        _raw("bad4.jpg", "complex", "Question:\nWhy?"),
    ]
    raw_dir = _raw_log(tmp_path / "gen", records + bad)
    out = tmp_path / "data" / "instruct.json"
    assert build.main(["--raw", raw_dir, "--out", str(out)]) == 0

    stats = json.loads((tmp_path / "data" / "instruct_stats.json").read_text())
    assert stats["kept"] == {"conversation": 40, "detail": 20, "complex": 1}
    assert stats["rejected"] == {
        "conversation": {"no_blocks": 1},
        "detail": {"cut_off": 1},
        "complex": {"mentions_annotations": 1, "unpaired": 1},
    }
    rejects = [json.loads(x) for x in (tmp_path / "data" / "instruct_rejects.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in rejects) == [
        "bad1.jpg",
        "bad2.jpg",
        "bad3.jpg",
        "bad4.jpg",
    ]
    merged = json.loads(out.read_text())
    assert len(merged) == 61 and not any(r["image"].startswith("bad") for r in merged)
    assert len(json.loads((tmp_path / "data" / "instruct_conversation.json").read_text())) == 40

    conv = merged[0]
    assert conv["id"] == "img0" and conv["image"] == "img0.jpg"
    assert [t["from"] for t in conv["conversations"]] == [
        "human",
        "gpt",
        "human",
        "gpt",
    ]
    assert conv["conversations"][0]["value"] in (
        "<image>\nWhat is the dog doing?",
        "What is the dog doing?\n<image>",
    )
    assert conv["conversations"][1:] == [
        {"from": "gpt", "value": "It runs."},
        {"from": "human", "value": "Where?"},
        {"from": "gpt", "value": "In a park."},
    ]
    firsts = [r["conversations"][0]["value"] for r in merged if r["conversations"][0]["value"].count("<image>") == 1]
    assert len(firsts) == 61
    assert {f.startswith("<image>\n") for f in firsts} == {
        True,
        False,
    }  # both placements occur
    details = [r for r in merged if r["conversations"][1]["value"].startswith("A dog number")]
    assert all(r["conversations"][0]["value"].replace("<image>", "").strip() in DETAILED for r in details)

    # same seed, other order of the raw log: the same records
    raw_dir2 = _raw_log(tmp_path / "gen2", list(reversed(records + bad)))
    build.build([raw_dir2], str(tmp_path / "again.json"))
    again = {(r["image"], r["conversations"][1]["value"]): r for r in json.loads((tmp_path / "again.json").read_text())}
    assert all(again[(r["image"], r["conversations"][1]["value"])] == r for r in merged)

    # the data loader and the tokenizer take every record
    (tmp_path / "data" / "images").mkdir()
    source = LlavaJsonSource(out, tmp_path / "data" / "images")
    tok = load_tokenizer()
    for i in range(len(source)):
        t = tokenize_record(source[i], "v1", tok, num_image_tokens=4, max_length=512)
        assert (t["labels"] != -100).any()


def test_stage1_caption_conversations(tmp_path):
    pairs = [
        ("a/1.jpg", "A dog on grass."),
        ("2.jpg", "  "),
        ("", "No image."),
        ("3.jpg", "A red car."),
    ]
    records, skipped = captions.caption_records(pairs, seed=0)
    assert skipped == {"empty_caption": 1, "no_image": 1}
    assert [r["id"] for r in records] == ["1", "3"]
    for r, caption in zip(records, ["A dog on grass.", "A red car."], strict=True):
        human, gpt = r["conversations"]
        assert human["from"] == "human" and gpt == {"from": "gpt", "value": caption}
        assert human["value"].count("<image>") == 1 and human["value"].replace("<image>", "").strip() in BRIEF
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"image": i, "blip_caption": c}) for i, c in pairs))
    assert (
        captions.main(
            [
                "--input",
                str(path),
                "--out",
                str(tmp_path / "chat.json"),
                "--caption-key",
                "blip_caption",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "chat.json").read_text()) == records


def test_noun_phrase_frequency_filter():
    caps = ["dog park", "dog", "dog ball", "cat", "cat", "bird", "dog cat", "fish fish"]
    words = str.split  # each word is a "noun phrase"
    # dog: captions 0,1,2,6 (4 >= 3, kept), cat: 3,4,6 (kept), ball/park/bird/fish: < 3 (ignored)
    assert captions.filter_by_noun_phrases(caps, words, min_count=3, max_per_phrase=100) == [0, 1, 2, 3, 4, 6]
    # with at most 2 captions per phrase: 2 of dog's 4 and 2 of cat's 3
    kept = captions.filter_by_noun_phrases(caps, words, min_count=3, max_per_phrase=2, seed=1)
    assert 2 <= len(kept) <= 4 and set(kept) <= {0, 1, 2, 3, 4, 6}
    assert len(set(kept) & {0, 1, 2, 6}) >= 2 and len(set(kept) & {3, 4, 6}) >= 2
