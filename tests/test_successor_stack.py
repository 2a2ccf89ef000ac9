"""SmolVLM and Idefics3 through the whole stack: a checkpoint directory as transformers saves it
(tokenizer.json, the image processor's settings, the chat template) loaded, prompted and answered
as transformers does, chatted with and served; the pipeline's samples equal to transformers'
processor; the tiny SmolVLM config trained, evaluated and exported; the SmolVLM SFT config run.

transformers' `SmolVLMProcessor` needs packages we do not install (num2words, torchvision, for its
video frames); its image prompt is `Idefics3Processor`'s, so the reference processor is
`Idefics3Processor` with SmolVLM's image processor and chat template."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from helpers.generation import NEW, assert_same_greedy_tokens, hf_generate
from helpers.inputs import make_images
from helpers.successors import VISION, build_hf
from helpers.training import load_config
from idefics_jax.data.image_tokens import IMAGE_TOKEN
from idefics_jax.data.json_tokenizer import train_json_tokenizer
from idefics_jax.data.synthetic import JSON_ROLES, JSON_SPECIAL_TOKENS, generate

TILE, LONGEST = VISION["image_size"], 112  # the tile; the whole image's longest edge (up to 2 x 2 tiles)


# Idefics3's tokenizer (Llama 3's kind, a BOS put by its template) on the same texts: its special tokens first
LLAMA_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", *JSON_SPECIAL_TOKENS[2:])
LLAMA_ROLES = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"}


def reference_processor(path, model_type: str, image_seq_len: int):
    """transformers' processor of the model type, on the directory's tokenizer.json."""
    from transformers import Idefics3Processor, PreTrainedTokenizerFast
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from idefics_jax.data.processor import HF_CHAT_TEMPLATE

    smolvlm = model_type == "smolvlm"
    specials, roles = (JSON_SPECIAL_TOKENS, JSON_ROLES) if smolvlm else (LLAMA_SPECIAL_TOKENS, LLAMA_ROLES)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **roles,
                                        additional_special_tokens=list(specials[2:]))
    tokenizer.padding_side = "left"
    sizes = dict(size={"longest_edge": LONGEST}, max_image_size={"longest_edge": TILE})
    images = SmolVLMImageProcessorPil(**sizes) if smolvlm else Idefics3ImageProcessorPil(**sizes)
    template = DEFAULT_CHAT_TEMPLATE if smolvlm else "<|begin_of_text|>" + HF_CHAT_TEMPLATE  # Idefics3-8B's
    return Idefics3Processor(images, tokenizer, image_seq_len=image_seq_len, chat_template=template)


@pytest.fixture(scope="module", params=["smolvlm", "idefics3"])
def successor(request, tmp_path_factory, seed):
    """(the model type, a Hugging Face directory of it with its processor files, its torch model, the
    synthetic data its tokenizer was trained on, transformers' processor)."""
    model_type = request.param
    data = tmp_path_factory.mktemp("smolvlm_data")
    generate(data, num=40, seed=seed % 1000, formats=("jsonl",), easy=True, tokenizer="json")
    path = tmp_path_factory.mktemp(model_type)
    if model_type == "smolvlm":  # the synthetic data's own tokenizer
        (path / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())
    else:
        texts = [line for source in ("conversations", "pairs") for line in (data / source / "data.jsonl").open()]
        (path / "tokenizer.json").write_text(train_json_tokenizer(texts, 1024, LLAMA_SPECIAL_TOKENS,
                                                                  bos_token="<|begin_of_text|>"))
    model = build_hf(model_type, seed, vocab_size=1024, image_token_id=3, pad_token_id=1)  # the tokenizers' ids
    model.save_pretrained(path)
    processor = reference_processor(path, model_type,
                                    image_seq_len=(TILE // VISION["patch_size"]) ** 2 // model.config.scale_factor ** 2)
    processor.save_pretrained(path)
    return model_type, path, model, data, processor


@pytest.fixture(scope="module")
def smolvlm(successor):
    if successor[0] != "smolvlm":
        pytest.skip("SmolVLM only")
    return successor[1:]


def split_placeholders(text: str) -> list[str]:
    """A record's string content as parts: its text pieces, "" for each <image> (the data format)."""
    parts = []
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        parts += ([""] if k else []) + ([piece] if piece else [])
    return parts


def conversations(rng):
    images = make_images(rng)
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is written here?"}]}]
    second = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
              {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                           {"type": "text", "text": "with"}, {"type": "image"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "apple"}]},
              {"role": "user", "content": [{"type": "text", "text": "And the second?"}]}]
    return [first, second], [[images[9]], [images[1], images[14]]]


def test_a_transformers_directory_loads_with_its_processor(successor):
    from idefics_jax.checkpoints import load
    from idefics_jax.data.image_tiles import TileImageProcessor
    from idefics_jax.data.json_tokenizer import JsonTokenizer

    model_type, path, _, _, _ = successor
    loaded = load(path)
    assert loaded.config.model_type == model_type and loaded.chat_format == model_type
    roles = JSON_ROLES if model_type == "smolvlm" else LLAMA_ROLES
    assert isinstance(loaded.tokenizer, JsonTokenizer) and loaded.tokenizer.eos_token == roles["eos_token"]
    assert loaded.image_processor == TileImageProcessor(longest_edge=LONGEST, tile=TILE, do_image_splitting=True)
    assert loaded.processor().tiled and not loaded.processor(split=False).image_processor.do_image_splitting


def test_prompts_and_greedy_answers_equal_transformers(successor, seed):
    """Chat prompts with tiled images (a system turn, an earlier answer, a text-only last turn) through
    our Assistant: the same token ids and pixels as transformers' processor, then the same greedy tokens
    as its `generate`."""
    from idefics_jax.checkpoints import load
    from idefics_jax.inference.assistant import Assistant

    _, path, model, _, processor = successor
    convs, images = conversations(np.random.default_rng([seed, 90]))
    assistant = Assistant(load(path))
    ours = assistant.prepare(convs, images)
    prompts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in convs]
    theirs = processor(text=prompts, images=images, padding=True, return_tensors="np")
    width = theirs["input_ids"].shape[1]
    np.testing.assert_array_equal(ours["input_ids"][:, -width:], theirs["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"][:, -width:], theirs["attention_mask"])
    tiles = theirs["pixel_values"].shape[1]
    np.testing.assert_allclose(ours["pixel_values"][:, :tiles], np.moveaxis(theirs["pixel_values"], 2, -1),
                               atol=1e-5, rtol=0)
    assert tiles > 3  # the images were cut into tiles
    expected, scores = hf_generate(model, ours["input_ids"], ours["attention_mask"], ours["pixel_values"],
                                   ours["pixel_attention_mask"], scores=True, eos_token_id=None, pad_token_id=1)
    new = assistant.generator.generate(*assistant._inputs(ours), max_new_tokens=NEW)
    assert_same_greedy_tokens(new, expected, scores)


def test_chat_reuses_its_cache_and_answers_as_the_whole_conversation(successor, seed):
    from idefics_jax.checkpoints import load
    from idefics_jax.inference.assistant import Assistant

    path = successor[1]
    assistant = Assistant(load(path))
    images = make_images(np.random.default_rng([seed, 91]))
    chat = assistant.chat(max_new_tokens=6)
    turns = [({"role": "user", "content": "<image>What is this?"}, [images[9]]),
             ({"role": "user", "content": "And <image>?"}, [images[14]])]
    given, history = [], []
    for message, turn_images in turns:
        answer = "".join(chat.stream(message, turn_images))
        given += turn_images
        history += [message]
        assert answer == assistant.reply(history, given, max_new_tokens=6)
        history += [{"role": "assistant", "content": answer}]
    assert chat.conversation.reused > 0


def test_server_answers_tiled_requests_together_as_each_alone(successor, tmp_path, seed):
    """Two requests at once (tiled images in one, split as the checkpoint says; one image whole in
    the other): each answer is `Assistant.reply`'s for it alone."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from helpers.server_requests import image_part, request
    from idefics_jax.cli.serve import make_server, parser

    path = successor[1]
    images = make_images(np.random.default_rng([seed, 92]))
    for name, k in (("a.png", 9), ("b.png", 14)):
        images[k].convert("RGB").save(tmp_path / name)
    server = make_server(parser().parse_args(["--checkpoint", str(path), "--port", "0", "--max_batch", "2",
                                              "--batch_window", "1.0"]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bodies = [{"messages": [{"role": "user", "content": [image_part(tmp_path / "a.png"),
                                                             {"type": "text", "text": "What is this?"}]}],
                   "max_tokens": 5},
                  {"messages": [{"role": "user", "content": [{"type": "text", "text": "And"},
                                                             image_part(tmp_path / "b.png")]}],
                   "max_tokens": 4, "split": False}]
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda body: request(server.url + "/v1/chat/completions", body), bodies))
        assistant = server.worker.assistant
        expected = [assistant.reply([{"role": "user", "content": "<image>What is this?"}],
                                    [Image.open(tmp_path / "a.png")], max_new_tokens=5),
                    assistant.reply([{"role": "user", "content": "And<image>"}], [Image.open(tmp_path / "b.png")],
                                    max_new_tokens=4, split=False)]
        for (status, reply), answer in zip(replies, expected):
            assert status == 200, reply
            assert reply["choices"][0]["message"]["content"] == answer and reply["model"] == successor[0]
    finally:
        server.close()


def test_pipeline_samples_equal_transformers_processor(successor):
    """Conversation and caption records of the synthetic data, encoded for training with tiles: the
    token ids of transformers' processor on the chat template's text (answers included), targets on
    the answers, and the same tiles."""
    from idefics_jax.data.pipeline import EncodeRecord, SourceConfig
    from idefics_jax.data.json_tokenizer import JsonTokenizer

    model_type, path, _, data, processor = successor
    tokenizer = JsonTokenizer(path / "tokenizer.json")
    for source in ("conversations", "pairs"):
        config = SourceConfig(name=source, path=str(data / source), longest_edge=LONGEST, split_probability=1.0)
        encode = EncodeRecord(config, str(data / source), tokenizer, processor.image_seq_len, seed=0, strict=True,
                              tile=TILE, chat_format=model_type)
        for line in (data / source / "data.jsonl").read_text().splitlines()[:4]:
            record = json.loads(line)
            sample = encode(record, np.random.default_rng(0))
            if source == "conversations":
                parts = [{"role": m["role"], "content": [{"type": "text", "text": piece} if piece else {"type": "image"}
                                                         for piece in split_placeholders(m["content"])]}
                         for m in record["messages"]]
                text = processor.apply_chat_template(parts)
                answer = record["messages"][-1]["content"]
                refs = record["images"]
            else:
                text, answer, refs = IMAGE_TOKEN + record["text"] + tokenizer.eos_token, None, [record["image"]]
            pictures = [Image.open(data / source / ref) for ref in refs]
            theirs = processor(text=[text], images=[pictures], return_tensors="np")
            np.testing.assert_array_equal(sample["input_ids"], theirs["input_ids"][0])
            tiles = np.stack(sample["images"]).astype(np.float32) / 127.5 - 1
            np.testing.assert_allclose(tiles, np.moveaxis(theirs["pixel_values"][0], 1, -1), atol=1e-5, rtol=0)
            targets = tokenizer.decode(sample["input_ids"][sample["targets"]])
            if answer is not None:
                assert targets == f" {answer}<end_of_utterance>"
            else:  # the caption and its end, none of the image's prompt
                assert targets == record["text"] + tokenizer.eos_token


def test_tiny_smolvlm_config_trains_evaluates_and_exports(tmp_path, seed):
    """`configs/smolvlm_tiny.py` as the README's main job runs it (a few steps): the workdir then
    answers (`evaluate`), and its export is a SmolVLM transformers loads, with equal logits."""
    from transformers import SmolVLMForConditionalGeneration

    from idefics_jax import SmolVLM, load_hf_checkpoint
    from idefics_jax.checkpoints import load
    from idefics_jax.cli.evaluate import main as evaluate_main
    from idefics_jax.inference.evaluate import training_evaluation
    from idefics_jax.train.loop import train
    from idefics_jax.checkpoints.workdir import export_hf

    config = load_config("smolvlm_tiny")
    config.data.synthetic_num, config.train.steps, config.train.checkpoint_every = 40, 3, 3
    config.train.eval_samples, config.data.batch_size, config.data.seq_len = 4, 2, 256
    train(config, tmp_path / "run", evaluation=training_evaluation)
    assert (tmp_path / "run" / "tokenizer.json").exists()
    report = tmp_path / "report.json"
    assert evaluate_main(["--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "run/data/conversations_eval"),
                          "--limit", "4", "--batch_size", "2", "--max_new_tokens", "3", "--output", str(report)]) == 0
    assert json.loads(report.read_text())["n"] == 4
    assert export_hf(tmp_path / "run", tmp_path / "hf") == 3
    loaded = load(tmp_path / "hf")
    assert loaded.chat_format == "smolvlm" and loaded.processor().tiled
    config, params = load_hf_checkpoint(tmp_path / "hf")
    model = SmolVLMForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    batch = loaded.processor()(["<|im_start|>User:<image>What is written?<end_of_utterance>\nAssistant:"],
                               [[make_images(np.random.default_rng(seed))[9]]])
    ours = SmolVLM(config).apply({"params": params}, batch["input_ids"], attention_mask=batch["attention_mask"],
                                 pixel_values=batch["pixel_values"], pixel_attention_mask=batch["pixel_attention_mask"])
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]),
                       pixel_values=torch.tensor(batch["pixel_values"]).permute(0, 1, 4, 2, 3),
                       pixel_attention_mask=torch.tensor(batch["pixel_attention_mask"])).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())


def test_sft_config_fine_tunes_a_converted_smolvlm(smolvlm, tmp_path, seed):
    """`configs/smolvlm_sft.py` on The Cauldron's published layout, starting from a SmolVLM directory
    (at the test model's size): the run reads the directory's tokenizer, starts from its weights
    (the first loss is the checkpoint's), and trains."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers.published import CAULDRON, cauldron_rows
    from idefics_jax import Idefics2Config, load_hf_checkpoint
    from idefics_jax.checkpoints import restore_workdir
    from idefics_jax.train.loop import train

    path, _, _, _ = smolvlm
    rng = np.random.default_rng([seed, 93])
    for subset in ("ai2d", "vqav2"):
        (tmp_path / "data" / "the_cauldron" / subset).mkdir(parents=True)
        rows, _ = cauldron_rows(rng, 8)
        pq.write_table(pa.Table.from_pylist(rows, schema=CAULDRON),
                       tmp_path / "data" / "the_cauldron" / subset / "train-00000-of-00001.parquet")
    (tmp_path / "data" / "text_instructions").mkdir()
    rows = [{"images": [], "texts": [{"user": f"Say {k}.", "assistant": f"{k}", "source": "text"}]} for k in range(6)]
    pq.write_table(pa.Table.from_pylist(rows, schema=CAULDRON), tmp_path / "data" / "text_instructions" / "t.parquet")

    config = load_config("smolvlm_sft")
    model = Idefics2Config.from_json_file(path / "config.json")
    for key in ("vision", "text"):
        config.model[key] = getattr(model, key).to_dict()
    config.model.image_token_id, config.model.pixel_shuffle_factor = model.image_token_id, model.pixel_shuffle_factor
    config.model.tie_word_embeddings, config.model.dtype = model.tie_word_embeddings, "float32"
    config.model.init_from, config.data.dir = str(path), str(tmp_path / "data")
    config.data.seq_len, config.data.batch_size, config.data.num_workers = 512, 2, 0
    with pytest.raises(ValueError, match=r"images are tiles of model.vision.image_size=56 px; set the buckets to "
                                         r"\[\(56, 56\)\]"):
        train(config, tmp_path / "run")
    config.data.buckets = [(TILE, TILE)]
    config.data.read_threads, config.data.read_buffer = 1, 4
    for source in config.data.sources.values():
        source.longest_edge, source.max_length = LONGEST, 512
    config.train.steps, config.train.checkpoint_every, config.train.log_every = 3, 3, 1
    config.mesh.fsdp = 1
    train(config, tmp_path / "run")
    assert (tmp_path / "run" / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()
    losses = [json.loads(line).get("train/loss") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses)), losses
    _, trained, step = restore_workdir(tmp_path / "run")
    _, start = load_hf_checkpoint(path, on_device=False)
    moved = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(start))]
    assert step == 3 and 0 < max(moved) < 1e-3, max(moved)  # the checkpoint's weights, a few small steps on
