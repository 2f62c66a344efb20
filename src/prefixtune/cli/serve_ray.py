"""`prefixtune serve --backend ray`: flag checks and the mapping onto ReplicaConfig / RayOptions."""

from __future__ import annotations

import typer

from prefixtune.adapter_folder import StoreError, validate_name


def run_ray(settings, engine: dict, placement: dict) -> None:
    """Deploy on Ray Serve and serve until SIGINT/SIGTERM; every bad flag is a usage error before Ray starts.
    `placement` holds the RayOptions flags given."""
    address = placement.get("address")
    if address is not None and address != "auto" and not address.startswith("ray://"):
        raise typer.BadParameter(f"{address!r}: give ray://HEAD:10001 (Ray Client) or auto (the cluster this node "
                                 "joined with `ray start --address`)", param_hint="--address")
    replicas = placement.get("replicas", 1)  # RayOptions' default
    if placement.get("max_replicas") is not None and placement["max_replicas"] < replicas:
        raise typer.BadParameter(f"{placement['max_replicas']} < --replicas {replicas}", param_hint="--max-replicas")
    if settings.adapter_roots:
        raise typer.BadParameter("loading adapters by path copies them onto one machine; with --backend ray put "
                                 "them in the store (every replica reads it)", param_hint="--adapter-root")
    for flag in ("preload", "pin"):
        for name in engine[flag]:
            try:
                validate_name(name)
            except StoreError as err:
                raise typer.BadParameter(str(err), param_hint=f"--{flag}") from None
    try:
        from prefixtune.server.ray_backend import RayOptions, board_name, serve_ray
        from prefixtune.server.ray_replica import ReplicaConfig
    except ImportError as err:
        raise typer.BadParameter(f"Ray Serve is not installed ({err}); install it with "
                                 "pip install 'prefixtune[ray]'", param_hint="--backend") from None
    opts = RayOptions(**placement)
    serve_ray(ReplicaConfig(board=board_name(opts), **engine), settings, opts)
