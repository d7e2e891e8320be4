"""The Ray runtime every Ray user in the harness shares (sweeps on Ray Tune, data-parallel training
on Ray Train): it joins a cluster at an address, or starts a private runtime on this machine that
listens on 127.0.0.1 only and asks for a random token, and shuts it down afterwards.
"""
from __future__ import annotations

import os
import secrets
import time
from contextlib import contextmanager
from typing import Any, Callable

Echo = Callable[[str], Any]


# A private local runtime. Ray 2.60 turns a `_node_ip_address` of 127.0.0.1 into the machine's
# routable address unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is off (ray._private.services.
# get_node_ip_address); with it off, the GCS, raylets and workers bind 127.0.0.1 only.
# address="local" always starts a new runtime (never one found through RAY_ADDRESS or `ray start`).
LOCAL_INIT = {"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False,
              "log_to_driver": True, "logging_level": "warning"}
_TOKEN: str | None = None  # one per process: Ray caches the token it first read


def _local_env() -> dict[str, str]:
    """Environment for a private runtime: loopback only, and token authentication with a random token
    kept in the environment (inherited by Ray's processes) rather than written to ~/.ray/auth_token."""
    global _TOKEN
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if "RAY_AUTH_MODE" not in os.environ:  # a user's explicit choice (token or disabled) stands
        env["RAY_AUTH_MODE"] = "token"
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            _TOKEN = _TOKEN or secrets.token_hex(32)
            env["RAY_AUTH_TOKEN"] = _TOKEN
    return env


@contextmanager
def ray_runtime(address: str | None, echo: Echo = print):
    """A running Ray: joins `address`, or starts a private local runtime and shuts it down afterwards.

    Yields {"cpus", "gpus"} of the cluster. A runtime this process already started is used as it is.
    """
    import ray

    ray_constants = ray_private()["constants"]
    if ray.is_initialized():
        yield _cluster_info(ray)
        return
    saved_env = {key: os.environ.get(key) for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE",
                                                      "RAY_AUTH_TOKEN")}
    saved_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
    tick = time.perf_counter()
    try:
        if address:
            _check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=True, logging_level="warning")
            except ConnectionError as err:
                raise ConnectionError(f"could not join the Ray cluster at {address!r}: {err}") from None
        else:
            os.environ.update(_local_env())
            _reload_auth_settings()
            ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray.init resolves 127.0.0.1 (see LOCAL_INIT)
            ray.init(**LOCAL_INIT)
        info = _cluster_info(ray)
        where = f"cluster at {address}" if address else "local, 127.0.0.1 only"
        echo(f"Ray {ray.__version__} ready in {time.perf_counter() - tick:.1f} s ({where}; "
             f"{info['cpus']:g} CPUs, {info['gpus']:g} GPUs)")
        yield info
    finally:
        if ray.is_initialized():
            ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster_flag
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not address:
            _reload_auth_settings()


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail at once for a host:port nobody listens on (ray.init would retry for minutes)."""
    import socket

    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return  # "auto", "ray://..." (Ray Client) and other forms: left to ray.init
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise ConnectionError(f"could not reach the Ray cluster at {address!r} ({err}); start it with "
                              f"`ray start --head` there, or leave --address out to run on this machine") from None


def ray_private() -> dict:
    """Everything of Ray's private API this harness uses, in one place (Ray has no public setting for
    either): `constants.ENABLE_RAY_CLUSTER`, which keeps a local runtime on 127.0.0.1 (see LOCAL_INIT),
    and the auth-token `Config` and `AuthenticationTokenLoader`, which re-read RAY_AUTH_MODE and the
    token. tests/test_sweep.py checks that they exist, so that a Ray upgrade that moves them fails there,
    loudly, rather than silently leaving the runtime on a routable address or without its token."""
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    return {"constants": ray_constants, "config": Config, "token_loader": AuthenticationTokenLoader}


def _reload_auth_settings() -> None:
    """Ray reads RAY_AUTH_MODE and the token once, at import: make it read them again (as ray.init does
    for its own default in ray._private.authentication.authentication_token_setup._enable_token_auth)."""
    private = ray_private()
    private["config"].initialize("")
    private["token_loader"].instance().reset_cache()


def _cluster_info(ray) -> dict:
    resources = ray.cluster_resources()
    return {"cpus": float(resources.get("CPU", 0)), "gpus": float(resources.get("GPU", 0))}


def ray_storage(cfg: dict) -> str:
    """Where Ray keeps its own experiment state (Tune's and Train's): sweep.storage, else <runs_dir>/ray."""
    from pathlib import Path

    return str(Path(cfg["sweep"]["storage"] or Path(cfg["run"]["runs_dir"]) / "ray").resolve())
