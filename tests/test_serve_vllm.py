"""`vlmtune serve --engine vllm`: the vLLM command line built from real runs, the refusals, a clear
error where vLLM is absent, and (marked `gpu`) a real vLLM server answering through the openai client."""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import caption_records, clean_env, draw, free_port, write_json

from vlmtune import cli
from vlmtune.config import load_config
from vlmtune.errors import VlmtuneError
from vlmtune.generation import resolve_target
from vlmtune.serve.vllm_engine import vllm_args
from vlmtune.train import train

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_qwen2_vl) -> dict:
    root = tmp_path_factory.mktemp("vllm_runs")
    data = write_json(root / "train.json", caption_records(2, root, "t"))

    def run(name: str, *extra: str):
        return train(load_config(None, [
            f"model.name_or_path={tiny_qwen2_vl}", f"data.train={data}", f"train.output_dir={root / name}",
            "train.max_steps=1", "train.batch_size=2", "train.grad_accum=1", "train.save_steps=1000",
            "lora.r=4", "eval.num_samples=0", *extra]))

    return {"root": root, "latex": run("latex", "data.max_pixels=3136"), "coco": run("coco", "data.max_pixels=3136"),
            "plain": run("plain", "lora.r=24")}


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_command_line_of_a_run_and_an_adapter(runs, tmp_path):
    latex, coco = runs["latex"], runs["coco"]
    args = vllm_args(str(latex), {"coco": str(coco)}, host="127.0.0.1", port=8123, api_key="k", max_images=3,
                     allow_local_images=tmp_path, max_batch=8)
    base = resolve_target(str(latex)).config.model.name_or_path
    assert args[:2] == ["serve", base] and option(args, "--served-model-name") == "base"
    lora = args[args.index("--lora-modules") + 1:]
    assert lora[:2] == [f"latex={latex / 'final'}", f"coco={coco / 'final'}"]
    assert "--enable-lora" in args and option(args, "--max-lora-rank") == "8" and option(args, "--max-loras") == "2"
    assert json.loads(option(args, "--mm-processor-kwargs")) == {"max_pixels": 3136}  # the runs' pixel budget
    assert json.loads(option(args, "--limit-mm-per-prompt")) == {"image": 3}
    assert (option(args, "--host"), option(args, "--port"), option(args, "--api-key")) == ("127.0.0.1", "8123", "k")
    assert option(args, "--allowed-local-media-path") == str(tmp_path) and option(args, "--max-num-seqs") == "8"
    assert "--trust-remote-code" not in args


def test_what_vllm_cannot_do_the_runs_way_is_refused_or_said(runs, tiny_model_dir, capsys):
    with pytest.raises(VlmtuneError, match="one set of image settings per server"):
        vllm_args(str(runs["latex"]), {"plain": str(runs["plain"])})
    fixed = resolve_target(str(runs["plain"]))
    fixed.config.data.image_size = [60, 30]  # rounded to the 28-pixel grid: 56x28
    args = vllm_args(fixed, {})
    assert json.loads(option(args, "--mm-processor-kwargs")) == {"min_pixels": 56 * 28, "max_pixels": 56 * 28}
    assert "send images at 56x28" in capsys.readouterr().err
    with pytest.raises(VlmtuneError, match="--trust-remote-code"):
        vllm_args(str(tiny_model_dir("minicpmv2_6")), {})
    args = vllm_args(str(runs["plain"]), {})
    assert option(args, "--max-lora-rank") == "32"  # r=24 rounded up to a rank vLLM takes
    assert "--mm-processor-kwargs" not in args  # the checkpoint's own pixel budget


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_missing_vllm_is_a_clear_error(runs, capsys):
    assert cli.main(["serve", str(runs["latex"]), "--engine", "vllm", "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "needs vLLM, which is not installed" in err and "vlmtune[vllm]" in err


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (pip install 'vlmtune[vllm]') and a CUDA GPU")
def test_vllm_serves_the_run_and_its_adapter(runs):
    import openai

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "vlmtune.cli", "serve", str(runs["latex"]), "--engine", "vllm",
                               "--port", str(port), "--adapter", f"coco={runs['coco']}"], env=clean_env())
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert server.poll() is None, "vLLM exited before it served"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                time.sleep(2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        assert {m.id for m in client.models.list()} >= {"base", "latex", "coco"}
        image = draw(runs["root"] / "ask.png", "red", "circle")
        url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
        for model in ("base", "latex", "coco"):
            reply = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is in the image?"}]}])
            assert isinstance(reply.choices[0].message.content, str) and reply.usage.prompt_tokens > 0
    finally:
        server.terminate()
        server.wait(60)
