"""Tokenization and label masks, checked against an independent restatement of the original.

The reference side of these tests does not use the code under test: token ids come from the
``sentencepiece`` library on the vendored ``tokenizer.model`` driven the way the original's slow
``LlamaTokenizer`` drives it (legacy and non-legacy), ``tokenizer_image_token`` is restated, and the
original's length-based label algorithms (``preprocess_v1``, ``preprocess_llama_2``,
``preprocess_plain``, ``preprocess`` for v0) are restated from their description.
"""

import pickle
import random
import re

import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from llava_jax.data.conversation_tokens import tokenize_conversation, tokenize_prompt, tokenize_record
from llava_jax.data.errors import BadSample
from llava_jax.data.tokenizer import (
    IGNORE_INDEX,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    _rebuild_encoder,
    load_tokenizer,
    text_encoder,
)

N_IMG = 5  # image positions per placeholder in these tests (576 in LLaVA-1.5)
IGN = -100
SPECIAL = {"<s>": 1, "</s>": 2, "<unk>": 0}
USER_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
HUMAN_SYS = USER_SYS.replace("curious user", "curious human").replace("user's", "human's")


# ------------------------------------------------------------------------------------------------
# reference: the slow SentencePiece tokenizer and the original's algorithms, restated


class SlowLlama:
    """The slow ``LlamaTokenizer``: cut at special tokens, SentencePiece on the text between.

    legacy: every text piece gets SentencePiece's dummy "▁" prefix. Non-legacy: the model has no
    dummy prefix; "▁" is put before the whole call's text (and dropped when a special token
    follows it directly); a piece starting with a space is encoded after "<unk>", which is cut off.
    """

    def __init__(self, model_file, legacy):
        proto = sentencepiece_model_pb2.ModelProto()
        with open(model_file, "rb") as f:
            proto.ParseFromString(f.read())
        proto.normalizer_spec.add_dummy_prefix = legacy
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.legacy = legacy
        self.unk_len = len(self.sp.encode("<unk>"))

    def tokenize(self, text):
        if not self.legacy:
            if not text:
                return []
            text = "\u2581" + text.replace("\u2581", " ")
        out = []
        for k, part in enumerate(re.split("(<s>|</s>|<unk>)", text)):
            if k % 2:
                out.append(("special", SPECIAL[part]))
            elif part:
                if self.legacy or not part.startswith(("\u2581", " ")):
                    ids = self.sp.encode(part)
                else:
                    ids = self.sp.encode("<unk>" + part)[self.unk_len :]
                out.extend(("text", i) for i in ids)
        if not self.legacy and len(out) > 1 and out[0] == ("text", 29871) and out[1][0] == "special":
            out = out[1:]
        return [i for _, i in out]

    def __call__(self, text):
        return [1] + self.tokenize(text)


def tokenizer_image_token(prompt, tok):
    """Each side of "<image>" tokenized alone (with BOS), BOS kept once, -200 in between."""
    chunks = [tok(c) for c in prompt.split("<image>")]
    ids = [chunks[0][0]]
    for k, c in enumerate(chunks):
        if k:
            ids.append(-200)
        ids.extend(c[1:])
    return ids


def expand_image(ids, labels):
    ids, labels = list(ids), list(labels)
    if -200 in ids:
        k = ids.index(-200)
        ids[k : k + 1] = [IMAGE_TOKEN_ID] * N_IMG
        labels[k : k + 1] = [IGN] * N_IMG
    return ids, labels


def original_rounds_labels(prompt, tok, sep, sep2="</s>", nonlegacy_fix=False):
    """preprocess_v1 / preprocess_llama_2: mask by counting tokens of each round."""
    ids = tokenizer_image_token(prompt, tok)
    labels = np.array(ids)
    cur = 1
    labels[:cur] = IGN
    for i, rnd in enumerate(prompt.split(sep2)):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenizer_image_token(rnd, tok))
        instruction_len = len(tokenizer_image_token(parts[0], tok)) - 2
        if nonlegacy_fix and i != 0 and not tok.legacy:
            round_len -= 1
            instruction_len -= 1
        labels[cur : cur + instruction_len] = IGN
        cur += round_len
    labels[cur:] = IGN
    assert cur == len(ids), "the original would report a tokenization mismatch here"
    return expand_image(ids, labels.tolist())


def original_plain_labels(caption, tok):
    ids = tokenizer_image_token("<image>" + caption + "\n", tok)
    labels = list(ids)
    n = len(tokenizer_image_token("<image>", tok))
    labels[:n] = [IGN] * n
    return expand_image(ids, labels)


def moved(value):
    if "<image>" not in value:
        return value
    return ("<image>\n" + value.replace("<image>", "").strip()).strip()


def v1_prompt(system, messages):
    text = system + " "
    for i, m in enumerate(messages):
        text += ("USER: " + moved(m) + " ") if i % 2 == 0 else ("ASSISTANT: " + m + "</s>")
    return text


def llama_2_prompt(system, messages):
    text = ""
    for i, m in enumerate(messages):
        if i % 2 == 0:
            m = moved(m)
            if i == 0:
                m = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + m
            text += "<s>" + "[INST] " + m + " [/INST]"
        else:
            text += " " + m + " </s>"
    return text[len("<s>") :]


def conv(*messages):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": m} for i, m in enumerate(messages)]


CONVERSATIONS = [
    ("What is in the picture?\n<image>", "A brown dog on a sofa."),
    ("<image>\nHow many people are there?", "Three.", "What are they doing?", "They are playing\ncards at a table."),
    ("Describe the image <image> in detail.", "  It shows a street,\n\nwith cars 🚗 and a café.", "Sure?", "Yes. "),
    ("Tell me a joke.", "Why did the chicken cross the road?", "Why?", "To get to the other side.", "Ha", "Ha."),
]


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "nonlegacy"])
def pair(request, tokenizer_dir):
    """(tokenizer under test, reference slow tokenizer), both legacy or both not."""
    legacy = request.param
    return load_tokenizer(tokenizer_dir, legacy=legacy), SlowLlama(str(tokenizer_dir / "tokenizer.model"), legacy)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def spans(ids, labels):
    """Contiguous runs of trained tokens."""
    out, cur = [], []
    for i, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def pieces_text(sp, ids):
    """Token ids back to text through SentencePiece pieces ("▁" -> space, <0xNN> -> that byte)."""
    out = b""
    for i in ids:
        piece = sp.id_to_piece(i)
        byte = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
        out += bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()
    return out.decode()


# ------------------------------------------------------------------------------------------------
# tokenizer


def test_load_tokenizer_adds_llava_tokens(tokenizer, tokenizer_dir):
    assert tokenizer("Hello, my dog is cute").input_ids == [1, 15043, 29892, 590, 11203, 338, 274, 1082]
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE_TOKEN_ID, PAD_TOKEN_ID] == [32000, 32001]
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 32001
    assert len(tokenizer) == 32002
    assert text_encoder(tokenizer).encode("Hello, my dog is cute") == [1, 15043, 29892, 590, 11203, 338, 274, 1082]
    default = load_tokenizer()  # the vendored folder, found from the package
    assert default.convert_tokens_to_ids("<image>") == 32000
    assert text_encoder(default).legacy is True
    assert text_encoder(load_tokenizer(tokenizer_dir, legacy=False)).legacy is False


def test_load_tokenizer_folders(tokenizer, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    # a llava-hf style folder already holding <image> and <pad> loads unchanged
    tokenizer.save_pretrained(tmp_path / "hf")
    again = load_tokenizer(tmp_path / "hf")
    assert again.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001] and len(again) == 32002
    # a folder whose extra tokens take those ids is refused
    other = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    other.add_tokens(["<im_patch>"])
    other.save_pretrained(tmp_path / "v0")
    with pytest.raises(ValueError, match="32000"):
        load_tokenizer(tmp_path / "v0")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


def test_encoder_matches_sentencepiece(pair):
    tokenizer, slow = pair
    encoder = text_encoder(tokenizer)
    samples = [
        "Hello, my dog is cute",
        " ASSISTANT: hi",
        "\nHow",
        "USER: ",
        "A ",
        " ",
        "  two  spaces  ",
        "x</s>USER: y</s>",
        "</s><s>[INST] q [/INST]",
        "<s>",
        "<unk> odd",
        "héllo 🙂 日本語 ▁word",
        "\n\n### Human:",
        "<pad><image>",
        "tab\there",
        "Träumerei … “quoted”",
    ]
    rng = random.Random(0)
    words = ["a", "b", " ", "  ", "\n", "</s>", "<s>", "#", ".", "é", "🙂", "the", " cat", "ASSISTANT:", "\u2581"]
    samples += ["".join(rng.choice(words) for _ in range(rng.randint(0, 14))) for _ in range(300)]
    for s in samples:
        assert encoder.encode(s) == slow(s), s
    expected = [slow.tokenize(s) for s in samples]
    assert [c[0].tolist() for c in encoder.encode_chunks(samples)] == expected  # all at once as well
    # the path for vocabularies that cannot be cut into words (whole text runs) agrees too
    whole_runs = _rebuild_encoder(*encoder._args[:-1], False)
    assert [c[0].tolist() for c in whole_runs.encode_chunks(samples)] == expected


def test_encoder_offsets_and_pickle(tokenizer):
    encoder = text_encoder(tokenizer)
    text = "héllo 🙂 x</s>USER"
    ids, starts, ends = encoder.encode_chunks([text])[0]
    pieces = [text[s:e] for s, e in zip(starts, ends, strict=True)]
    assert ids.tolist() == [298, 3610, 417, 29871, 243, 162, 156, 133, 921, 2, 3148, 1001]
    assert pieces == ["h", "él", "lo", " ", "🙂", "🙂", "🙂", "🙂", " x", "</s>", "US", "ER"]
    clone = pickle.loads(pickle.dumps(encoder))
    assert clone.encode(text) == encoder.encode(text) and clone.legacy == encoder.legacy


# ------------------------------------------------------------------------------------------------
# input ids and labels against the original


def test_image_neighbourhood(tokenizer):
    out = tokenize_conversation(conv("<image>\nHow many people are there?", "Three."), "v1", tokenizer, N_IMG, 2048)
    ids = out["input_ids"].tolist()
    k = ids.index(IMAGE_TOKEN_ID)
    # "... USER: <image>\nHow many ..." -> "... 3148 1001 29901 29871 <image> 29871 13 5328 ..."
    assert ids[k - 4 : k] == [3148, 1001, 29901, 29871]
    assert ids[k : k + N_IMG] == [IMAGE_TOKEN_ID] * N_IMG
    assert ids[k + N_IMG : k + N_IMG + 3] == [29871, 13, 5328]
    assert ids.count(IMAGE_TOKEN_ID) == N_IMG
    assert out["input_ids"].dtype == np.int32 and out["labels"].dtype == np.int32


@pytest.mark.parametrize("name,system", [("v1", USER_SYS), ("llava_v1", HUMAN_SYS)])
def test_v1_matches_original(pair, name, system):
    tokenizer, slow = pair
    for messages in CONVERSATIONS:
        has_image = "<image>" in messages[0]
        out = tokenize_conversation(conv(*messages), name, tokenizer, N_IMG, 4096, has_image=has_image)
        ids, labels = original_rounds_labels(v1_prompt(system, messages), slow, " ASSISTANT: ", nonlegacy_fix=True)
        assert out["input_ids"].tolist() == ids
        assert out["labels"].tolist() == labels
        replies = [" " + m + "</s>" for m in messages[1::2]]
        assert [pieces_text(slow.sp, s) for s in spans(out["input_ids"], out["labels"])] == replies


def test_llama_2_matches_original(pair):
    tokenizer, slow = pair
    system = (
        "You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language."
    )
    for messages in CONVERSATIONS:
        has_image = "<image>" in messages[0]
        out = tokenize_conversation(conv(*messages), "llava_llama_2", tokenizer, N_IMG, 4096, has_image=has_image)
        ids, labels = original_rounds_labels(llama_2_prompt(system, messages), slow, "[/INST] ")
        assert out["input_ids"].tolist() == ids
        assert out["labels"].tolist() == labels
        replies = [" " + m + " </s>" for m in messages[1::2]]
        assert [pieces_text(slow.sp, s) for s in spans(out["input_ids"], out["labels"])] == replies


def test_plain_matches_original(pair):
    tokenizer, slow = pair
    for caption in ["A brown dog on a sofa.", " leading space", "Two lines\nof caption 🙂"]:
        messages = conv("Give a brief description.\n<image>", caption)
        out = tokenize_record({"id": 7, "image": "x.jpg", "conversations": messages}, "plain", tokenizer, N_IMG, 512)
        ids, labels = original_plain_labels(caption, slow)
        assert out["input_ids"].tolist() == ids
        assert out["labels"].tolist() == labels
        assert out["input_ids"][1 : 1 + N_IMG].tolist() == [IMAGE_TOKEN_ID] * N_IMG


def test_v0_against_the_original(pair):
    """The original's v0 masks land on the right tokens with this vocabulary, and train more."""
    tokenizer, slow = pair
    messages = CONVERSATIONS[1]
    header = HUMAN_SYS + "\n\n"
    sentences = [
        "### " + ("Human" if i % 2 == 0 else "Assistant") + ": " + moved(m) + "\n" for i, m in enumerate(messages)
    ]
    text = header + "".join(sentences) + "### "
    ids = tokenizer_image_token(text, slow)
    # preprocess (v0): every piece measured alone; human turns masked except their first 2 tokens
    lens = [len(tokenizer_image_token(s, slow)) for s in [header] + sentences]
    labels = np.array(ids)
    cur = lens[0]
    labels[:cur] = IGN
    starts = []
    for n, i in zip(lens[1:], range(len(messages)), strict=True):
        starts.append(cur)
        if i % 2 == 0:
            labels[cur + 2 : cur + n] = IGN
        cur += n
    # every turn opens with "###" = "##" "#" where the original expects it: no drift here
    for s in starts:
        assert ids[s : s + 2] == [2277, 29937]
    ids, labels = expand_image(ids, labels.tolist())

    out = tokenize_conversation(conv(*messages), "v0", tokenizer, N_IMG, 4096)
    assert out["input_ids"].tolist() == ids
    mine = out["labels"].tolist()
    assert all(m in (IGN, o) for m, o in zip(mine, labels, strict=True))  # a subset of the original's
    trained = [pieces_text(slow.sp, s) for s in spans(out["input_ids"], out["labels"])]
    assert trained == [" " + m + "\n###" for m in messages[1::2]]
    only_original = [o if m == IGN else IGN for m, o in zip(mine, labels, strict=True)]
    extra = [pieces_text(slow.sp, s) for s in spans(np.array(ids), np.array(only_original))]
    # the original also trains the first "###", each "### Assistant:" opener and the closing space
    assert extra == ["###", "### Assistant:", "### Assistant:", " "]


def test_text_only_and_prompt(tokenizer):
    out = tokenize_record({"id": "t", "conversations": conv("Hi there", "Hello!")}, "v1", tokenizer, N_IMG, 128)
    assert IMAGE_TOKEN_ID not in out["input_ids"].tolist()
    ids = tokenize_prompt(["What is it?\n<image>"], "v1", tokenizer, N_IMG)
    assert ids.dtype == np.int32 and ids[0] == 1
    assert ids.tolist().count(IMAGE_TOKEN_ID) == N_IMG
    assert ids[-5:].tolist() == [319, 1799, 9047, 13566, 29901]  # "▁ASSISTANT:"
    # the prompt is the training sequence of the same turn, up to the reply
    full = tokenize_conversation(conv("What is it?\n<image>", "A cat."), "v1", tokenizer, N_IMG, 128)["input_ids"]
    assert full[: len(ids)].tolist() == ids.tolist()
    llama = tokenize_prompt(["<image>\nHi", "Hello.", "Bye"], "llava_llama_2", tokenizer, N_IMG)
    assert llama[-4:].tolist() == [518, 29914, 25580, 29962]  # "▁[/INST]"
    assert tokenize_prompt(["<image>\nignored"], "plain", tokenizer, N_IMG).tolist() == [1] + [IMAGE_TOKEN_ID] * N_IMG
    with pytest.raises(BadSample, match="max_length"):
        tokenize_prompt(["<image>\nHi"], "v1", tokenizer, N_IMG, max_length=20)
    with pytest.raises(BadSample, match="at most one"):
        tokenize_prompt(["<image> and <image>"], "v1", tokenizer, N_IMG)
    with pytest.raises(BadSample, match="odd"):
        tokenize_prompt(["Hi", "Hello"], "v1", tokenizer, N_IMG)


def test_truncation(tokenizer):
    messages = conv("<image>\nDescribe.", "word " * 200)
    out = tokenize_conversation(messages, "v1", tokenizer, N_IMG, 80, has_image=True)
    assert len(out["input_ids"]) == len(out["labels"]) == 80
    assert out["input_ids"].tolist().count(IMAGE_TOKEN_ID) == N_IMG
    assert (out["labels"][-10:] != IGNORE_INDEX).all()
    with pytest.raises(BadSample, match="image tokens") as err:
        tokenize_conversation(messages, "v1", tokenizer, 100, 80, has_image=True, record_id="long")
    assert err.value.record_id == "long"
    long_question = conv("<image>\n" + "Describe this. " * 50, "Fine.")
    with pytest.raises(BadSample, match="no target tokens"):
        tokenize_conversation(long_question, "v1", tokenizer, N_IMG, 80, has_image=True, record_id="r")


# ------------------------------------------------------------------------------------------------
# bad input


def record(conversations, image="img.jpg", rid="rec-1"):
    r = {"id": rid, "conversations": conversations}
    if image is not None:
        r["image"] = image
    return r


BAD = {
    "no conversations key": ({"id": "rec-1", "image": "a.jpg"}, "conversations"),
    "empty conversations": (record([]), "no conversations"),
    "conversations not a list": (record("hello"), "no conversations"),
    "turn not a mapping": (record(["<image>\nhi", "there"]), "turn 0"),
    "first turn from gpt": (record(conv("x", "<image>\ny")[::-1]), "alternate"),
    "two human turns": (
        record([{"from": "human", "value": "<image>\na"}, {"from": "human", "value": "b"}]),
        "alternate",
    ),
    "unknown role": (record([{"from": "user", "value": "<image>\na"}, {"from": "gpt", "value": "b"}]), "alternate"),
    "empty value": (record(conv("<image>\nWhat?", "")), "empty"),
    "blank value": (record(conv("<image>\nWhat?", "  \n ")), "empty"),
    "value not text": (record(conv("<image>\nWhat?", None)), "empty or non-text"),
    "no reply": (record(conv("<image>\nWhat?")), "no 'gpt' reply"),
    "two placeholders": (record(conv("<image>\nWhat? <image>", "A.")), "2 <image> placeholders"),
    "placeholders in two turns": (record(conv("<image>\nWhat?", "A.", "And <image>?", "B.")), "2 <image>"),
    "image without placeholder": (record(conv("What?", "A.")), "no <image> placeholder"),
    "placeholder without image": (record(conv("<image>\nWhat?", "A."), image=None), "no image"),
    "placeholder in a reply": (record(conv("<image>\nWhat?", "A <image>.")), "assistant"),
    "several images": (record(conv("<image>\nWhat?", "A."), image=["a.jpg", "b.jpg"]), "one path"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records_raise(tokenizer, case):
    rec, match = BAD[case]
    with pytest.raises(BadSample, match=re.escape(match)) as err:
        tokenize_record(rec, "v1", tokenizer, N_IMG, 2048)
    assert err.value.record_id == "rec-1"
    assert "rec-1" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_bad_records_for_plain(tokenizer):
    with pytest.raises(BadSample, match="one human \\+ one gpt"):
        tokenize_record(record(conv("<image>\nA", "b", "c", "d")), "plain", tokenizer, N_IMG, 2048)
    with pytest.raises(BadSample, match="needs a record with an image"):
        tokenize_record(record(conv("A", "b"), image=None), "plain", tokenizer, N_IMG, 2048)
    with pytest.raises(BadSample, match="JSON object"):
        tokenize_record(["not", "a", "dict"], "v1", tokenizer, N_IMG, 2048)
    with pytest.raises(BadSample, match="line 12") as err:  # no id: the caller's record_id is named
        tokenize_record({"conversations": []}, "v1", tokenizer, N_IMG, 2048, record_id="line 12")
    assert err.value.record_id == "line 12"


def test_missing_placeholder_prepend(tokenizer):
    prepended = tokenize_record(
        record(conv("What?", "A.")), "v1", tokenizer, N_IMG, 2048, missing_placeholder="prepend"
    )
    explicit = tokenize_record(record(conv("<image>\nWhat?", "A.")), "v1", tokenizer, N_IMG, 2048)
    assert prepended["input_ids"].tolist() == explicit["input_ids"].tolist()
    assert prepended["labels"].tolist() == explicit["labels"].tolist()
    with pytest.raises(ValueError, match="missing_placeholder"):
        tokenize_record(record(conv("What?", "A.")), "v1", tokenizer, N_IMG, 2048, missing_placeholder="skip")


def test_bad_sample_pickles():
    err = BadSample("id-3", "corrupt image", path="images/3.jpg")
    back = pickle.loads(pickle.dumps(err))
    assert (back.record_id, back.reason, back.path) == ("id-3", "corrupt image", "images/3.jpg")
    assert str(back) == str(err) and "images/3.jpg" in str(err) and "id-3" in str(err)
