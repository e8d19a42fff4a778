"""A fake `vllm serve` for what the CPU cannot do (sleep mode) and for fault injection.

Put tests/faults/fakevllm first on PYTHONPATH: mm then sees a GPU build of vLLM ("vllm" 99.0.0) and
runs this module exactly as it runs the real one (`python -m vllm.entrypoints.cli.main serve ...`).
Only the model is fake: processes, ports, signals and HTTP are real.

It answers OpenAI chat/completions (streaming or not; `n` choices when not streaming, with their
token_ids on return_token_ids, and a 400 for n > 1 at temperature 0 as vLLM; faults asked for in the
prompt, see injected_fault) with its own served name, keeps sleep state
like vLLM's dev-mode endpoints (level 2 drops the "weights": a plain /wake_up after it answers with
empty text, as real vLLM answers garbage, until /collective_rpc reload_weights; /sleep?mode=keep
pauses the requests in flight until /wake_up, as vLLM 0.26+ preempts them and resumes them after,
while the default mode, abort, ends them with an error), listens on TCP or a
unix socket (--uds), records every control call (GET /calls) and spawns an "engine" child process
like vLLM does. Answers carry `usage` (a stream's last chunk only when the request asks with
stream_options.include_usage, as in vLLM), and GET /metrics counts tokens and requests in vLLM's own
metric names and format (prometheus_client, as vLLM uses). Environment knobs:
  FAKE_TOKENS (default 8)        tokens per answer
  FAKE_TOKEN_DELAY (default 0)   seconds between streamed tokens
  FAKE_START_DELAY (default 0)   seconds before /health answers
  FAKE_START_PHASES (unset)      print vLLM's start lines (loading, KV cache, ...) over that time
  FAKE_EXIT_AT_START (unset)     exit with this code during start-up
  FAKE_HANG (unset)              never answer a request (a hung engine)
  FAKE_STOP_DELAY (0)            seconds the engine process takes to exit after SIGTERM
  FAKE_CONTROL_FAIL (unset)      /sleep and /wake_up answer 500
  FAKE_MAX_RUNNING (unset)       requests generating at once (vLLM's max_num_seqs): the rest wait, so
                                 throughput levels off past it, as a real server's does
  FAKE_GPU_DIR (unset)           report the engine's GPU memory to the fake cards (tests/faults/fakegpu), on
                                 each card CUDA_VISIBLE_DEVICES names (NVML's indices; card 0 without it):
                                 FAKE_GPU_AWAKE_MIB (51200) awake, FAKE_GPU_ASLEEP_MIB (1024) asleep; while the
                                 fake driver holds the engine checkpointed, /wake_up and requests answer 500
                                 (real vLLM would hang in its first CUDA call)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time


def engine_main() -> None:  # vLLM runs its engine core in a child process; so does the fake
    delay = float(os.environ.get("FAKE_STOP_DELAY", "0"))
    if delay:  # a slow shutdown: the engine takes its time to let go of the GPU
        import signal

        signal.signal(signal.SIGTERM, lambda *a: (time.sleep(delay), os._exit(0)))
    while True:
        time.sleep(3600)


class FakeCard:
    """The engine's GPU memory on the fake card (tests/faults/fakegpu), where FAKE_GPU_DIR is set."""

    def __init__(self, engine_pid: int):
        self.pid, self.on = engine_pid, bool(os.environ.get("FAKE_GPU_DIR"))
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.cards = tuple(int(c) for c in visible.split(",")) if visible else (0,)
        if self.on:
            import fake_gpu_state

            self.gpu = fake_gpu_state

    def hold(self, awake: bool) -> None:
        if self.on:
            mib = os.environ.get("FAKE_GPU_AWAKE_MIB" if awake else "FAKE_GPU_ASLEEP_MIB", "51200" if awake else "1024")
            self.gpu.hold(self.pid, int(mib) << 20, self.cards)

    def checkpointed(self) -> bool:
        return self.on and self.gpu.driver_state(self.pid) != "RUNNING"


def main() -> None:
    if sys.argv[1:3] == ["bench", "serve"]:  # `vllm bench serve`: vllm/benchmarks/serve.py (fake)
        from vllm.benchmarks.serve import main as bench_serve

        bench_serve(sys.argv[3:])
        return
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

    ap = make_arg_parser(argparse.ArgumentParser())
    ap.add_argument("cmd")
    ap.add_argument("model")
    args, _unknown = ap.parse_known_args()

    if os.environ.get("FAKE_EXIT_AT_START"):
        print("fake vllm: ValueError: No available memory for the cache blocks", flush=True)
        sys.exit(int(os.environ["FAKE_EXIT_AT_START"]))
    engine = multiprocessing.get_context("spawn").Process(target=engine_main, daemon=True)
    engine.start()
    print(f"fake vllm: engine pid {engine.pid}", flush=True)
    card = FakeCard(engine.pid)
    card.hold(awake=True)

    import uvicorn
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    names = args.served_model_name or [args.model]
    tokens = int(os.environ.get("FAKE_TOKENS", "8"))
    delay = float(os.environ.get("FAKE_TOKEN_DELAY", "0"))
    start_delay = float(os.environ.get("FAKE_START_DELAY", "0"))
    ready_at = time.monotonic() + start_delay
    if os.environ.get("FAKE_START_PHASES"):  # vLLM's own start lines, spread over the start
        import threading

        def phases() -> None:
            lines = ["Starting to load model fake...", "Loading weights took 0.50 seconds",
                     "Memory profiling takes 0.40 seconds", "GPU KV cache size: 131,072 tokens",
                     "Warming up sampler."]
            for line in lines:
                time.sleep(start_delay / (len(lines) + 1))
                print(f"(EngineCore pid={os.getpid()}) INFO fake: {line}", flush=True)
        threading.Thread(target=phases, daemon=True).start()
    state = {"sleeping": False, "weights": True, "calls": [], "level": 0, "aborts": 0, "in_flight": 0}
    registry, labels = CollectorRegistry(), {"engine": "0", "model_name": names[0]}
    prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                            list(labels), registry=registry).labels(**labels)
    generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                list(labels), registry=registry).labels(**labels)
    running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    list(labels), registry=registry).labels(**labels)
    ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                     list(labels), buckets=(0.001, 0.01, 0.1, 1.0), registry=registry).labels(**labels)
    sleep_state = Gauge("vllm:engine_sleep_state", "Engine sleep state", [*labels, "sleep_state"],
                        registry=registry)
    hang = bool(os.environ.get("FAKE_HANG"))
    max_running = int(os.environ.get("FAKE_MAX_RUNNING") or 0)
    gate = asyncio.Semaphore(max_running) if max_running else None
    control_fail = bool(os.environ.get("FAKE_CONTROL_FAIL"))
    api_key = (args.api_key or [os.environ.get("VLLM_API_KEY")])[0]

    def record(what: str) -> None:
        state["calls"].append({"call": what, "t": time.time()})

    async def busy(request: Request | None, seconds: float) -> bool:
        """Work for `seconds` of awake time (a request paused by a sleep in keep mode waits for the
        wake-up); False (and an "aborted" record) when the client leaves first, as vLLM aborts a
        request whose connection dropped, or when a sleep in abort mode ends it."""
        left, aborts = seconds, state["aborts"]
        while left > 0:
            if request is not None and await request.is_disconnected():
                record("aborted")
                return False
            if state["aborts"] != aborts:
                return False
            step = min(0.01, left)
            await asyncio.sleep(step)
            if not state["sleeping"]:
                left -= step
        return True

    async def health(request: Request):
        if time.monotonic() < ready_at:
            return JSONResponse({}, status_code=503)
        return JSONResponse({})

    async def sleep(request: Request):
        if not args.enable_sleep_mode:
            return JSONResponse({"error": "sleep mode is not enabled"}, status_code=400)
        if control_fail:
            return JSONResponse({"error": "engine is gone"}, status_code=500)
        level = int(request.query_params.get("level", "1"))
        mode = request.query_params.get("mode", "abort")
        if card.checkpointed():
            return JSONResponse({"error": "CUDA call while the process is checkpointed"}, status_code=500)
        record(f"sleep:{level}" + (":keep" if mode == "keep" else ""))
        if mode != "keep" and state["in_flight"]:  # vLLM aborts what is running
            state["aborts"] += 1
            record(f"aborted-by-sleep:{state['in_flight']}")
        print(f"INFO fake vllm: sleep level {level}: weights offloaded", flush=True)
        state["sleeping"], state["level"] = True, level
        card.hold(awake=False)
        if level == 2:
            state["weights"] = False  # level 2 discards the weights
        return JSONResponse({})

    async def wake_up(request: Request):
        if control_fail:
            return JSONResponse({"error": "engine is gone"}, status_code=500)
        tags = request.query_params.getlist("tags")
        if card.checkpointed():
            record("wake_up-while-checkpointed")
            return JSONResponse({"error": "CUDA call while the process is checkpointed"}, status_code=500)
        record("wake_up" + (f":{','.join(tags)}" if tags else ""))
        print("INFO fake vllm: woke up", flush=True)
        if not tags or "kv_cache" in tags:
            state["sleeping"] = False
            card.hold(awake=True)
        return JSONResponse({})

    async def collective_rpc(request: Request):
        body = await request.json()
        record(f"rpc:{body.get('method')}")
        if body.get("method") == "reload_weights":
            state["weights"] = True
        return JSONResponse({"results": [None]})

    async def is_sleeping(request: Request):
        return JSONResponse({"is_sleeping": state["sleeping"]})

    async def calls(request: Request):
        return JSONResponse(state["calls"])

    async def last_body(request: Request):  # what mm sent on (e.g. stream_options it added)
        return JSONResponse(state.get("last_body"))

    async def argv(request: Request):
        return JSONResponse({"argv": sys.argv, "engine_pid": engine.pid,
                             "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})

    async def metrics(request: Request):
        for name in ("awake", "weights_offloaded"):
            sleep_state.labels(**labels, sleep_state=name).set(int(state["sleeping"] == (name != "awake")))
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": n, "object": "model"} for n in names]})

    seen_faults: dict[str, int] = {}

    def injected_fault(body: dict) -> JSONResponse | None:
        """A fault asked for in the prompt: "[fake:fail-twice]" answers 503 the first two times that
        prompt comes, "[fake:fail-always]" 500 every time, "[fake:bad-request]" 400 (mm batch's retries)."""
        text = json.dumps(body.get("messages", body.get("prompt", "")))
        if "[fake:" not in text:
            return None
        seen = seen_faults[text] = seen_faults.get(text, 0) + 1
        if "[fake:fail-twice]" in text and seen <= 2:
            return JSONResponse({"error": {"message": "fake: overloaded"}}, status_code=503)
        if "[fake:fail-always]" in text:
            return JSONResponse({"error": {"message": "fake: engine error"}}, status_code=500)
        if "[fake:bad-request]" in text:
            return JSONResponse({"error": {"message": "fake: bad request"}}, status_code=400)
        return None

    async def chat(request: Request):
        body = await request.json()
        model = body.get("model") or names[0]
        if model not in names:
            return JSONResponse({"error": {"message": f"model {model} not served here"}}, status_code=404)
        if state["sleeping"]:  # a request reaching a sleeping server is a scheduling bug in mm
            record("request-while-asleep")
            return JSONResponse({"error": {"message": "server is sleeping"}}, status_code=500)
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": {"message": "Unauthorized"}}, status_code=401)
        record("request")
        if hang and not await busy(request, 3600):
            return JSONResponse({}, status_code=499)
        n = min(int(body.get("max_tokens") or tokens), tokens)
        word = "tok" if state["weights"] else ""  # after a level-2 wake without a reload: empty text
        state["last_body"] = body
        n_in = len(json.dumps(body.get("messages", body.get("prompt", ""))).split())  # one token a word
        usage = {"prompt_tokens": n_in, "completion_tokens": n, "total_tokens": n_in + n}
        prompt_tokens.inc(n_in)
        generation_tokens.inc(n)
        print(f"INFO fake vllm: {request.url.path} {n_in} prompt + {n} generated tokens"
              f"{' (stream)' if body.get('stream') else ''}", flush=True)
        ttft.observe(delay)
        if not body.get("stream"):
            fault = injected_fault(body)
            if fault:
                return fault
            choices = int(body.get("n") or 1)  # parallel sampling: n answers to one prompt
            if choices > 1 and body.get("temperature") == 0:
                return JSONResponse({"error": {"message": f"n must be 1 when using greedy sampling, got {choices}."}},
                                    status_code=400)
            state["in_flight"] += 1
            held = False
            try:
                if gate:
                    await gate.acquire()
                    held = True
                if delay and not await busy(request, delay * n):
                    return JSONResponse({"error": {"message": "aborted"}}, status_code=500)
            finally:
                state["in_flight"] -= 1
                if held:
                    gate.release()
            usage = {**usage, "completion_tokens": n * choices, "total_tokens": n_in + n * choices}
            return JSONResponse({"id": "fake", "object": "chat.completion", "model": names[0], "choices": [
                {"index": i, "message": {"role": "assistant", "content": " ".join([word] * n).strip()},
                 "finish_reason": "length", **({"token_ids": list(range(n))} if body.get("return_token_ids") else {})}
                for i in range(choices)], "usage": usage})

        async def events():
            running.inc()
            state["in_flight"] += 1
            held = False
            try:
                if gate:
                    await gate.acquire()
                    held = True
                for i in range(n):
                    if delay and not await busy(None, delay):  # (a stream's client leaving ends it anyway)
                        return  # aborted: the stream ends without [DONE]
                    chunk = {"id": "fake", "object": "chat.completion.chunk", "model": names[0],
                             "choices": [{"index": 0, "delta": {"content": f"{word}{i} " if word else ""},
                                          "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield f"data: {json.dumps({'id': 'fake', 'object': 'chat.completion.chunk', 'model': names[0], 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                running.dec()
                state["in_flight"] -= 1
                if held:
                    gate.release()
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[
        Route("/health", health), Route("/sleep", sleep, methods=["POST"]),
        Route("/wake_up", wake_up, methods=["POST"]), Route("/is_sleeping", is_sleeping),
        Route("/collective_rpc", collective_rpc, methods=["POST"]),
        Route("/calls", calls), Route("/argv", argv), Route("/v1/models", models), Route("/metrics", metrics),
        Route("/last_body", last_body),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", chat, methods=["POST"]),
    ])
    where = {"uds": args.uds} if args.uds else {"host": args.host or "127.0.0.1", "port": args.port}
    uvicorn.run(app, **where, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
