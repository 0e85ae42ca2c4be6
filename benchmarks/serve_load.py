"""``llama-attrib serve`` under load: N concurrent clients, attribution on and off, in one run.

    python benchmarks/serve_load.py [--clients 1,4,16] [--new 16] [--json FILE]

Starts the server on SmolLM2-135M-Instruct (a process of its own, a queue long enough for every
client), serves each prompt once alone (the reference), then for each N sends N chat requests at
once from N threads, with attribution on (the default, exact rules) and off. Reports, per row,
the wall time, the mean and largest latency, the generated tokens per second, how many
responses were lost (not 200) and whether every response equals the same request served
alone (text and every attribution number). The last row is the same request's cost in this
process: ``llama_attrib.attribute`` (generation and decomposition) per generated token, which
the server's throughput with attribution is compared with.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from results import save  # benchmarks/results.py, beside this script

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Why is the sky blue?",
    "What is two plus two?",
]


def post(url: str, body: dict[str, Any]) -> tuple[int, Any, float]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=3600) as reply:
            return reply.status, json.loads(reply.read()), time.perf_counter() - start
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.perf_counter() - start


def start_server(clients: int) -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).parent / "llama-attrib"), "serve", "--port", str(port)]
    command += ["--max-queue", str(clients)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not start")


def at_once(url: str, bodies: list[dict[str, Any]]) -> tuple[list[tuple[int, Any, float]], float]:
    """Each body sent from a thread of its own, all at once: the replies in order, the wall time."""
    replies: list[Any] = [None] * len(bodies)

    def client(i: int) -> None:
        replies[i] = post(url + "/v1/chat/completions", bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--new", type=int, default=16, help="max_tokens of every request")
    parser.add_argument("--json", help="also save the records, with date, commit, machine and command, here")
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    process, url = start_server(max(counts))
    records: list[dict[str, Any]] = []
    try:
        with urllib.request.urlopen(url + "/v1/models") as reply:
            name = json.loads(reply.read())["data"][0]["id"]

        def body(i: int, attribution: bool) -> dict[str, Any]:
            messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
            return {"model": name, "messages": messages, "max_tokens": args.new, "attribution": attribution}

        alone = {
            (i, on): post(url + "/v1/chat/completions", body(i, on))[1]
            for i in range(len(QUESTIONS))
            for on in (True, False)
        }
        print("| clients | attribution | wall | mean latency | largest | tokens / s | lost | equal alone |")
        print("|---|---|---|---|---|---|---|---|")
        for on in (True, False):
            for n in counts:
                replies, wall = at_once(url, [body(i, on) for i in range(n)])
                ok = [(i, r, sec) for i, (status, r, sec) in enumerate(replies) if status == 200]
                tokens = sum(r["usage"]["completion_tokens"] for _, r, _ in ok)
                equal = all(r["choices"] == alone[i % len(QUESTIONS), on]["choices"] for i, r, _ in ok)
                latencies = [s for _, _, s in ok]
                row = {
                    "clients": n,
                    "attribution": on,
                    "wall": wall,
                    "latency_mean": sum(latencies) / max(len(latencies), 1),
                    "latency_max": max(latencies, default=0.0),
                    "tokens": tokens,
                    "lost": n - len(ok),
                    "equal_alone": equal,
                }
                records.append(row)
                print(
                    f"| {n} | {'on' if on else 'off'} | {wall:.1f} s | {row['latency_mean']:.1f} s | "
                    f"{row['latency_max']:.1f} s | {tokens / wall:.2f} | {row['lost']} | {equal} |",
                    flush=True,
                )
    finally:
        process.terminate()
        process.wait(timeout=60)

    import llama_attrib
    from llama_attrib.models import load

    model, tokenizer = load()
    seconds, tokens = 0.0, 0
    for i in range(len(QUESTIONS)):
        messages = [{"role": "user", "content": QUESTIONS[i]}]
        llama_attrib.attribute(model, tokenizer, messages, max_new_tokens=args.new, chat=True)  # warm
        start = time.perf_counter()
        result = llama_attrib.attribute(model, tokenizer, messages, max_new_tokens=args.new, chat=True)
        seconds += time.perf_counter() - start
        tokens += result.n_generated
    records.append({"in_process": True, "seconds": seconds, "tokens": tokens})
    print(f"\nin this process, attribute(): {tokens / seconds:.2f} generated tokens / s")
    if args.json:
        save(args.json, records, new=args.new)


if __name__ == "__main__":
    main()
