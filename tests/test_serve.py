"""`vlmtune serve` as a real server on 127.0.0.1, driven by the official `openai` client.

Two tiny Qwen2-VL LoRA runs with different processor settings are served on one base (`shapes`,
trained with a 56x56 pixel budget and a system prompt, and `other` at the checkpoint's defaults),
in one server process for the whole module. Answers are compared with what
`vlmtune.generation.generate` gives in this process for the same conversation built by hand, so a
server that dropped a turn, an image, the run's pixel budget or the chosen adapter answers
differently (the runs are trained only a few steps, so their answers still follow every input).
"""

from __future__ import annotations

import base64
import http.client
import json
import signal
import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import caption_records, draw, free_port, read_jsonl, run_cli, start_cli, write_json

from vlmtune.config import load_config
from vlmtune.data.sample import IMAGE, Sample, Turn
from vlmtune.generation import generate, load_target, make_encoder, resolve_target
from vlmtune.train import train

KEY = "test-key"
TOKENS = 6
Q = "What is in the image?"
ASKED = f"{IMAGE}\n{Q}"  # how the server reads [image, Q]: the question on its own line (--image-newline)


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_part(path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


def train_run(root: Path, model: Path, data: str, name: str, *extra: str) -> Path:
    """A LoRA run trained two steps: its answers differ from the base's but still follow the input
    (trained longer, the tiny model answers "a" to everything, and equal answers would prove little)."""
    return train(load_config(None, [
        f"model.name_or_path={model}", f"data.train={data}", f"train.output_dir={root / name}",
        "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "train.learning_rate=0.01",
        "train.save_steps=1000", "train.logging_steps=100", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
        "eval.num_samples=0", *extra]))


def start_server(*args: str, ready_timeout: float = 120):
    """`vlmtune serve ARGS` in its own process, returned once /health answers, with its port."""
    port = free_port()
    server = start_cli(["serve", *args, "--port", str(port)])
    deadline = time.time() + ready_timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vlmtune serve exited with {server.returncode}:\n{server.read()[1]}")
        try:
            if raw_request(port, "GET", "/health")[0] == 200:
                return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise AssertionError(f"vlmtune serve did not answer /health in {ready_timeout} s:\n{server.read()[1]}")


def raw_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON) of one plain HTTP request: for bodies the openai client would not send."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_qwen2_vl) -> dict:
    root = tmp_path_factory.mktemp("serve")
    data = write_json(root / "train.json", caption_records(4, root, "t"))
    shapes = train_run(root, tiny_qwen2_vl, data, "shapes", "data.max_pixels=3136",
                       "data.system_prompt=Answer briefly.")
    other = train_run(root, tiny_qwen2_vl, data, "other", "train.learning_rate=0.03", "train.seed=7")
    images = {name: draw(root / "req" / f"{name}.png", colour, shape, size) for name, colour, shape, size in
              [("red", "red", "circle", (112, 112)), ("blue", "blue", "square", (84, 140)),
               ("big", "green", "triangle", (300, 300))]}
    (root / "outside.png").write_bytes(Path(images["red"]).read_bytes())
    server, port = start_server(str(shapes), "--adapter", f"other={other}", "--api-key", KEY,
                                "--allow-local-images", str(root / "req"), "--max-images", "2",
                                "--max-image-pixels", "40000", "--max-body-mb", "1")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    yield {"root": root, "shapes": shapes, "other": other, "base": tiny_qwen2_vl, "images": images, "port": port,
           "server": server, "client": client}
    server.send_signal(signal.SIGKILL)


@pytest.fixture(scope="module")
def local(setup):
    """Each served variant loaded in this process: model and its own run's encoder."""
    loaded = {}
    for name in ("shapes", "other"):
        target = resolve_target(str(setup[name]))
        model, processor, family = load_target(target)
        loaded[name] = (model, make_encoder(target.config, processor, family))
    base_target = resolve_target(str(setup["shapes"])).base()
    model, processor, family = load_target(base_target)
    loaded["base"] = (model, make_encoder(base_target.config, processor, family))
    return loaded


def expected(local, variant: str, images: list[str], turns: list[Turn]) -> str:
    model, encoder = local[variant]
    sample = Sample(images, [*turns, Turn("assistant", "")])
    return generate(model, encoder, [sample], 1, TOKENS, progress=False)[0]


def ask(setup, content, model: str = "shapes", max_tokens: int = TOKENS, **kwargs):
    return setup["client"].chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens, temperature=0, **kwargs)


def test_models_and_health(setup):
    assert [m.id for m in setup["client"].models.list()] == ["base", "shapes", "other"]
    status, health = raw_request(setup["port"], "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["default"] == "shapes"


def test_text_only(setup, local):
    reply = ask(setup, "Describe the picture.")
    answer = reply.choices[0].message.content
    assert answer == expected(local, "shapes", [], [Turn("user", "Describe the picture.")])
    assert reply.model == "shapes" and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_one_and_two_images(setup, local):
    red, blue = setup["images"]["red"], setup["images"]["blue"]
    one = ask(setup, [image_part(red), {"type": "text", "text": Q}])
    assert one.choices[0].message.content == expected(local, "shapes", [red], [Turn("user", ASKED)])
    two = ask(setup, [image_part(red), image_part(blue), {"type": "text", "text": Q}])
    both = Turn("user", IMAGE * 2 + "\n" + Q)
    assert two.choices[0].message.content == expected(local, "shapes", [red, blue], [both])
    model, encoder = local["shapes"]
    sample = Sample([red, blue], [both, Turn("assistant", "")])
    assert two.usage.prompt_tokens == len(encoder.encode_prompt(sample)["input_ids"])  # the run's 56x56 budget
    assert two.usage.prompt_tokens > one.usage.prompt_tokens


def test_multi_turn(setup, local):
    red = setup["images"]["red"]
    first = ask(setup, [image_part(red), {"type": "text", "text": Q}]).choices[0].message.content
    messages = [{"role": "user", "content": [image_part(red), {"type": "text", "text": Q}]},
                {"role": "assistant", "content": first}, {"role": "user", "content": "And the colour?"}]
    reply = setup["client"].chat.completions.create(model="shapes", messages=messages, max_tokens=TOKENS,
                                                    temperature=0)
    turns = [Turn("user", ASKED), Turn("assistant", first), Turn("user", "And the colour?")]
    assert reply.choices[0].message.content == expected(local, "shapes", [red], turns)


def test_image_newline_off_joins_parts_as_they_are(setup, local):
    from vlmtune.generation import load_generator
    from vlmtune.serve.app import ServeOptions, prepare
    from vlmtune.serve.requests import Limits

    red = setup["images"]["red"]
    content = [image_part(red), {"type": "text", "text": Q}]
    body = {"model": "shapes", "messages": [{"role": "user", "content": content}]}
    generator = load_generator(str(setup["shapes"]))
    _, encoder = local["shapes"]
    for image_newline, text in ((True, ASKED), (False, IMAGE + Q)):
        prompt = prepare(generator, body, ServeOptions(Limits(), image_newline=image_newline)).prompt
        sample = Sample([red], [Turn("user", text), Turn("assistant", "")])
        assert prompt["input_ids"].tolist() == encoder.encode_prompt(sample)["input_ids"].tolist()


def test_streaming_adds_up_to_the_answer(setup):
    content = [image_part(setup["images"]["blue"]), {"type": "text", "text": Q}]
    whole = ask(setup, content, "base", max_tokens=12)  # the untrained base never stops early: a long answer
    chunks = list(ask(setup, content, "base", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) >= 2  # really streamed, not one piece at the end
    assert "".join(pieces) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_end_the_answer_streamed_or_not(setup):
    content = [image_part(setup["images"]["red"]), {"type": "text", "text": Q}]
    full = ask(setup, content, "base", max_tokens=12).choices[0].message.content
    assert len(full) >= 4
    stop = next(full[i:i + 2] for i in range(len(full) // 2, len(full) - 1) if not full[i:i + 2].isspace()
                and full[i:i + 2] == full[i:i + 2].strip())
    cut = ask(setup, content, "base", max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    streamed = ask(setup, content, "base", max_tokens=12, stop=[stop], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.choices[0].message.content


def test_base_and_two_adapters_chosen_by_model(setup, local):
    red = setup["images"]["red"]
    content = [image_part(red), {"type": "text", "text": Q}]
    answers = {name: ask(setup, content, model=name) for name in ("base", "shapes", "other")}
    for name, reply in answers.items():
        assert reply.model == name
        assert reply.choices[0].message.content == expected(local, name, [red], [Turn("user", ASKED)]), name
    assert len({r.choices[0].message.content for r in answers.values()}) == 3
    # each adapter keeps its own run's processor settings: `other` sees the image at 112x112
    assert answers["other"].usage.prompt_tokens > answers["shapes"].usage.prompt_tokens


def test_concurrent_requests_share_a_generate_call(setup):
    red, blue = setup["images"]["red"], setup["images"]["blue"]
    contents = [[image_part(image), {"type": "text", "text": text}]
                for image in (red, blue) for text in (Q, "Describe the picture.", "What colour is it?")]
    alone = [ask(setup, c).choices[0].message.content for c in contents]
    before = raw_request(setup["port"], "GET", "/health")[1]["batches"]
    together: list[str | None] = [None] * len(contents)

    def send(i: int) -> None:
        together[i] = ask(setup, contents[i]).choices[0].message.content

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(contents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = raw_request(setup["port"], "GET", "/health")[1]["batches"]
    assert together == alone
    assert after["requests"] - before["requests"] == len(contents)
    assert after["generate_calls"] - before["generate_calls"] < len(contents) and after["largest_batch"] > 1


# -- serve == predict == eval ------------------------------------------------------------------

def equality_data(folder: Path) -> tuple[str, list[str]]:
    """Three pictures of different sizes asked the same question, as `vlmtune data prepare` writes
    records (`<image>\\nquestion`, the layout the server reads an image part then a text part as)."""
    records, images = [], []
    for i, (colour, shape, size) in enumerate([("red", "circle", (112, 112)), ("blue", "square", (84, 140)),
                                               ("yellow", "triangle", (168, 56))]):
        images.append(draw(folder / "images" / f"{i}.png", colour, shape, size))
        records.append({"image": f"images/{i}.png", "conversations": [
            {"role": "user", "content": ASKED}, {"role": "assistant", "content": f"a {colour} {shape}"}]})
    return write_json(folder / "eq.json", records), images


def check_serve_equals_predict_and_eval(run: Path, port: int, client, folder: Path, model: str, changed: str) -> None:
    """Greedy answers of the server, `vlmtune predict` and `vlmtune eval` agree on every image, and
    the server's prompts have the run's own length (its pixel budget or slices), not the checkpoint's.

    Args:
        changed: the `data.` setting the run trained with that differs from the checkpoint's.
    """
    from vlmtune.data.encode import Encoder
    from vlmtune.models import family_for
    from vlmtune.models.load import load_processor

    data, images = equality_data(folder)
    predicted = run_cli(["predict", str(run), "--data", data, "--out", str(folder / "p.jsonl"),
                         "--max-new-tokens", str(TOKENS)])
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    evaluated = run_cli(["eval", str(run), "--data", data, "--out", str(folder / "eval"), "--task", "caption",
                         "--max-new-tokens", str(TOKENS)])
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    replies = [client.chat.completions.create(model=model, max_tokens=TOKENS, temperature=0, messages=[
        {"role": "user", "content": [image_part(image), {"type": "text", "text": Q}]}]) for image in images]
    served = [r.choices[0].message.content for r in replies]
    assert len(set(served)) > 1, served  # answers that follow the image, so that equal ones mean something
    assert served == [r["prediction"] for r in read_jsonl(folder / "p.jsonl")]
    assert served == [r["prediction"] for r in read_jsonl(folder / "eval" / "final" / "predictions.jsonl")]

    target = resolve_target(str(run))
    base = Path(target.config.model.name_or_path)
    family = family_for(base)
    asked = [Sample([image], [Turn("user", ASKED), Turn("assistant", "")]) for image in images]
    run_encoder = make_encoder(target.config, load_processor(base, family, target.config.data.min_pixels,
                                                             target.config.data.max_pixels,
                                                             max_slice_nums=target.config.data.max_slice_nums), family)
    default_encoder = Encoder(load_processor(base, family), family, system_prompt=target.config.data.system_prompt)
    lengths = [len(run_encoder.encode_prompt(a)["input_ids"]) for a in asked]
    assert [r.usage.prompt_tokens for r in replies] == lengths
    assert lengths != [len(default_encoder.encode_prompt(a)["input_ids"]) for a in asked], \
        f"the test images should give other prompts under the checkpoint's own {changed}"


def test_greedy_answers_equal_predict_and_eval_qwen2_vl(setup):
    check_serve_equals_predict_and_eval(setup["shapes"], setup["port"], setup["client"], setup["root"] / "eq",
                                        "shapes", "max_pixels")


def test_greedy_answers_equal_predict_and_eval_minicpm_v_2_6(tmp_path, tiny_model_dir):
    model = tiny_model_dir("minicpmv2_6")
    data = write_json(tmp_path / "train.json", caption_records(4, tmp_path, "t"))
    run = train_run(tmp_path, model, data, "minicpm", "data.max_slice_nums=2")
    server, port = start_server(str(run))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        check_serve_equals_predict_and_eval(run, port, client, tmp_path / "eq", "minicpm", "max_slice_nums")
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        code = server.wait(30)
    assert code == 0 and "Traceback" not in server.read()[1]


# -- bad requests -------------------------------------------------------------------------------

def still_answers(setup) -> None:
    assert ask(setup, "Describe the picture.", max_tokens=1).choices[0].message.content is not None


def bad(setup, error: type, content=None, **kwargs) -> openai.APIStatusError:
    with pytest.raises(error) as caught:
        ask(setup, content if content is not None else "Describe the picture.", **kwargs)
    still_answers(setup)
    return caught.value


def test_malformed_json_and_unknown_model(setup):
    status, body = raw_request(setup["port"], "POST", "/v1/chat/completions", b'{"model": "shapes", "messages": [',
                               {"Authorization": f"Bearer {KEY}"})
    assert status == 400 and body["error"]["code"] == "invalid_json" and "not valid JSON" in body["error"]["message"]
    e = bad(setup, openai.NotFoundError, model="nope")
    assert e.status_code == 404 and "unknown model 'nope'" in e.message and "base, shapes, other" in e.message


@pytest.mark.parametrize("url, code, words", [
    ("data:image/png;base64,@@not-base64@@", "invalid_base64", "base64 data is invalid"),
    ("data:image/png;base64," + base64.b64encode(b"plain text, no picture").decode(), "invalid_image",
     "not an image"),
    ("https://example.com/cat.png", "remote_image_url", "remote image URLs are not fetched"),
])
def test_bad_image_urls(setup, url, code, words):
    e = bad(setup, openai.BadRequestError, [{"type": "image_url", "image_url": {"url": url}}])
    assert e.status_code == 400 and e.code == code and words in e.message


def test_too_many_images_too_large_an_image_and_one_the_processor_refuses(setup):
    red = setup["images"]["red"]
    e = bad(setup, openai.BadRequestError, [image_part(red)] * 3)
    assert e.code == "too_many_images" and "more than 2" in e.message
    e = bad(setup, openai.BadRequestError, [image_part(setup["images"]["big"])])
    assert e.code == "image_too_large" and "300x300" in e.message and "--max-image-pixels" in e.message
    thin = draw(setup["root"] / "thin.png", "red", "square", (4000, 8))  # Qwen2-VL takes aspect ratios < 200
    e = bad(setup, openai.BadRequestError, [image_part(thin), {"type": "text", "text": Q}])
    assert e.code == "invalid_messages" and "aspect ratio" in e.message


def test_prompt_longer_than_the_context(setup):
    e = bad(setup, openai.BadRequestError, "circle " * 5000)
    assert e.code == "context_length_exceeded" and "context is 4096 tokens" in e.message


def test_body_over_the_limit(setup):
    e = bad(setup, openai.APIStatusError, "x" * (1024 * 1024 + 10))
    assert e.status_code == 413 and "--max-body-mb" in e.message


def test_api_key_is_required(setup):
    for key in ("wrong", ""):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{setup['port']}/v1", api_key=key or "-", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model="shapes", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
        assert caught.value.status_code == 401 and "API key" in caught.value.message
    assert raw_request(setup["port"], "GET", "/v1/models")[0] == 401
    still_answers(setup)


def test_local_images_only_under_the_allowed_folder(setup, local):
    red = setup["images"]["red"]
    allowed = ask(setup, [{"type": "image_url", "image_url": {"url": "red.png"}}, {"type": "text", "text": Q}])
    assert allowed.choices[0].message.content == expected(local, "shapes", [red], [Turn("user", ASKED)])
    outside = setup["root"] / "outside.png"
    for url in (str(outside), f"file://{outside}", "../outside.png"):
        e = bad(setup, openai.PermissionDeniedError, [{"type": "image_url", "image_url": {"url": url}}])
        assert e.status_code == 403 and "outside the folder" in e.message


def test_a_second_server_on_the_same_port_says_so(setup):
    second = start_cli(["serve", str(setup["shapes"]), "--port", str(setup["port"])])
    assert second.wait(60) == 2
    assert f"port {setup['port']} on 127.0.0.1 is already in use" in second.read()[1]
    still_answers(setup)


def test_sigterm_stops_the_server_cleanly(setup):  # last: it stops the module's server
    server = setup["server"]
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
    out, err = server.read()
    assert "stopped" in err and "Traceback" not in err
