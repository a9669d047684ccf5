"""Start or attach to Ray the way ``ray.init()`` does, with settings that do not hang on a small machine.

Which Ray (``resolve_address``): ``--address`` (the ``address`` argument), then ``RAY_ADDRESS``, then a head
started on this machine with ``ray start --head`` (the address Ray records in
``<temp dir>/ray/ray_current_cluster``, used only while a raylet on this machine still runs against it),
else a new private local instance. ``address="local"`` always starts a new one (tests, benchmarks).
One log line says which Ray was used and why.

On a 2-core machine an actor pool holding every CPU starves Ray Data's read tasks forever
(RAY-NOTES). For a local instance we therefore advertise more logical CPUs than cores and give actors
fractional CPUs; torch still uses the real threads. On a cluster we connect and change nothing.
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


def running_local_head(temp_dir: str | None = None) -> str | None:
    """The GCS address of a head started on this machine with ``ray start``, if it still runs.

    Ray's own lookup (``ray.init()`` with no address): the address the last ``ray start`` wrote to
    ``ray_current_cluster`` in Ray's temp dir ($RAY_TMPDIR, $TMPDIR or /tmp, then ``ray``). A file left
    behind by a head that died would make ``ray.init()`` hang on connecting; we use it only while a raylet on
    this machine is started with that GCS address (Ray's ``find_gcs_addresses``).
    """
    from ray._private import services

    recorded = services.find_bootstrap_address(temp_dir)
    if not recorded:
        return None
    services.find_gcs_addresses.cache_clear()  # a head may have stopped since an earlier lookup
    if recorded in services.find_gcs_addresses():
        return recorded
    log.info("Ray: ignoring %s: no raylet on this machine runs against it (a head that has stopped)",
             ray_address_file(temp_dir))
    return None


def ray_address_file(temp_dir: str | None = None) -> str:
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(temp_dir)


def resolve_address(address: str | None = None) -> tuple[str | None, str]:
    """(address to attach to or None for a new local instance, where it came from), in ``ray.init()``'s order."""
    if address:
        return (None, "address='local'") if address == "local" else (address, "--address")
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return (None, "RAY_ADDRESS=local") if env == "local" else (env, "RAY_ADDRESS")
    head = running_local_head()
    if head:
        return head, f"the head started with `ray start` on this machine ({ray_address_file()})"
    return None, "no RAY_ADDRESS and no running head on this machine"


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Attach to the Ray that ``resolve_address`` finds, else start a local instance.

    ``address``: a cluster address (``host:port``, ``ray://...``, ``auto``) or ``"local"`` for a new private
    instance whatever runs (test fixtures pass it, so they never attach to a leftover head).
    Local default: ``num_cpus = max(4, 2 * cores)`` logical CPUs, no dashboard; ``num_cpus`` and the local
    settings are ignored when attaching (the cluster has its own).
    Returns Ray's context; a no-op if Ray is already initialised.
    """
    _quiet_env()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    target, source = resolve_address(address)
    if target:
        env_vars = {"RAY_USAGE_STATS_ENABLED": "0"}
        ctx = ray.init(address=target, runtime_env={"env_vars": env_vars}, **kwargs)
        res = ray.cluster_resources()
        log.info("Ray: attached to the cluster at %s (from %s): %d node(s), %g CPU, %g GPU", target, source,
                 len([n for n in ray.nodes() if n.get("Alive")]), res.get("CPU", 0), res.get("GPU", 0))
        return ctx
    _quiet_local_auth()
    cores = os.cpu_count() or 2
    num_cpus = num_cpus or max(4, 2 * cores)
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("log_to_driver", True)
    # address="local": a new instance even where another local one is up (another user's `ray start`, a
    # test's head); a bare ray.init() would attach to it and fail on num_cpus
    ctx = ray.init(address="local", num_cpus=num_cpus, **kwargs)
    log.info("Ray: started a local instance (%s) with %d logical CPUs on %d cores", source, num_cpus, cores)
    from ray.data import DataContext

    dctx = DataContext.get_current()
    if os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS"):
        dctx.enable_progress_bars = False
    return ctx


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
