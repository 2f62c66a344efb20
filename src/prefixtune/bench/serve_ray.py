"""`prefixtune bench serve --ray`: the same HTTP load against 1 and 2 Ray Serve replicas on this machine.

Both applications run side by side on one local Ray cluster (one Serve HTTP port, two route prefixes), beside
a plain `prefixtune serve` process; the runs alternate, best of each, so the ratios 2 replicas / 1 replica
and 1 replica / plain server (what Serve's extra hops cost) are measured under the same conditions.
On one machine the replicas share its cores: the ratio shows what the second replica (and Serve's extra hop)
costs or gains here, not what a second GPU would.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prefixtune.bench.serve_http import ServerProcess, _bodies, _tiny_model_dir, best, load
from prefixtune.bench.serve_speed import write_random_adapters


def run_ray_bench(model: str = "smollm2-135m", tiny: bool = False, concurrencies: tuple[int, ...] = (8, 32),
                  requests: int = 32, max_tokens: int = 16, repeats: int = 2, say=print) -> dict:
    from prefixtune.models import load_base_model
    from prefixtune.server.app import ServerSettings
    from prefixtune.server.ray_backend import RayOptions, board_name, connect, deploy, free_port, undeploy
    from prefixtune.server.ray_replica import ReplicaConfig

    scratch = Path(tempfile.mkdtemp(prefix="prefixtune-bench-ray-"))
    apps = {1: RayOptions(replicas=1, app_name="bench-1", route_prefix="/one"),
            2: RayOptions(replicas=2, app_name="bench-2", route_prefix="/two")}
    cores = len(os.sched_getaffinity(0))
    for opts in apps.values():  # three replicas on this machine's cores: reserve a fraction each
        opts.replica_cpus, opts.local_cpus = round(cores / 4, 2), cores
    try:
        model = _tiny_model_dir(scratch) if tiny else model
        names = write_random_adapters(load_base_model(model), scratch / "store", 6, tokens=10)
        connect(apps[1])
        settings = ServerSettings(model_name="base", port=free_port("127.0.0.1"))
        urls = {}
        for n, opts in apps.items():
            cfg = ReplicaConfig(model=model, store=str(scratch / "store"), board=board_name(opts),
                                max_batch=max(concurrencies), max_queue=1024, max_adapters=6)
            urls[n] = deploy(cfg, settings, opts).removesuffix("/v1")
            say(f"{n} replica(s): {urls[n]}")
        flags = ("--max-batch", str(max(concurrencies)), "--max-queue", "1024", "--served-model-name", "base")
        with ServerProcess(model, scratch / "store", *flags) as plain:
            urls["plain"] = plain.url
            for url in urls.values():
                load(url, "warm-up", _bodies(names, 12, 2), 12)
            report = _alternate(urls, names, concurrencies, requests, max_tokens, repeats, say)
        say(f"2 replicas / 1 replica, tokens/s: {report['2 / 1 replicas']}; 1 replica / plain server: "
            f"{report['1 replica / plain']} ({cores} cores shared by all)")
        for opts in apps.values():
            undeploy(opts)
        return report | {"model": model}
    finally:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)


def _alternate(urls: dict, names: list[str], concurrencies: tuple[int, ...], requests: int, max_tokens: int,
               repeats: int, say) -> dict:
    report: dict = {"runs": [], "2 / 1 replicas": {}, "1 replica / plain": {}}
    label = {1: "1 replica", 2: "2 replicas", "plain": "plain serve"}
    for c in concurrencies:
        runs: dict = {key: [] for key in urls}
        for _ in range(repeats):
            for key, url in urls.items():
                runs[key].append(load(url, label[key], _bodies(names, max(requests, 2 * c), max_tokens), c))
        tps = {}
        for key, results in runs.items():
            r = best(results)
            tps[key] = max(r.tokens_per_s, 1e-9)
            report["runs"].append(r.row())
            say(f"{label[key]:>12} c={c:<3} {r.tokens_per_s:7.1f} tok/s  ttft p50/p95 {r.ttft_p50_ms:.0f}/"
                f"{r.ttft_p95_ms:.0f} ms  latency p50 {r.latency_p50_ms:.0f} ms  errors "
                f"{sum(x.errors for x in results)}")
        report["2 / 1 replicas"][c] = round(tps[2] / tps[1], 3)
        report["1 replica / plain"][c] = round(tps[1] / tps["plain"], 3)
    return report
