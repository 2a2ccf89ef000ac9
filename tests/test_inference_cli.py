"""The generate and evaluate commands end to end, on a tiny random model with a real tokenizer."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import xla_flags
from idefics_jax.inference.evaluate import anls, levenshtein, normalize_answer, vqa_accuracy


def run_cli(module, argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = module.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def reference_answer(chat_dir, messages, images, max_new_tokens):
    """transformers' greedy generate on the inputs our processor makes (proven equal to theirs)."""
    from idefics_jax.inference.assistant import Assistant
    from idefics_jax.checkpoints import load as load_for_inference

    assistant = Assistant(load_for_inference(chat_dir[0]))
    batch = assistant.prepare([messages], [[Image.open(chat_dir[0] / i) for i in images]])
    kwargs = dict(input_ids=torch.tensor(batch["input_ids"]), attention_mask=torch.tensor(batch["attention_mask"]))
    if "pixel_values" in batch:
        kwargs["pixel_values"] = torch.tensor(batch["pixel_values"]).permute(0, 1, 4, 2, 3)
        kwargs["pixel_attention_mask"] = torch.tensor(batch["pixel_attention_mask"])
    with torch.no_grad():
        out = chat_dir[1].generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=list(assistant.stop_ids), pad_token_id=assistant.tokenizer.pad_id)
    return assistant.decode(out[0, batch["input_ids"].shape[1]:].tolist())


def printed_answers(out: str) -> list[str]:
    """The chat's answers in its output, each printed as "Assistant: " + answer + a newline; an
    answer of a random model may hold newlines itself (and characters such as \x1c that
    str.splitlines() would break at), so answers end where the next begins."""
    return re.findall(r"(?:^|(?<=\n))Assistant: (.*?)\n(?=Assistant: |\Z)", out, re.S)


def test_generate_cli_streams_the_reference_answer(chat_dir, capsys, tmp_path):
    from idefics_jax.cli import generate
    from idefics_jax.cli import convert

    path = chat_dir[0]
    argv = ["--image", str(path / "a.png"), "--image", str(path / "b.png"), "--prompt", "what is written",
            "--max_new_tokens", "12"]
    code, out, err = run_cli(generate, ["--checkpoint", str(path), *argv], capsys)
    assert code == 0, err
    expected = reference_answer(chat_dir, [{"role": "user", "content": "<image><image>what is written"}],
                                ["a.png", "b.png"], 12)
    assert out.strip() == expected
    # the same from an idefics_jax checkpoint: the converter keeps the tokenizer and image settings
    assert convert.main(["from-hf", str(path), str(tmp_path / "ours")]) == 0
    capsys.readouterr()
    code, out_ours, err = run_cli(generate, ["--checkpoint", str(tmp_path / "ours"), *argv], capsys)
    assert code == 0, err
    assert out_ours.strip() == expected
    code, out, err = run_cli(generate, ["--checkpoint", str(path), *argv, "--system", "Answer briefly."], capsys)
    assert code == 0, err
    system = [{"role": "system", "content": "Answer briefly."}]
    question = [{"role": "user", "content": "<image><image>what is written"}]
    assert out.strip() == reference_answer(chat_dir, system + question, ["a.png", "b.png"], 12)
    # --dtype bfloat16: the parameters are read as bfloat16 (half the memory), from either kind
    from idefics_jax.checkpoints import load as load_for_inference

    for directory in (path, tmp_path / "ours"):
        params = load_for_inference(directory, dtype=jnp.bfloat16).params
        assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
        code, _, err = run_cli(generate, ["--checkpoint", str(directory), *argv, "--dtype", "bfloat16"], capsys)
        assert code == 0, err


def test_chat_keeps_the_conversation(chat_dir, capsys, monkeypatch):
    from idefics_jax.cli import generate

    path = chat_dir[0]
    code, out, err = run_cli(generate, ["--checkpoint", str(path), "--image", str(path / "a.png"), "--chat",
                                        "--max_new_tokens", "6"], capsys,
                             "/retry\nhello world\nwhat <image>\n/retry\nthe red fox\n\n", monkeypatch)
    assert code == 0, err
    assert "no answer to retry" in err and "1 <image> placeholder(s) but 0 image(s)" in err  # named, the chat goes on
    answers = printed_answers(out)
    assert len(answers) == 3 and answers[1] == answers[0]  # greedy: the retried answer is the same
    answers = answers[1:]
    first = [{"role": "user", "content": "<image>hello world"}]
    assert answers[0] == reference_answer(chat_dir, first, ["a.png"], 6)
    second = first + [{"role": "assistant", "content": answers[0]}, {"role": "user", "content": "the red fox"}]
    assert answers[1] == reference_answer(chat_dir, second, ["a.png"], 6)


def test_chat_prefills_only_new_turns_and_answers_as_whole_prefills(chat_dir):
    from idefics_jax.data.processor import apply_chat_template
    from idefics_jax.inference.assistant import Assistant
    from idefics_jax.checkpoints import load as load_for_inference
    from idefics_jax.inference.sampling import Sampling

    assistant = Assistant(load_for_inference(chat_dir[0]))
    a, b = (Image.open(chat_dir[0] / name) for name in ("a.png", "b.png"))
    chat = assistant.chat(split=True, max_new_tokens=8)
    turns = [("<image>what is written", [a]), ("and here <image>?", [b]), ("the red fox", [])]
    messages, images = [], []
    for text, new_images in turns:
        answer = "".join(chat.stream({"role": "user", "content": text}, new_images))
        messages.append({"role": "user", "content": text})
        images += new_images
        assert answer == assistant.reply(messages, images, split=True, max_new_tokens=8)
        messages.append({"role": "assistant", "content": answer})
        assert chat.messages == messages
        # later turns reuse the cache: at least the earlier turns up to their answers
        assert chat.conversation.reused >= (0 if len(messages) == 2 else 5 * assistant.loaded.config.image_seq_len + 10)
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        list(chat.stream({"role": "user", "content": "<image>?"}))
    assert chat.messages == messages and len(chat.images) == 2
    # greedy: the same answer again, only the last prompt token run again
    prompt = len(chat.processor.encode_prompt(apply_chat_template(messages[:-1], add_generation_prompt=True)))
    assert "".join(chat.retry()) == messages[-1]["content"] and chat.messages == messages
    assert chat.conversation.reused == prompt - 1
    chat.reset()
    assert chat.messages == [] and chat.conversation.cached_tokens == 0
    with pytest.raises(ValueError, match="no answer to retry"):
        list(chat.retry())
    # sampled: answer n draws with seed + n, retries included
    sampling = Sampling(temperature=1.5)
    chat = assistant.chat(split=True, max_new_tokens=8, sampling=sampling, seed=5)
    first = {"role": "user", "content": "<image>what is written"}
    answers = ["".join(chat.stream(first, [a]))] + ["".join(chat.retry()) for _ in range(2)]
    expected = [assistant.reply([first], [a], split=True, max_new_tokens=8, sampling=sampling, seed=5 + n)
                for n in range(3)]
    assert answers == expected and chat.messages[-1]["content"] == answers[-1] and len(chat.messages) == 2


def test_chat_drops_its_oldest_turns_to_fit_the_context(chat_dir):
    """... and keeps its system message, whose tokens the turn after a drop reuses from the cache."""
    from idefics_jax.data.processor import apply_chat_template
    from idefics_jax.inference.assistant import Assistant
    from idefics_jax.checkpoints import load as load_for_inference

    assistant = Assistant(load_for_inference(chat_dir[0]))
    context = assistant.loaded.config.text.max_position_embeddings
    a = Image.open(chat_dir[0] / "a.png")
    system = "You are a careful reader. Answer in a few words."
    chat = assistant.chat(max_new_tokens=8, system=system)
    opening = [{"role": "system", "content": system}]  # kept first, never dropped
    words = "the red fox jumps over the lazy dog and runs away "
    prompt_length = lambda messages: len(chat.processor.encode_prompt(apply_chat_template(opening + messages, True)))
    system_tokens = len(chat.processor.encode_prompt(apply_chat_template(opening)))
    drop_turn = None
    for turn in range(60):
        text = ("<image>" if turn == 0 else "") + words + str(turn)
        answer = "".join(chat.stream({"role": "user", "content": text}, [a] if turn == 0 else []))
        kept, images = chat.messages[:-1], [a] if chat.images else []
        assert kept[0]["role"] == "user" and kept[-1]["content"] == text and prompt_length(kept) + 8 <= context
        assert answer == assistant.reply(opening + kept, images, max_new_tokens=8)
        if chat.dropped and drop_turn is None:  # down to 3/4 of the context, prefilled after the system message
            drop_turn, after_drop = turn, prompt_length(kept)
            assert system_tokens <= chat.conversation.reused < system_tokens + 8
            assert after_drop <= (context - 8) * 3 // 4
        elif drop_turn is not None:  # the next turn reuses the cache again
            assert chat.conversation.reused > after_drop // 2
            break
    assert drop_turn and chat.dropped >= 2 and not chat.images
    too_long = {"role": "user", "content": words * 200}  # alone more than the context: named, nothing lost
    before = list(chat.messages)
    with pytest.raises(ValueError, match="context"):
        list(chat.stream(too_long))
    assert chat.messages == before


def test_chat_keeps_an_answer_that_spells_special_tokens_as_text(chat_dir, monkeypatch):
    """An answer that spells `<image>` and `</s>` (a fake one: a random model rarely does) is kept
    so that the next prompt reads it as text: the next turn neither finds a placeholder without an
    image nor ends the text there, and answers as a whole prefill of the kept conversation does."""
    from idefics_jax.data.tokenizer import WORD_JOINER
    from idefics_jax.inference.assistant import Assistant
    from idefics_jax.checkpoints import load as load_for_inference

    assistant = Assistant(load_for_inference(chat_dir[0]))
    chat = assistant.chat(max_new_tokens=4)
    a = Image.open(chat_dir[0] / "a.png")
    spelled, real = "Write <image> or </s> there", assistant.text_pieces

    def spelling(tokens):  # generates as usual, then says `spelled`
        for _ in real(tokens):
            pass
        yield spelled

    monkeypatch.setattr(assistant, "text_pieces", spelling)
    assert "".join(chat.stream({"role": "user", "content": "<image>hello"}, [a])) == spelled
    monkeypatch.undo()
    kept = chat.messages[-1]["content"]
    assert kept.replace(WORD_JOINER, "") == spelled and "<image>" not in kept and "</s>" not in kept
    special = set(chat.processor.tokenizer.special_tokens.values())
    assert not special & set(chat.processor.tokenizer.encode(kept, add_bos=False))
    answer = "".join(chat.stream({"role": "user", "content": "the red fox"}))
    assert answer == assistant.reply(chat.messages[:-1], [a], max_new_tokens=4)


def test_generate_cli_names_bad_input(chat_dir, capsys, tmp_path):
    from idefics_jax.cli import generate

    path = chat_dir[0]
    (tmp_path / "broken.png").write_bytes((path / "a.png").read_bytes()[:60])
    cases = [
        (["--image", str(tmp_path / "broken.png"), "--prompt", "hi"], "broken.png"),
        (["--image", str(tmp_path / "missing.png"), "--prompt", "hi"], "missing.png"),
        (["--image", str(path / "a.png"), "--prompt", "<image> and <image>?"], "2 <image> placeholder(s) but 1 image"),
        (["--prompt", "the quick brown fox " * 150, "--max_new_tokens", "8"], "context of 400 tokens"),
        (["--prompt", "hi", "--mesh", "1,x,1"], "--mesh takes DATA,FSDP,TENSOR"),
        (["--prompt", "hi", "--repetition_penalty", "0"], "repetition_penalty must be > 0"),
        (["--prompt", "hi", "--min_p", "2"], "min_p must be in [0, 1]"),
        (["--prompt", "hi", "--mesh", f"{len(jax.devices()) + 1},1,1"], "devices"),
        (["--prompt", "hi", "--system", "<image>look"], "system message is text without <image>"),
        (["--chat", "--system", " "], "system message is text without <image>"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(generate, ["--checkpoint", str(path), *argv], capsys)
        assert code == 2 and message in err, (argv, err)
    code, _, err = run_cli(generate, ["--checkpoint", str(tmp_path), "--prompt", "hi"], capsys)
    assert code == 2 and "is not a checkpoint" in err


def test_evaluate_cli_scores_answers(chat_dir, capsys, tmp_path):
    from idefics_jax.cli import evaluate

    path = chat_dir[0]
    questions = ["what is written", "what number is shown", "read the text"]
    predicted = [reference_answer(chat_dir, [{"role": "user", "content": "<image>" + q}], ["a.png"], 16)
                 for q in questions]
    records = [  # the first is answered right, the second wrong, the third right for VQA only
        {"id": "right", "images": ["a.png"], "messages": [{"role": "user", "content": "<image>" + questions[0]},
                                                          {"role": "assistant", "content": predicted[0]}]},
        {"id": "wrong", "images": ["a.png"], "messages": [{"role": "user", "content": "<image>" + questions[1]},
                                                          {"role": "assistant", "content": predicted[1] + " x"}]},
        {"id": "vqa", "images": ["a.png"], "messages": [{"role": "user", "content": "<image>" + questions[2]},
                                                        {"role": "assistant", "content": "nothing at all"}],
         "answers": [predicted[2] + "."] * 3 + ["other"] * 7},
    ]
    records = [{"type": "conversation", **r} for r in records]  # idefics_jax.data's conversation records
    data = path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    report_path = tmp_path / "report.json"
    code, out, err = run_cli(evaluate, ["--checkpoint", str(path), "--data", str(data), "--output", str(report_path),
                                        "--batch_size", "2", "--mesh=-1,1,1"], capsys)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert [r["prediction"] for r in report["results"]] == predicted
    assert [r["exact_match"] for r in report["results"]] == [True, False, predicted[2] == "nothing at all"]
    vqa_expected = 1.0 if normalize_answer(predicted[2]) != "other" else 0.0
    assert report["results"][2]["vqa_accuracy"] == pytest.approx(0.9 * vqa_expected)  # 7/10 x 1 + 3/10 x 2/3
    assert report["n"] == 3 and report["exact_match"] == pytest.approx(np.mean([r["exact_match"] for r in report["results"]]))
    clean = " ".join(predicted[1].lower().split())
    wrong_anls = 1 - 2 / (len(clean) + 2) if len(clean) > 2 else 0.0  # 2 edits: " x" appended
    assert [r["anls"] for r in report["results"][:2]] == [1.0, pytest.approx(wrong_anls)]
    assert report["anls"] == pytest.approx(np.mean([r["anls"] for r in report["results"]]))
    # the same questions as ArrayRecord files and as a TFDS build (images embedded) score the same
    from idefics_jax.data.sources import write_array_record
    from idefics_jax.data.tfds_builder import build

    source = tmp_path / "jsonl"
    source.mkdir()
    (source / "data.jsonl").write_text(data.read_text())
    (source / "a.png").write_bytes((path / "a.png").read_bytes())
    write_array_record(tmp_path / "array_record", records, path)
    build(source, tmp_path / "tfds")
    for other in ("array_record", "tfds"):
        code, _, err = run_cli(evaluate, ["--checkpoint", str(path), "--data", str(tmp_path / other), "--output",
                                          str(tmp_path / f"{other}.json"), "--batch_size", "2"], capsys)
        assert code == 0, err
        assert json.loads((tmp_path / f"{other}.json").read_text())["results"] == report["results"]
    code, _, err = run_cli(evaluate, ["--checkpoint", str(path), "--data", str(tmp_path / "none.jsonl")], capsys)
    assert code == 2 and "none.jsonl" in err


def run_two_processes(module: str, argv: list[str], devices_each: int = 2,
                      stdin: str | None = None) -> list[subprocess.CompletedProcess]:
    """`python -m module argv` as two jax.distributed processes on localhost (launch/gpu_multihost.sh),
    each with `devices_each` CPU devices; `stdin` goes to process 0."""
    import portpicker

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(devices_each))
    port = portpicker.pick_unused_port()
    launcher = str(Path(__file__).parents[1] / "launch" / "gpu_multihost.sh")
    procs = [subprocess.Popen(["bash", launcher, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--", sys.executable, "-m", module, *argv],
                              env=env, stdin=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(stdin or "", timeout=600) if i == 0 else p.communicate(timeout=600)
               for i, p in enumerate(procs)]
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_two_processes_evaluate_generate_and_chat_as_one(chat_dir, capsys, tmp_path, monkeypatch):
    """evaluate and generate over two jax.distributed processes (a (2, 1, 2) mesh: data over the
    processes, tensor parallel within each) give one process's report and answer; process 0 alone
    writes and prints. Each process reads only its shards: of the safetensors for evaluate, of an
    orbax checkpoint for generate. A chat reads its lines and `/image` files on process 0 only and
    answers as one process does."""
    from idefics_jax.cli import evaluate, generate
    from idefics_jax.cli import convert

    path = chat_dir[0]
    records = [{"id": str(i), "images": [str(path / image)],
                "messages": [{"role": "user", "content": "<image>" + question}, {"role": "assistant", "content": "a fox"}]}
               for i, (image, question) in enumerate([("a.png", "what is written"), ("b.png", "what number"),
                                                      ("a.png", "read it"), ("b.png", "and here")])]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    options = ["--checkpoint", str(path), "--data", str(data), "--batch_size", "4", "--max_new_tokens", "8"]
    code, _, err = run_cli(evaluate, [*options, "--output", str(tmp_path / "one.json")], capsys)
    assert code == 0, err
    ask = ["--checkpoint", str(path), "--image", str(path / "a.png"), "--prompt", "what is written",
           "--max_new_tokens", "10"]
    code, answer, err = run_cli(generate, ask, capsys)
    assert code == 0, err

    runs = run_two_processes("idefics_jax.evaluate", [*options, "--output", str(tmp_path / "two.json")])
    assert all(run.returncode == 0 for run in runs), runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    one, two = (json.loads((tmp_path / name).read_text()) for name in ["one.json", "two.json"])
    assert (two["processes"], two["devices"], one["processes"], one["devices"]) == (2, 4, 1, 1)
    assert [r["prediction"] for r in two["results"]] == [r["prediction"] for r in one["results"]]
    # (stdout also holds the connection log of the CPU collectives, gloo, whose threads interleave it)
    assert "4 questions: exact match" in runs[0].stdout and "questions" not in runs[1].stdout

    assert convert.main(["from-hf", str(path), str(tmp_path / "ours")]) == 0
    runs = run_two_processes("idefics_jax.generate", ["--checkpoint", str(tmp_path / "ours"), *ask[2:]])
    assert all(run.returncode == 0 for run in runs), runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    assert answer.strip() in runs[0].stdout and (not answer.strip() or answer.strip() not in runs[1].stdout)

    lines = f"/image {path / 'b.png'}\n/image {tmp_path / 'missing.png'}\nhello <image>\nthe red fox\n\n"
    chat = ["--checkpoint", str(path), "--chat", "--max_new_tokens", "6"]
    code, alone, err = run_cli(generate, chat, capsys, lines, monkeypatch)
    assert code == 0 and "cannot read image" in err, err
    runs = run_two_processes("idefics_jax.generate", chat, devices_each=1, stdin=lines)
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    # lines (the gloo log may follow the last answer), compared between runs: the same split either way
    # (a random model's answer may hold a carriage return, which one capture turns into a newline)
    answers = lambda out: [line for line in out.replace("\r\n", "\n").replace("\r", "\n").split("\n")
                           if line.startswith("Assistant: ")]
    assert len(answers(alone)) == 2 and answers(runs[0].stdout) == answers(alone), (runs[0].stdout, alone)
    assert not answers(runs[1].stdout) and "cannot read image" in runs[0].stderr
    assert "cannot read image" not in runs[1].stderr


def test_evaluate_names_bad_records_and_goes_on_after_a_stop(chat_dir, capsys, tmp_path, monkeypatch):
    """A record with an unreadable image, a wrong placeholder count, a question longer than the
    context or a malformed structure is named and left out of the scores; a run stopped after its
    first batches goes on from its saved results, generating only the rest, and reports what an
    uninterrupted run does."""
    from idefics_jax.cli import evaluate
    from idefics_jax.inference.assistant import Assistant

    path = chat_dir[0]
    (tmp_path / "broken.png").write_bytes((path / "a.png").read_bytes()[:80])
    question = lambda i, text, images: {"id": i, "images": [str(path / name) for name in images], "messages": [
        {"role": "user", "content": text}, {"role": "assistant", "content": "a fox"}]}
    records = [question("q0", "<image>what is written", ["a.png"]), question("q1", "<image>what number", ["b.png"]),
               question("q2", "<image>read it", ["a.png"]), question("q3", "and here?", []),
               question("q4", "<image>this one", ["b.png"]), question("q5", "<image>and that", ["a.png"])]
    bad = [question("broken", "<image>what is it", [str(tmp_path / "broken.png")]),
           question("mismatch", "<image><image>both", ["a.png"]), question(None, "the red fox " * 150, []),
           {"id": "odd", "messages": "what is this?"}]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:3] + bad + records[3:]))
    argv = ["--checkpoint", str(path), "--data", str(data), "--batch_size", "2", "--max_new_tokens", "6"]
    generated, real = [], Assistant.generate_batch

    def counting(self, conversations, images, **kwargs):
        if len(generated) == stop_after:
            raise KeyboardInterrupt  # as a user's Ctrl-C, or a kill
        generated.append(len(conversations))
        return real(self, conversations, images, **kwargs)

    monkeypatch.setattr(Assistant, "generate_batch", counting)
    stop_after = None
    code, _, err = run_cli(evaluate, [*argv, "--output", str(tmp_path / "whole.json")], capsys)
    assert code == 0, err
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert (whole["n"], whole["failed"]) == (6, 4) and not (tmp_path / "whole.json.partial.jsonl").exists()
    errors = {r["id"]: r["error"] for r in whole["results"] if "error" in r}
    assert "broken.png" in errors["broken"] and "2 <image> placeholder(s) but 1 image(s)" in errors["mismatch"]
    assert "context of 400 tokens" in errors[None]
    assert errors["odd"].startswith("malformed record")
    assert all(f"question {name} was not scored" in err for name in ("'broken'", "'mismatch'", "number 6", "'odd'"))
    assert [r["id"] for r in whole["results"]] == ["q0", "q1", "q2", "broken", "mismatch", None, "odd", "q3", "q4",
                                                   "q5"]

    generated.clear()
    stop_after, output = 2, tmp_path / "stopped.json"
    with pytest.raises(KeyboardInterrupt):
        run_cli(evaluate, [*argv, "--output", str(output)], capsys)
    partial = tmp_path / "stopped.json.partial.jsonl"
    # settings + three batches (the third, "mismatch" and the long one, generated nothing)
    assert len(partial.read_text().splitlines()) == 1 + 6 and not output.exists()
    partial.write_text(partial.read_text() + '{"id": "q2", "answ')  # a line cut short by the kill
    generated.clear()
    stop_after = None
    code, _, err = run_cli(evaluate, [*argv, "--output", str(output)], capsys)
    assert code == 0, err
    assert "6 of 10 questions answered before" in err and sum(generated) == 3  # q3 (with "odd"), q4, q5
    assert json.loads(output.read_text())["results"] == whole["results"] and not partial.exists()
    # other settings: the saved results are not used
    generated.clear()
    stop_after = 1
    with pytest.raises(KeyboardInterrupt):
        run_cli(evaluate, [*argv, "--output", str(output)], capsys)
    generated.clear()
    stop_after = None
    code, _, err = run_cli(evaluate, [*argv[:-1], "5", "--output", str(output)], capsys)
    assert code == 0 and "answered before" not in err and sum(generated) == 6


def test_evaluate_halves_a_batch_that_runs_out_of_memory(chat_dir, monkeypatch, caplog):
    """A batch the device has no memory for is answered in halves, with the answers each question
    gets alone; a question that does not fit even alone is named and left out; other device errors
    end the run."""
    from idefics_jax.inference.assistant import Assistant
    from idefics_jax.inference.evaluate import evaluate_records
    from idefics_jax.checkpoints import load as load_for_inference

    path = chat_dir[0]
    asks = [("q0", "what is written", "a.png"), ("q1", "what number", "b.png"), ("huge", "read it", "a.png"),
            ("q3", "and here", "b.png"), ("q4", "this one", "a.png")]
    records = [{"id": i, "images": [name], "messages": [{"role": "user", "content": "<image>" + text},
                                                        {"role": "assistant", "content": "a fox"}]}
               for i, text, name in asks]
    assistant = Assistant(load_for_inference(path))
    alone = {r["id"]: assistant.reply(r["messages"][:1], [path / r["images"][0]], max_new_tokens=6, batch_size=1)
             for r in records}
    sizes, real = [], Assistant.generate_batch

    def limited(self, conversations, images, *, batch_size, **kwargs):
        sizes.append(batch_size)
        if batch_size > 2 or any(c[-1]["content"].endswith("read it") for c in conversations):
            raise jax.errors.JaxRuntimeError(f"{error}: Out of memory while trying to allocate 3145728 bytes.")
        return real(self, conversations, images, batch_size=batch_size, **kwargs)

    monkeypatch.setattr(Assistant, "generate_batch", limited)
    error = "RESOURCE_EXHAUSTED"
    with caplog.at_level("WARNING"):
        report = evaluate_records(assistant, records, path, batch_size=4, max_new_tokens=6)
    assert sizes == [4, 2, 2, 1, 1, 4, 2]  # [q0 q1 | huge q3 -> huge | q3], then [q4]
    assert "out of device memory at batch size 4; trying again at 2" in caplog.text
    assert (report["n"], report["failed"]) == (4, 1)
    assert {r["id"]: r["prediction"] for r in report["results"] if "error" not in r} == \
        {k: v for k, v in alone.items() if k != "huge"}
    assert report["results"][2]["id"] == "huge" and "out of device memory even alone" in report["results"][2]["error"]
    error = "INTERNAL"  # not a matter of memory: raised as it is
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        evaluate_records(assistant, records, path, batch_size=4, max_new_tokens=6)


def test_anls_rules():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert anls(" Hello  World ", ["hello world"]) == 1.0
    assert anls("helo", ["hello"]) == pytest.approx(0.8)
    assert anls("abcd", ["abxy"]) == 0.0  # distance 0.5: at the threshold, no credit
    assert anls("abcde", ["abxye"]) == pytest.approx(0.6)
    assert anls("invoice 12", ["total", "Invoice 13"]) == pytest.approx(0.9)  # the closest answer counts
    assert anls("", [""]) == 1.0


def test_vqa_accuracy_rules():
    assert normalize_answer("  The Two dogs! ") == "2 dogs"
    assert normalize_answer("3.5 m.") == "3.5 m"
    assert normalize_answer("Route 66.") == "route 66" and normalize_answer("v.2 .5") == "v.2 .5"
    # VQAv2's punctuation: inside a word a space, next to a space nothing, all of it in a text with 1,000
    assert normalize_answer("X-ray") == "x ray" and normalize_answer("well - done!") == "well done"
    assert normalize_answer("1,000 (about)") == "1000 about" and normalize_answer("at 10:30") == "at 10:30"
    assert normalize_answer("Don't") == normalize_answer("dont") == "dont" and normalize_answer("'") == ""
    assert vqa_accuracy("two", ["2"]) == 1.0
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    ten = ["cat"] * 2 + ["dog"] * 8  # 2 of 10 humans said cat: 9 subsets see 2 or 1 of them
    assert vqa_accuracy("cat", ten) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy("dog", ten) == 1.0
