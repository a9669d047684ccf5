"""Start or connect to Ray with settings that do not hang on a small machine.

On a 2-core machine an actor pool holding every CPU starves Ray Data's read tasks forever
(RAY-NOTES). Locally we therefore advertise more logical CPUs than cores and give actors
fractional CPUs; torch still uses the real threads. On a cluster (``RAY_ADDRESS`` set, or
inside ``ray job submit``) we connect and change nothing.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def _quiet_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if os.environ.get("CI"):
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _quiet_local_auth() -> None:
    """Keep Ray's token authentication for a local instance we start, without its notice.

    Ray 2.60 turns token auth on for a new local instance when ``RAY_AUTH_MODE`` is unset and logs a
    warning saying so on every run. Measured: that instance listens on all interfaces (0.0.0.0), not only
    on loopback, so turning auth *off* would expose the machine; we state the default explicitly instead
    (``token``: the token lives in ``~/.ray/auth_token``), which Ray respects without a warning. A mode the
    user set (``disabled`` or ``token``) is left alone; connecting to a cluster changes nothing.
    """
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._raylet import Config  # Ray caches the mode at import; refresh it as Ray's own code does

        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")
    except Exception as e:  # noqa: BLE001 - a private hook; fall back to Ray's default (with its notice)
        os.environ.pop("RAY_AUTH_MODE", None)
        log.debug("could not state Ray's auth mode (%s); Ray's default applies", e)


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Connect to ``address``/``RAY_ADDRESS`` if given, else start a local instance.

    Local default: ``num_cpus = max(4, 2 * cores)`` logical CPUs, no dashboard.
    Returns Ray's context; a no-op if Ray is already initialised.
    """
    _quiet_env()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0"}
    if address:
        log.info("connecting to Ray at %s", address)
        return ray.init(address=address, runtime_env={"env_vars": env_vars}, **kwargs)
    _quiet_local_auth()
    cores = os.cpu_count() or 2
    num_cpus = num_cpus or max(4, 2 * cores)
    log.info("starting local Ray with %d logical CPUs on %d cores", num_cpus, cores)
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("log_to_driver", True)
    # address="local": always a new instance here; a bare ray.init() would attach to whatever local cluster is
    # up (another user's `ray start`, a test's head) and fail on num_cpus. Clusters: RAY_ADDRESS / --address.
    ctx = ray.init(address="local", num_cpus=num_cpus, **kwargs)
    from ray.data import DataContext

    dctx = DataContext.get_current()
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS"):
        dctx.enable_progress_bars = False
    return ctx


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
