"""Image processor, tokenizer and processor against transformers' Idefics2 processing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from idefics_jax.config import Idefics2Config
from idefics_jax.data.image_processing import ImageError, ImageProcessor, load_image
from idefics_jax.data.processor import HF_CHAT_TEMPLATE, Processor, apply_chat_template
from idefics_jax.data.tokenizer import Tokenizer
from helpers.inputs import make_images


def reference_image_processor(**kwargs):
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    return Idefics2ImageProcessorPil(**kwargs)


@pytest.mark.parametrize("split", [False, True])
def test_image_processor_matches_reference(split, seed):
    rng = np.random.default_rng([seed, 10, split])
    reference = reference_image_processor(do_image_splitting=split)
    ours = ImageProcessor(do_image_splitting=split)
    images = make_images(rng)
    assert len(images) >= 20
    for i, image in enumerate(images):
        if split and min(image.size) < 2:  # the reference fails on empty crops; we say why
            with pytest.raises(ImageError, match="too small to split"):
                ours([[image]])
            continue
        ref = reference(images=[[image]], return_tensors="np")
        got = ours([[image]])
        ref_pixels = np.moveaxis(ref["pixel_values"], 2, -1)  # channels first -> last
        assert got["pixel_values"].shape == ref_pixels.shape, (i, image.mode, image.size)
        np.testing.assert_allclose(got["pixel_values"], ref_pixels, atol=1e-5, rtol=0, err_msg=f"image {i} {image.mode}")
        np.testing.assert_array_equal(got["pixel_attention_mask"], ref["pixel_attention_mask"].astype(bool))


def test_saved_settings_are_read_back_and_by_the_reference(tmp_path, seed):
    """`save_image_processor` (an exported workdir's image sizes) writes what `image_processor_from`
    and transformers' Idefics2 image processor read: the same pixels from both."""
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    from idefics_jax.checkpoints import image_processor_from, save_image_processor

    ours = ImageProcessor(longest_edge=384, shortest_edge=200, do_image_splitting=True)
    save_image_processor(tmp_path, ours)
    assert image_processor_from(tmp_path, Idefics2Config.preset("tiny")) == ours
    reference = Idefics2ImageProcessorPil.from_pretrained(tmp_path)
    image = make_images(np.random.default_rng([seed, 12]))[9]
    np.testing.assert_allclose(ours([[image]])["pixel_values"],
                               np.moveaxis(reference(images=[[image]], return_tensors="np")["pixel_values"], 2, -1),
                               atol=1e-5, rtol=0)


def test_batch_padding_matches_reference(seed):
    rng = np.random.default_rng([seed, 11])
    images = make_images(rng)
    batch = [[images[3], images[10]], [images[12]], [images[11], images[0], images[5]]]
    ref = reference_image_processor()(images=batch, return_tensors="np")
    got = ImageProcessor()(batch)
    np.testing.assert_allclose(got["pixel_values"], np.moveaxis(ref["pixel_values"], 2, -1), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["pixel_attention_mask"], ref["pixel_attention_mask"].astype(bool))


def test_bad_images_are_clear_errors(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    with pytest.raises(ImageError, match="Cannot (read|decode)"):
        load_image(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match="Cannot read"):
        load_image(b"not an image at all")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))


@pytest.fixture(scope="module")
def tokenizers(sp_model):
    from transformers import LlamaTokenizer

    reference = LlamaTokenizer.from_pretrained(sp_model[0], add_bos_token=True)
    return Tokenizer(sp_model[1]), reference


def test_tokenizer_matches_reference(tokenizers, seed):
    ours, reference = tokenizers
    reference.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]})
    rng = np.random.default_rng([seed, 12])
    texts = ["hello world", " leading space", "  two  spaces ", "trailing  ", "", "x\n\n y", "héllo ☃ wörld 123",
             "<image>hello", "a<image>b <image> c", "</s>end<s>", "What is written?<end_of_utterance>\nAssistant: 42"]
    alphabet = list("abcdefghij klmnop\n?.:!0123456789é") + ["<image>", "<end_of_utterance>", "<fake_token_around_image>"]
    texts += ["".join(rng.choice(alphabet, size=rng.integers(1, 40))) for _ in range(30)]
    for text in texts:
        assert ours.encode(text) == reference(text).input_ids, repr(text)
    assert ours.vocab_size == len(reference)


def hf_processor(sp_model, image_seq_len, split):
    from transformers import Idefics2Processor, LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(sp_model[0], add_bos_token=True)
    tokenizer.pad_token = "<unk>"
    return Idefics2Processor(image_processor=reference_image_processor(do_image_splitting=split),
                             tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=HF_CHAT_TEMPLATE)


PROMPTS = [
    ("What is written here?", 0),
    ("<image>What is written here?", 1),
    ("A photo:<image> and its caption.", 1),
    ("<image><image>Two adjacent images.", 2),
    ("First<image>then text<image>and last", 2),
    ("<image> a <image><image>three, two adjacent", 3),
    ("Three separated: <image>, <image>, and <image>.", 3),
]


@pytest.mark.parametrize("split", [False, True])
def test_processor_token_ids_match_reference(sp_model, split, seed):
    rng = np.random.default_rng([seed, 13, split])
    reference = hf_processor(sp_model, 4, split)
    ours = Processor(Tokenizer(sp_model[1]), ImageProcessor(do_image_splitting=split), image_seq_len=4)
    assert ours.image_token_id == reference.image_token_id
    for text, n in PROMPTS:
        images = [Image.fromarray(rng.integers(0, 256, (int(rng.integers(20, 60)), int(rng.integers(20, 60)), 3),
                                               dtype=np.uint8)) for _ in range(n)]
        ref = reference(text=[text], images=[images] if n else None, return_tensors="np")
        got = ours([text], [images] if n else None)
        np.testing.assert_array_equal(got["input_ids"], ref["input_ids"], err_msg=text)
        if n:
            np.testing.assert_allclose(got["pixel_values"], np.moveaxis(ref["pixel_values"], 2, -1), atol=1e-5, rtol=0)
    # a padded batch (left padding, like the reference's Llama tokenizer)
    texts = [PROMPTS[0][0], PROMPTS[4][0]]
    images = [[], [Image.new("RGB", (30, 40), "white"), Image.new("RGB", (50, 20), "black")]]
    ref = reference(text=texts, images=images, padding=True, return_tensors="np")
    got = ours(texts, images)
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], ref["attention_mask"])


def test_chat_format_matches_reference(sp_model):
    reference = hf_processor(sp_model, 4, False)
    ours = Processor(Tokenizer(sp_model[1]), ImageProcessor(), image_seq_len=4)
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written here?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "hello world"}]},
         {"role": "user", "content": [{"type": "text", "text": "And the number?"}, {"type": "image"}]}],
        [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
         {"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "image"}, {"type": "image"}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Say nothing."}]},
         {"role": "assistant", "content": [{"type": "text", "text": ""}]},  # a model may answer nothing
         {"role": "user", "content": [{"type": "text", "text": "Why?"}]}],
    ]
    for messages in conversations:
        for generation in (False, True):
            text = reference.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)
            assert apply_chat_template(messages, add_generation_prompt=generation) == text
            # the same turns written as strings with <image> placeholders (the data format)
            inline = [{"role": m["role"], "content": "".join(p.get("text", "<image>") for p in m["content"])}
                      for m in messages]
            assert apply_chat_template(inline, add_generation_prompt=generation) == text
            n = text.count("<image>")
            images = [Image.new("RGB", (32, 32), "gray")] * n
            ref = reference(text=[text], images=[images] if n else None, return_tensors="np")
            np.testing.assert_array_equal(ours([text], [images] if n else None)["input_ids"], ref["input_ids"])
    for role in ("user", "system"):  # only an answer may be empty
        with pytest.raises(ValueError, match=f"'{role}' turn has no content"):
            apply_chat_template([{"role": role, "content": ""}])


def test_smolvlm_chat_format_matches_its_template():
    """transformers' SmolVLMProcessor default template, rendered with jinja2 as transformers does; the
    turns also written as strings with <image> placeholders (the data format)."""
    import jinja2
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(DEFAULT_CHAT_TEMPLATE)
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written here?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]}],
        [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
         {"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "image"}, {"type": "image"}]}],
    ]
    for messages in conversations:
        inline = [{"role": m["role"], "content": "".join(p.get("text", "<image>") for p in m["content"])}
                  for m in messages]
        for generation in (False, True):
            expected = template.render(messages=messages, add_generation_prompt=generation)
            assert apply_chat_template(messages, generation, chat_format="smolvlm") == expected
            assert apply_chat_template(inline, generation, chat_format="smolvlm") == expected
    with pytest.raises(ValueError, match="chat_format 'llava' is not one of"):
        apply_chat_template(conversations[0], chat_format="llava")


def test_placeholder_count_mismatch_is_an_error(sp_model):
    ours = Processor(Tokenizer(sp_model[1]), ImageProcessor(), image_seq_len=4)
    with pytest.raises(ValueError, match="Prompt 0 has 2 <image> placeholder.*but 1 image"):
        ours(["<image><image>two"], [[Image.new("RGB", (8, 8))]])


def test_a_checkpoints_chat_template_is_told_apart(tmp_path):
    """The processor's template a directory ships (any of its three files) is matched to the format
    that writes it; a tokenizer's own template is not the processor's; an unknown one is named."""
    import json

    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from idefics_jax.checkpoints.processor import chat_format_of

    cases = [("chat_template.json", HF_CHAT_TEMPLATE, "idefics2"),
             ("processor_config.json", "<|begin_of_text|>" + HF_CHAT_TEMPLATE, "idefics3"),
             ("chat_template.jinja", DEFAULT_CHAT_TEMPLATE, "smolvlm")]
    for k, (name, template, expected) in enumerate(cases):
        directory = tmp_path / str(k)
        directory.mkdir()
        (directory / name).write_text(template if name.endswith(".jinja") else json.dumps({"chat_template": template}))
        assert chat_format_of(directory, "idefics3") == expected
    llama = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": llama}))
    assert chat_format_of(tmp_path, "idefics3") == "idefics3"  # no processor template: the model type's
    (tmp_path / "chat_template.jinja").write_text(llama)
    with pytest.raises(ValueError, match=r"chat_template.jinja writes a format idefics_jax does not know"):
        chat_format_of(tmp_path, "idefics3")
