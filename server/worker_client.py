"""Front-end side of the worker: spawn or attach, route events per request, supervise.

API (used by server.servicer; everything runs on one asyncio loop):
    client = WorkerClient(model_path, backend="auto", socket_dir=None, attach=False, **worker_opts)
    await client.start()          # spawn `python -m gpu_worker.worker_main` (or attach) and wait for ready
    client.model_info: dict       # architecture, quant_types, context_length, vocab_size, weight_bytes,
                                  # kv_bytes, kv_block_size, kv_blocks_total, backend, device_name, ...
    async for ev in client.generate(request_id, prompt_ids, sampling, stopping):
        TokenEvent(token_id, logprobs) ... then exactly one FinishedEvent(reason, prompt_tokens,
        completion_tokens, queue_ns, ttft_ns, decode_ns); reason in eos | length | stop | cancelled.
        Raises WorkerUnavailable (worker down / died mid-stream, at once for all in-flight requests)
        or WorkerRequestError (the worker rejected the request, e.g. prompt longer than the KV cache).
        Closing the generator early (client cancel) aborts the request in the worker.
    await client.abort(request_id) -> bool      # False when not in flight; the stream then ends "cancelled"
    await client.stats() -> dict                # kv_blocks_total/used/free, running, waiting, steps, ...
    client.is_serving; client.on_state_change(callback(serving: bool)); client.restart_count
    await client.close()
Supervision: socket EOF (exit, crash, kill -9) or a heartbeat stalled for `heartbeat_timeout_s`
fails in-flight requests, removes the dead worker's /dev/shm segments, and restarts an owned worker
(SIGKILL first if hung); an attached client reconnects when the worker is back.
EOF_MARKER_UNUSED
"""
