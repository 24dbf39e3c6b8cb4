"""`LLM(DIR)` and `selfhost run DIR` / `selfhost perplexity DIR` on an exported folder run ONNX Runtime."""

import pytest

from selfhost import LLM, SamplingParams
from selfhost.engine.async_engine import AsyncEngine
from selfhost.errors import InvalidParameterError
from selfhost.hub import EMBEDDED_MODEL_DIR
from selfhost.onnx.engine import OnnxEngine

PROMPTS = ["ROMEO:", "JULIET:\nO"]


@pytest.fixture(scope="module")
def demo_pair(onnx_export):
    return LLM(str(onnx_export(EMBEDDED_MODEL_DIR))), LLM(device="cpu", weight_dtype=None, max_num_seqs=4)


def test_generate_matches_selfhost_with_stops_and_seeds(demo_pair):
    onnx_llm, native = demo_pair
    assert isinstance(onnx_llm.engine, OnnxEngine)
    for params in (SamplingParams(max_tokens=30, temperature=0.0, stop=["\n\n"]),
                   SamplingParams(max_tokens=25, temperature=0.8, top_p=0.9, seed=7)):
        ours = onnx_llm.generate(PROMPTS, params)
        theirs = native.generate(PROMPTS, params)
        assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]
        assert [o.text for o in ours] == [o.text for o in theirs]
        assert [o.finish_reason for o in ours] == [o.finish_reason for o in theirs]


def test_stream_and_chat(demo_pair):
    onnx_llm, native = demo_pair
    params = SamplingParams(max_tokens=20, temperature=0.0)
    assert "".join(onnx_llm.stream(PROMPTS[0], params)) == native.generate(PROMPTS[0], params)[0].text
    messages = [{"role": "user", "content": "Who art thou?"}]
    assert onnx_llm.chat(messages, params)[0].text == native.chat(messages, params)[0].text


def test_async_engine_drives_the_onnx_runner(demo_pair, onnx_export):
    import asyncio

    llm = LLM(str(onnx_export(EMBEDDED_MODEL_DIR)))
    engine = AsyncEngine(llm)
    params = SamplingParams(max_tokens=15, temperature=0.0)

    async def one(prompt, request_id):
        return "".join([delta.text async for delta in engine.generate(prompt, params, request_id)])

    async def both():
        return await asyncio.gather(*(one(p, f"r{i}") for i, p in enumerate(PROMPTS)))

    try:
        outputs = asyncio.run(both())
    finally:
        engine.shutdown()
    assert outputs == [o.text for o in demo_pair[1].generate(PROMPTS, params)]


def test_options_an_export_cannot_honour_are_refused(onnx_export):
    folder = str(onnx_export(EMBEDDED_MODEL_DIR))
    with pytest.raises(InvalidParameterError, match="precision was fixed at export"):
        LLM(folder, quantization="int8")
    llm = LLM(folder, max_model_len=64)
    assert llm.max_model_len == 64
    with pytest.raises(InvalidParameterError, match="prompt logprobs"):
        llm.generate("ROMEO:", SamplingParams(prompt_logprobs=1))
    with pytest.raises(InvalidParameterError, match="context window"):
        llm.generate([5] * 64, SamplingParams(max_tokens=2))


def test_cli_run_and_perplexity(onnx_export, demo_pair, tmp_path):
    import typer
    from typer.testing import CliRunner

    from selfhost.cli import quant, run

    app = typer.Typer()
    run.register(app)
    quant.register(app)
    folder = onnx_export(EMBEDDED_MODEL_DIR)
    result = CliRunner().invoke(app, ["run", str(folder), "ROMEO:", "--max-tokens", "12", "--temperature", "0"])
    assert result.exit_code == 0, result.output
    expected = demo_pair[1].generate("ROMEO:", SamplingParams(max_tokens=12, temperature=0))[0].text
    assert result.stdout == "ROMEO:" + expected + "\n"
    text = tmp_path / "text.txt"
    text.write_text("KING RICHARD III:\nNow is the winter of our discontent\nMade glorious summer by this sun of York.\n")
    result = CliRunner().invoke(app, ["perplexity", str(folder), "--text", str(text)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("perplexity ")
