"""`prefixtune serve` as a user runs it: prints URL and adapters, serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai


def _read_banner(proc: subprocess.Popen, timeout: float = 90.0) -> list[str]:
    lines: list[str] = []
    found = threading.Event()

    def reader():
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("  auth:"):
                found.set()
        found.set()  # EOF: the process died

    threading.Thread(target=reader, daemon=True).start()
    found.wait(timeout)
    return lines


def test_serve_command_prints_url_serves_and_stops_on_sigterm(tiny_model_dir, serve_store):
    env = {**os.environ, "PREFIXTUNE_API_KEY": "env-key", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "prefixtune", "serve", "--model", str(tiny_model_dir), "--store", str(serve_store),
           "--port", "0", "--max-batch", "4", "--shutdown-timeout", "3", "--served-model-name", "tiny"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = _read_banner(proc)
        url_line = next((line for line in lines if line.startswith("prefixtune serve: http://127.0.0.1:")), None)
        assert url_line, f"no URL printed: {lines} {proc.poll() is not None and proc.stderr.read()}"
        url = url_line.split(": ", 1)[1]
        assert any("adapters (2): alpha, beta" in line for line in lines), lines
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=10).status_code == 200
        assert httpx.get(url + "/models", timeout=10).status_code == 401  # PREFIXTUNE_API_KEY alone turns auth on
        client = openai.OpenAI(base_url=url, api_key="env-key", max_retries=0, timeout=30)
        assert client.completions.create(model="alpha", prompt="Hi", max_tokens=3, temperature=0).usage.completion_tokens

        # SIGTERM with a stream in flight: the server lets it finish or cancels it, then exits by itself.
        stream = client.completions.create(model="beta", prompt="Go", max_tokens=200, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        proc.send_signal(signal.SIGTERM)
        start = time.monotonic()
        for _ in stream:  # ends when the server finishes or closes it; must not hang
            pass
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)



def test_serve_ray_flags_are_checked_before_anything_starts(tmp_path):
    from typer.testing import CliRunner

    from prefixtune.cli import app

    cases = [
        (["--replicas", "2"], "--replicas needs --backend ray"),
        (["--max-adapters-per-replica", "2"], "needs --backend ray"),
        (["--backend", "ray", "--address", "head:6379"], "ray://HEAD:10001"),
        (["--backend", "ray", "--replicas", "3", "--max-replicas", "2"], "2 < --replicas 3"),
        (["--backend", "ray", "--adapter-root", str(tmp_path)], "put them in the store"),
        (["--backend", "ray", "--pin", "../x"], "--pin"),
        (["--backend", "k8s"], "choose local or ray"),
    ]
    for flags, message in cases:
        result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "no-model"), *flags])
        assert result.exit_code == 2, (flags, result.output)
        assert message in " ".join(result.output.split()).replace("│", "").replace("  ", " "), (flags, result.output)
