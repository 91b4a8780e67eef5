"""The batch worker against a real vLLM engine: complete jobs, stops of every kind, resume."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from redis.asyncio import Redis

from tests.engine.conftest import Job, chat_line, make_job, until
from troughfill.ledger import StopMode
from troughfill.results import finalize
from troughfill.storage import ObjectStore
from troughfill_dev.localcluster import RedisServer, VllmServer, free_port, vllm_command


def exactly_once(job: Job, count: int) -> list[dict[str, object]]:
    outputs = job.outputs()
    ids = [str(o["custom_id"]) for o in outputs]
    assert len(ids) == len(set(ids)), "a result was written twice"
    assert sorted(ids) == sorted(f"q{i}" for i in range(count)), "a result is missing"
    return outputs


async def finish_with_fresh_worker(job: Job, name: str = "rescuer") -> int:
    rescuer = job.worker(name, "--burst")
    code = await asyncio.to_thread(rescuer.wait, 300)
    assert code == 0, job.log(name)
    await finalize(job.ledger, ObjectStore())
    return code


async def test_a_200_request_job_completes_with_every_custom_id_once(
    aredis: Redis, redis_server: RedisServer, vllm_engine: VllmServer, tmp_path: Path
) -> None:
    job = await make_job(
        aredis, redis_server, vllm_engine, tmp_path, [chat_line(f"q{i}", 16) for i in range(200)]
    )
    worker = job.worker("w1", "--burst")
    assert await asyncio.to_thread(worker.wait, 300) == 0, job.log("w1")
    progress = await job.ledger.progress()
    assert (progress.completed, progress.failed) == (200, 0)
    assert progress.completion_tokens == 200 * 16  # ignore_eos: every request generates its budget
    await finalize(job.ledger, ObjectStore())
    outputs = exactly_once(job, 200)
    body = outputs[0]["response"]["body"]  # type: ignore[index]
    assert body["object"] == "chat.completion"
    assert body["model"] == "tiny"  # the template's model, not what the user wrote
    assert body["usage"]["completion_tokens"] == 16
    assert body["choices"][0]["message"]["content"]
    assert await job.ledger.last_heartbeat("w1") is None  # a clean exit takes its heartbeat along


async def stop_mid_job(
    job: Job, name: str, sig: int, *extra: str, mid_generation: bool = False
) -> tuple[int, float, int]:
    """Start a worker, wait until it is well into the job, signal it: (exit code, seconds to exit, done).

    With `mid_generation`, wait for partial-output checkpoints instead, so that requests are
    caught half-written (requests of equal length otherwise start and end in waves).
    """
    worker = job.worker(name, *extra)

    async def under_way() -> bool:
        if mid_generation:
            return bool(await job.ledger.client.hlen(job.ledger.keys.key("partial")) >= 5)
        return (await job.ledger.progress()).completed >= 40

    await until(under_way, "the worker getting going")
    signalled = time.monotonic()
    worker.send_signal(sig)
    code = await asyncio.to_thread(worker.wait, 60)
    return code, time.monotonic() - signalled, (await job.ledger.progress()).completed


async def test_drain_finishes_in_flight_requests_then_a_new_worker_finishes_the_job(
    aredis: Redis, redis_server: RedisServer, vllm_engine: VllmServer, tmp_path: Path
) -> None:
    job = await make_job(
        aredis, redis_server, vllm_engine, tmp_path, [chat_line(f"q{i}", 64) for i in range(300)]
    )
    code, _, done = await stop_mid_job(job, "drainer", signal.SIGTERM, "--on-sigterm", "drain")
    assert code == 0, job.log("drainer")
    progress = await job.ledger.progress()
    assert progress.leases == 0  # everything it held is committed or given back
    assert progress.wasted_tokens == 0  # nothing it started was thrown away
    assert await job.ledger.load_partials(list(range(300))) == {}
    assert done < 300
    await finish_with_fresh_worker(job)
    exactly_once(job, 300)


async def test_yield_gives_everything_back_within_two_seconds_and_work_resumes_elsewhere(
    aredis: Redis, redis_server: RedisServer, vllm_engine: VllmServer, tmp_path: Path
) -> None:
    job = await make_job(
        aredis, redis_server, vllm_engine, tmp_path, [chat_line(f"q{i}", 900) for i in range(60)]
    )
    code, seconds, done = await stop_mid_job(
        job, "yielder", signal.SIGTERM, "--on-sigterm", "yield", mid_generation=True
    )
    assert code == 0, job.log("yielder")
    assert seconds <= 2.0, f"yield took {seconds:.2f}s"
    progress = await job.ledger.progress()
    assert progress.leases == 0
    partials = await job.ledger.load_partials(list(range(60)))
    assert partials, "in-flight requests left no partial output"
    assert progress.failed_attempts == 0  # yielding is not the requests' fault
    await finish_with_fresh_worker(job)
    outputs = exactly_once(job, 60)
    assert "resumed" in job.log("rescuer")
    resumed = [o for o in outputs if int(str(o["id"]).rsplit("_", 1)[1]) in partials]
    assert resumed
    assert (await job.ledger.progress()).resumed == len(resumed)  # counted for the job's status
    for output in resumed:
        index = int(str(output["id"]).rsplit("_", 1)[1])
        body = output["response"]["body"]  # type: ignore[index]
        assert body["usage"]["completion_tokens"] == 900, (
            "the resumed request overran or fell short of its budget"
        )
        assert body["choices"][0]["message"]["content"].startswith(partials[index].text)
    assert await job.ledger.load_partials(list(range(60))) == {}  # dropped once committed
    print(f"\nyield took {seconds:.2f}s; {done} done before it; {len(partials)} requests resumed")


async def test_operator_can_pick_the_stop_mode_per_worker(
    aredis: Redis, redis_server: RedisServer, vllm_engine: VllmServer, tmp_path: Path
) -> None:
    job = await make_job(
        aredis, redis_server, vllm_engine, tmp_path, [chat_line(f"q{i}", 900) for i in range(40)]
    )
    await job.ledger.request_stop("told-to-yield", StopMode.YIELD)
    code, seconds, _ = await stop_mid_job(
        job, "told-to-yield", signal.SIGTERM, "--on-sigterm", "drain", mid_generation=True
    )
    assert code == 0
    assert seconds <= 2.0
    assert await job.ledger.load_partials(list(range(40)))  # it yielded, despite its drain default
    await finish_with_fresh_worker(job)
    exactly_once(job, 40)


async def test_a_killed_worker_s_requests_come_back_through_lease_expiry(
    aredis: Redis, redis_server: RedisServer, vllm_engine: VllmServer, tmp_path: Path
) -> None:
    # Long requests, killed once some are half-written: the victim cannot have finished the job
    # (or committed everything it held) before the signal lands, however late the poll sees it.
    lines = [chat_line(f"q{i}", 400) for i in range(100)]
    job = await make_job(aredis, redis_server, vllm_engine, tmp_path, lines, lease_seconds=3.0)
    code, _, done = await stop_mid_job(job, "victim", signal.SIGKILL, mid_generation=True)
    assert code == -signal.SIGKILL
    assert done < 100
    assert (await job.ledger.progress()).leases > 0  # it died holding work
    started = time.monotonic()
    await finish_with_fresh_worker(job)
    exactly_once(job, 100)
    progress = await job.ledger.progress()
    assert progress.failed_attempts == 0  # a dead worker is no request's failed attempt
    print(f"\nkilled after {done} results; the rest finished {time.monotonic() - started:.1f}s later")


async def test_a_resumed_request_gets_only_the_rest_of_its_token_budget(
    aredis: Redis, redis_server: RedisServer, vllm_engine: VllmServer, tmp_path: Path
) -> None:
    job = await make_job(
        aredis, redis_server, vllm_engine, tmp_path, [chat_line(f"q{i}", 40) for i in range(3)]
    )
    await job.ledger.save_partial(0, "billing billing", 10, prompt_tokens=7)
    await job.ledger.save_partial(1, "all of it", 40, prompt_tokens=7)  # the budget was already spent
    await finish_with_fresh_worker(job)
    outputs = {o["custom_id"]: o["response"]["body"] for o in exactly_once(job, 3)}  # type: ignore[index]
    resumed, spent, fresh = outputs["q0"], outputs["q1"], outputs["q2"]
    assert resumed["usage"]["completion_tokens"] == 40
    assert resumed["usage"]["prompt_tokens"] == 7  # the original prompt, not the prompt + partial
    assert resumed["choices"][0]["message"]["content"].startswith("billing billing")
    assert len(resumed["choices"][0]["message"]["content"]) > len("billing billing")
    assert spent["choices"][0]["message"]["content"] == "all of it"
    assert spent["usage"]["completion_tokens"] == 40
    assert fresh["usage"]["completion_tokens"] == 40
    progress = await job.ledger.progress()
    # Usage counts what was generated: 30 new tokens for q0, none for q1, 40 for q2 — plus what was saved.
    assert progress.completion_tokens == 40 * 3


def tokens_in(engine: VllmServer, text: str) -> int:
    request = urllib.request.Request(
        f"{engine.url}/tokenize",
        data=json.dumps({"model": engine.served_model, "prompt": text, "add_special_tokens": False}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        return int(json.load(reply)["count"])


def text_of(engine: VllmServer, tokens: int) -> str:
    """Text that tokenizes to about `tokens` tokens (a little more)."""
    unit = "billing refund 17 "
    count = int(tokens / (tokens_in(engine, unit * 50) / 50))
    while tokens_in(engine, unit * count) < tokens:
        count += 1
    return unit * count


async def test_a_partial_output_that_tokenizes_longer_than_it_was_generated_is_redone_from_the_start(
    aredis: Redis, redis_server: RedisServer, vllm_engine: VllmServer, tmp_path: Path
) -> None:
    """Saved text goes back to the engine as text, and text can tokenize to more tokens than
    were generated (a random model's output does, threefold): the context then has no room for
    the rest of the budget. Such a continuation is not the answer; the request starts over."""
    job = await make_job(
        aredis, redis_server, vllm_engine, tmp_path, [chat_line(f"q{i}", 40) for i in range(3)]
    )
    past_context = text_of(vllm_engine, 1100)  # prompt + this > 1024: the engine refuses it
    near_context = text_of(vllm_engine, 1000)  # fits, with room for fewer than 30 more tokens
    await job.ledger.save_partial(0, past_context, 10, prompt_tokens=7)
    await job.ledger.save_partial(1, near_context, 10, prompt_tokens=7)
    await job.ledger.save_partial(2, "billing", 10, prompt_tokens=7)  # continued as usual
    await finish_with_fresh_worker(job)
    outputs = {o["custom_id"]: o["response"]["body"] for o in exactly_once(job, 3)}  # type: ignore[index]
    for custom_id in ("q0", "q1"):
        body = outputs[custom_id]
        assert body["usage"]["completion_tokens"] == 40, body["usage"]
        assert not body["choices"][0]["message"]["content"].startswith("billing refund 17 billing"), custom_id
    assert outputs["q2"]["choices"][0]["message"]["content"].startswith("billing")
    assert outputs["q2"]["usage"]["completion_tokens"] == 40
    progress = await job.ledger.progress()
    assert (progress.failed, progress.failed_attempts) == (0, 0)
    assert await job.ledger.load_partials([0, 1, 2]) == {}
    assert job.log("rescuer").count("redoing it from the start") == 2, job.log("rescuer")


async def test_an_engine_crash_makes_the_worker_fail_without_marking_in_flight_work_done(
    aredis: Redis,
    redis_server: RedisServer,
    vllm_engine: VllmServer,
    engine_paths: tuple[str, str],
    tmp_path: Path,
) -> None:
    job = await make_job(
        aredis, redis_server, vllm_engine, tmp_path, [chat_line(f"q{i}", 64) for i in range(300)]
    )
    python, model = engine_paths
    port = free_port()
    engine = vllm_command(python, model, port)
    worker = job.worker(
        "owner",
        "--engine-port",
        str(port),
        "--engine-log",
        str(tmp_path / "engine.log"),
        "--",
        *engine,
        attach=False,
    )

    async def working() -> bool:
        return (await job.ledger.progress()).completed >= 20

    await until(working, "the worker's own engine starting and serving", within=300)
    beat = await job.ledger.last_heartbeat("owner")
    assert beat is not None
    assert beat.engine_pid
    os.killpg(int(beat.engine_pid), signal.SIGKILL)
    code = await asyncio.to_thread(worker.wait, 60)
    assert code == 3, job.log("owner")
    progress = await job.ledger.progress()
    assert progress.completed < 300
    assert progress.leases == 0  # in-flight work handed back at once, not left to expire
    await finish_with_fresh_worker(job)
    exactly_once(job, 300)


async def test_worker_check_is_a_probe(
    aredis: Redis, redis_server: RedisServer, vllm_engine: VllmServer, tmp_path: Path
) -> None:
    job = await make_job(
        aredis, redis_server, vllm_engine, tmp_path, [chat_line(f"q{i}", 64) for i in range(100)]
    )

    def check() -> int:
        env = {**os.environ, "TROUGHFILL_REDIS_URL": job.redis_url}
        args = [
            sys.executable,
            "-m",
            "troughfill.cli",
            "worker",
            "check",
            "--job",
            job.spec,
            "--worker-id",
            "probed",
        ]
        return subprocess.run(args, env=env, capture_output=True, check=False, timeout=60).returncode

    assert await asyncio.to_thread(check) == 1  # no such worker yet
    worker = job.worker("probed")  # no --burst: it idles when the job is done

    async def beating() -> bool:
        return await job.ledger.last_heartbeat("probed") is not None

    await until(beating, "a first heartbeat")
    assert await asyncio.to_thread(check) == 0
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 60) == 0
    assert await asyncio.to_thread(check) == 1


async def test_a_worker_stopped_while_its_engine_loads_exits_at_once(
    aredis: Redis, redis_server: RedisServer, vllm_engine: VllmServer, tmp_path: Path
) -> None:
    """A worker the operator stops before its engine is up (the trough closed during the
    cold start) holds GPUs for nothing: it stops the engine and exits, without waiting."""
    job = await make_job(aredis, redis_server, vllm_engine, tmp_path, [chat_line("q0", 8)])
    loading = tmp_path / "engine-started"
    engine = [
        sys.executable,
        "-c",
        f"import pathlib, time; pathlib.Path({str(loading)!r}).touch(); time.sleep(300)",
    ]
    worker = job.worker("starter", "--engine-port", str(free_port()), "--", *engine, attach=False)

    async def engine_started() -> bool:
        return loading.exists()

    await until(engine_started, "the engine command running", within=30)
    await asyncio.sleep(0.5)
    stopped = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.wait, 30)
    seconds = time.monotonic() - stopped
    assert code == 0, job.log("starter")
    assert seconds < 3.0, f"took {seconds:.2f}s"
    assert "stopped before the engine was ready" in job.log("starter")
    assert (await job.ledger.progress()).leases == 0
