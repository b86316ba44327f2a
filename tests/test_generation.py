"""`vlmtune.generation` on the untrained tiny Qwen2-VL, which never ends an answer by itself: token
limits, stop strings, streamed pieces, per-row settings in one batch, seeded sampling, and chat
messages read the way the `messages` data format reads them."""

from __future__ import annotations

import json

import pytest
from conftest import draw

from vlmtune.data.encode import TOKEN_KEYS
from vlmtune.data.formats import load_samples
from vlmtune.data.sample import IMAGE, Sample, Turn
from vlmtune.generation import Sampling, chat_sample, complete, load_generator, stream

LIMIT = 12


@pytest.fixture(scope="module")
def gen(tiny_qwen2_vl):
    return load_generator(str(tiny_qwen2_vl))


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[Sample]:
    folder = tmp_path_factory.mktemp("generation")
    red, blue = draw(folder / "red.png", "red", "circle"), draw(folder / "blue.png", "blue", "square", (84, 140))
    return [Sample([red], [Turn("user", IMAGE + "What is in the image?"), Turn("assistant", "")]),
            Sample([blue], [Turn("user", IMAGE + "Describe the picture."), Turn("assistant", "")])]


def a_stop(text: str) -> str:
    """Two characters from the second half of `text`, no whitespace in them."""
    return next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1)
                if not any(c.isspace() for c in text[i:i + 2]))


def test_limit_stop_strings_and_streamed_pieces(gen, samples):
    model, encoder = gen.model, gen.variant().encoder
    full = complete(model, encoder, samples[:1], LIMIT)[0]
    assert (full.finish_reason, full.completion_tokens) == ("length", LIMIT) and len(full.text) >= 4
    pieces: list[str] = []
    streamed = complete(model, encoder, samples[:1], LIMIT, on_text=lambda row, piece: pieces.append(piece))[0]
    assert streamed == full and len(pieces) > 1 and "".join(pieces) == full.text

    stop = a_stop(full.text)
    cut = complete(model, encoder, samples[:1], LIMIT, stop=[stop])[0]
    assert cut.text == full.text[:full.text.index(stop)].strip()
    assert cut.finish_reason == "stop" and cut.completion_tokens < LIMIT
    assert "".join(stream(model, encoder, samples[0], LIMIT, stop=[stop])) == cut.text


def test_rows_of_one_batch_keep_their_own_limit_and_stops(gen, samples):
    model, encoder = gen.model, gen.variant().encoder
    alone = [complete(model, encoder, [s], LIMIT)[0] for s in samples]
    stop = a_stop(alone[1].text)
    expected = [complete(model, encoder, samples[:1], 3)[0],
                complete(model, encoder, samples[1:], LIMIT, stop=[stop])[0]]
    together = complete(model, encoder, samples, [3, LIMIT], stop=[[], [stop]])
    assert together == expected
    assert together[0].completion_tokens == 3 and together[1].finish_reason == "stop"


@pytest.mark.long
def test_seeded_sampling_repeats_itself(gen, samples):
    def draw_with(seed: int) -> str:
        return gen.complete(samples[:1], LIMIT, Sampling(temperature=1.0, top_p=0.95, seed=seed))[0].text

    assert draw_with(3) == draw_with(3)
    assert draw_with(3) != draw_with(4)
    assert draw_with(3) != gen.complete(samples[:1], LIMIT)[0].text  # not greedy in disguise


def test_generator_stream_adds_up_to_complete(gen, samples):
    assert gen.names == ["base"] and gen.context_length == 4096
    pieces = list(gen.stream(samples[1], LIMIT, variant="base"))
    assert len(pieces) > 1 and "".join(pieces) == gen.complete(samples[1:], LIMIT)[0].text


def test_chat_messages_read_like_the_messages_data_format(tmp_path, samples):
    image = samples[0].images[0]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "a red circle"},
                {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "now?"}]}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": messages}) + "\n")
    record = load_samples(tmp_path / "chat.jsonl")[0]
    verbatim = chat_sample(messages, image_newline=False)
    assert verbatim.images == record.images == [image]
    assert verbatim.turns == [*record.turns, Turn("assistant", "")]
    assert verbatim.turns[1].text == IMAGE + "What?" and verbatim.turns[3].text == "And now?"
    assert verbatim.prompt_turns() == record.turns
    # by default the question after an image starts on its own line, as `vlmtune chat` asks
    sample = chat_sample(messages)
    assert sample.images == [image] and sample.turns[1].text == IMAGE + "\nWhat?"
    assert [t.text for t in sample.turns[2:]] == ["a red circle", "And now?", ""]


def test_answers_never_contain_image_placeholders(gen, samples):
    """A model pushed towards the image placeholder and vision markers still never samples them:
    fed back to score the answer (GRPO), a stray placeholder breaks the forward pass."""
    model, encoder = gen.model, gen.variant().encoder
    config = model.config
    banned = [config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id]

    def favour_banned(module, inputs, logits):
        logits = logits.clone()
        logits[..., banned] += 1000.0
        return logits

    head = model.get_output_embeddings()
    hook = head.register_forward_hook(favour_banned)
    try:
        done = complete(model, encoder, samples, LIMIT, Sampling(temperature=1.0, seed=0))
    finally:
        hook.remove()
    for c in done:
        assert len(c.token_ids) == c.completion_tokens == LIMIT
        assert not set(c.token_ids) & set(banned)
    # the hook does reach the logits: without the ban the first banned id would win every step
    hook = head.register_forward_hook(favour_banned)
    try:
        prompt = encoder.encode_prompt(samples[0])
        out = model(**{k: v.unsqueeze(0) if k in TOKEN_KEYS else v for k, v in prompt.items()})
    finally:
        hook.remove()
    assert out.logits[0, -1].argmax().item() in banned
