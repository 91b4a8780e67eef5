"""The window benchmark's short run, in the test command: the example requests (and the same
with long prompts) on the real engine, once uninterrupted and once yielded every second until
done, with and without the worker's time-to-result bound; every request ends exactly once."""

from pathlib import Path

from troughfill_dev.bench import window
from troughfill_dev.localcluster import RedisServer, VllmServer

REQUESTS = 24


async def test_short_windows_end_the_job_exactly_once_and_report_their_rates(
    vllm_engine: VllmServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    result = await window.run(
        window.Engine(vllm_engine.url, vllm_engine.served_model),
        redis_server.url,
        tmp_path,
        mixes=["example", "long-prompts"],
        windows=[1.0],
        targets=[10.0, 0.0],
        limit=REQUESTS,
        repeat=1,
        document_repeats=1,  # the tiny model's tokenizer makes many more tokens of it; 1,024 fit
    )
    for mix in ("example", "long-prompts"):
        assert result[mix]["requests"] == REQUESTS
        for target in ("10", "0"):
            side = result[mix]["result_seconds"][target]
            whole, short = side["uninterrupted"], side["windowed"]["1"]
            assert whole["windows"] == 1
            assert whole["results"] == short["results"] == REQUESTS  # run_job raises on any failure
            assert short["windows"] >= 2, "a one-second window should not hold the whole job"
            assert short["windows"] == len(short["results_per_window"]) == len(short["first_result_s"])
            assert sum(short["results_per_window"]) == REQUESTS
            assert whole["results_per_ready_s"] > 0
            assert short["results_ratio"] > 0
            assert short["ready_seconds"] > 0
            assert whole["engine_prompt_tokens"] > 0
            assert whole["engine_generated_tokens"] >= whole["completion_tokens"] > 0
    # the long prompts cost the engine more prompt tokens than the example's own
    example = result["example"]["result_seconds"]["10"]["uninterrupted"]["engine_prompt_tokens"]
    long = result["long-prompts"]["result_seconds"]["10"]["uninterrupted"]["engine_prompt_tokens"]
    assert long > 2 * example
