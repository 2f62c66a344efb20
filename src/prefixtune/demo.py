"""`make demo`: per-label emotion adapters trained together, then one sample per emotion, one mixed batch."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def run_demo(model: str, data: str, out: str, quick: bool = False, steps: int | None = None) -> None:
    from prefixtune.data import load_data
    from prefixtune.engine.lm import PrefixLM
    from prefixtune.models import load_base_model
    from prefixtune.store import AdapterStore
    from prefixtune.train.config import TrainConfig
    from prefixtune.train.loop import train

    console = Console()
    started = time.perf_counter()
    loaded = load_base_model(model)
    console.print(f"base model [bold]{loaded.name}[/] from {loaded.path} on {loaded.device} ({loaded.dtype})")
    bundle = load_data(data)
    counts = bundle.label_counts("train")
    console.print(f"data {data}: {sum(counts.values())} train rows, labels "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()))
    store_dir = Path(out) / "adapters"
    cfg = TrainConfig(
        model=model,
        data=data,
        out=str(Path(out) / "train"),
        store=str(store_dir),
        name="emotion",
        per_label=True,
        balance=True,
        max_examples=120 if quick else 960,
        max_steps=steps or (30 if quick else 150),
        eval_every=0 if quick else 50,
        eval_examples=48 if quick else 192,
        num_virtual_tokens=10 if quick else 20,
        # Measured on this data (30 steps, 10 tokens): text init + direct KV at lr 1e-2 reached eval loss
        # 4.41, the MLP projection at 3e-4 4.60, PEFT's random init + MLP at 1e-3 5.28 (no prefix: 6.04).
        prefix_projection=False,
        lr=1e-2,
        init="text",
        init_text="i feel {label} because",
        save_every=50,
        overwrite=True,  # the demo owns its folder: `make demo` again replaces the previous demo run
    )
    result = train(cfg, loaded=loaded, data=bundle, say=console.print)
    if result.interrupted:
        return
    lm = PrefixLM(loaded, AdapterStore(store_dir))
    labels = sorted(result.adapters)
    prompt = cfg.resolved_template()
    generations = lm.generate(
        [prompt] * len(labels), adapters=labels, max_new_tokens=24 if quick else 32,
        temperature=0.8, top_p=0.95, seed=list(range(len(labels))),
    )
    table = Table(title=f"one sample per emotion, one mixed batch of {len(labels)} adapters")
    table.add_column("adapter")
    table.add_column("generated text")
    for name, gen in zip(labels, generations):
        table.add_row(name, gen.text.strip())
    console.print(table)
    console.print(f"adapters in {store_dir}; demo took {time.perf_counter() - started:.0f} s")
