"""Runs a sharded extraction: the shards of :mod:`qvl_ros.offline.shards`, in this process or on Ray.

    qvl-ros extract INPUT ... --topics ... --out SHARDS_DIR --workers 1            # this process
    qvl-ros extract INPUT ... --topics ... --out SHARDS_DIR --ray --workers 4      # local Ray cluster
    qvl-ros extract INPUT ... --topics ... --out SHARDS_DIR --ray auto --workers 16 --gpus-per-worker 1
    qvl-ros merge SHARDS_DIR --out OUTPUT [--export DIR]

The driver checks everything as one-process extraction does (inputs, topics, options, model,
output), writes ``plan.json`` (or, when SHARDS_DIR holds one, checks that this is the same run
and resumes it), then hands the shards that are not done to workers. A Ray worker is an actor
that loads the model once (on its GPU with ``--gpus-per-worker``) and runs shard after shard; a
worker that dies (killed, out of memory, a lost node) is replaced and its shard redone. Without
``--ray`` one worker runs in this process. The console shows shards done, sets/s over all
workers and the ETA. Ctrl-C (or SIGTERM) stops the run: finished shards are kept, the shards in
flight are redone by the next run of the same command. After the last shard, the seams between
shards are checked (:func:`qvl_ros.offline.shards.seam_problem`); a shard whose seam fails is
redone with a wider overlap.

Ray is an optional dependency (``pip install qvl_ros[ray]``); inputs, the model and SHARDS_DIR
must be at the same paths on every node (a shared file system).
"""
from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .console import Progress, StopOnSignal
from .engine import check_detect_ready, load_interruptibly, load_model, plan_run, resolve_model_path
from .options import EXIT_EMPTY, EXIT_FAILED, EXIT_OK, EXIT_SIGNAL, ExtractError, check_number, check_options
from .shards import (DirectoryLock, ShardPlan, ShardsError, check_resume, clear_shards_dir, grow_overlap,
                     load_plan, make_plan, shards_dir_problem, pending_shards, read_marker, run_shard,
                     save_plan, seam_failures)

__all__ = ["FleetOptions", "ShardWorker", "ProgressBoard", "run_sharded", "add_arguments", "options_from_args"]

MAX_SEAM_ROUNDS = 64  # a failing seam's overlap grows x4 a round up to the run's start, where it holds


@dataclass
class FleetOptions:
    workers: int = 1
    ray: str | None = None  # None: no Ray; "local": start a local cluster; "auto" or HOST:PORT: join one
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None  # default: the cluster's CPUs shared out over the workers
    shard_seconds: float = 300.0
    overlap: float | None = None  # seconds of warm-up before a cut; None: automatic


def add_arguments(parser) -> None:
    group = parser.add_argument_group("sharded runs (resumable; several workers on Ray)")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run the shards on Ray: without ADDRESS a local cluster on this machine; 'auto' "
                            "or HOST:PORT joins a running cluster. --out is then the shards directory")
    group.add_argument("--workers", type=int, default=None, metavar="N",
                       help="workers (Ray actors, one model each); --workers 1 without --ray runs the same "
                            "sharded, resumable run in this process")
    group.add_argument("--gpus-per-worker", type=float, default=None, metavar="G", help="GPUs per Ray worker (default 0)")
    group.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                       help="CPUs per Ray worker (default: the cluster's CPUs divided by the workers)")
    group.add_argument("--shard-seconds", type=float, default=None, metavar="SEC",
                       help="recording time per shard, a multiple of --batch-window (default 300)")
    group.add_argument("--overlap", type=float, default=None, metavar="SEC",
                       help="synchronization warm-up read before each shard (default: 2 s, more for a wide "
                            "--slop, --reorder or long clips)")


def options_from_args(args) -> FleetOptions | None:
    """The sharded-run options, or None when the run is a plain one-process extraction."""
    given = {flag: value for flag, value in (("--gpus-per-worker", args.gpus_per_worker),
                                             ("--cpus-per-worker", args.cpus_per_worker),
                                             ("--shard-seconds", args.shard_seconds), ("--overlap", args.overlap))
             if value is not None}
    if args.ray is None and args.workers is None:
        if given:
            raise ExtractError(f"{', '.join(given)}: options of a sharded run, which needs --workers N (in this "
                               f"process: --workers 1) or --ray")
        return None
    defaults = FleetOptions()
    return FleetOptions(workers=args.workers if args.workers is not None else 1, ray=args.ray,
                        gpus_per_worker=given.get("--gpus-per-worker", defaults.gpus_per_worker),
                        cpus_per_worker=args.cpus_per_worker,
                        shard_seconds=given.get("--shard-seconds", defaults.shard_seconds), overlap=args.overlap)


def _check(opts: FleetOptions) -> None:
    check_number(opts.workers, "workers", minimum=1, integer=True, maximum=1 << 16)
    check_number(opts.gpus_per_worker, "gpus-per-worker", maximum=1024)
    check_number(opts.cpus_per_worker, "cpus-per-worker", strict=True, maximum=1 << 16)
    check_number(opts.shard_seconds, "shard-seconds", strict=True, maximum=1e9)
    check_number(opts.overlap, "overlap", maximum=1e9)
    if opts.ray is None and opts.workers != 1:
        raise ExtractError("--workers above 1 needs --ray (without Ray one worker runs in this process)")
    if opts.ray is None and opts.gpus_per_worker:
        raise ExtractError("--gpus-per-worker needs --ray (use --device to pick this process's GPU)")
    if opts.ray is not None:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ExtractError("--ray needs Ray: pip install 'qvl_ros[ray]' (or ray)") from None


# ------------------------------------------------------------------------------------- plan
def _prepare(cfg, opts: FleetOptions, stream) -> tuple[Path, ShardPlan, bool, DirectoryLock]:
    """Check the run, then write its plan or check it against the one in the shards directory.
    Returns (shards directory, plan, resumed, the directory's lock, held)."""
    from .bag_io import BagInputError, CameraBags, qvl_typestore
    check_options(cfg)
    _check(opts)
    if not cfg.batch_window:
        raise ExtractError("--batch-window 0 cannot be sharded: shards are cut on the batch-window grid so that "
                           "their batches are one pass's batches")
    root = Path(cfg.output)
    if any(root.resolve() == Path(p).resolve() for p in cfg.inputs):
        raise ExtractError(f"{root} is also an input")
    try:
        qvl_typestore()
    except FileNotFoundError as exc:
        raise ExtractError(str(exc)) from None
    check_detect_ready(cfg)  # with --detect: vision_msgs for the bags, llguidance for the workers
    try:
        bags = CameraBags([Path(p) for p in cfg.inputs], list(cfg.topics))
    except BagInputError as exc:
        raise ExtractError(str(exc)) from None
    with bags:
        xplan = plan_run(cfg, bags)
        plan = make_plan(cfg, bags, xplan, resolve_model_path(cfg.model), opts.shard_seconds, opts.overlap)
    try:
        return (root, *_claim(root, plan, cfg.force))
    except ShardsError as exc:
        raise ExtractError(str(exc)) from None


def _claim(root: Path, plan: ShardPlan, force: bool) -> tuple[ShardPlan, bool, DirectoryLock]:
    """Lock the shards directory, then resume the run in it, clear it (``force``) or create it and
    write the plan. Returns (the plan to run, resumed, the lock)."""
    from .output_guard import check_writable

    found = (root.exists() or root.is_symlink()) and not (root.is_dir() and not root.is_symlink()
                                                          and not any(root.iterdir()))
    problem = shards_dir_problem(root) if found else None
    if problem:
        raise ExtractError(f"{root} exists and is not a shards directory of a sharded run ({problem}); "
                           + ("refusing to delete it, even with --force" if force
                              else "refusing to resume it; pick another --out"))
    if not found:
        try:
            check_writable(root)
        except OSError as exc:
            raise ExtractError(f"--out {root} cannot be created: {exc.strerror or exc}") from None
        root.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(root).acquire()  # before anything is read, deleted or written: no run works here
    try:
        if found and not force:
            check_resume(load_plan(root), plan, root)
            return load_plan(root), True, lock
        if found:
            clear_shards_dir(root)
        save_plan(root, plan)
        return plan, False, lock
    except BaseException:
        lock.release()
        raise


# ---------------------------------------------------------------------------------- workers
class ShardWorker:
    """Loads the model once and runs shards (the body of a Ray actor, or used in this process)."""

    def __init__(self, root: str, threads: int | None = None, model=None, own_process: bool = False) -> None:
        if own_process:  # a Ray worker process: tune malloc as `qvl-ros extract` does, before torch allocates
            from ..model.kernels import tune_cpu_allocator

            tune_cpu_allocator()
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        self.root = Path(root)
        self.plan = load_plan(self.root)
        t0 = time.perf_counter()
        self.model = model if model is not None else load_model(self.plan.config(output=self.root / "unused"),
                                                                 Path(self.plan.model_path))
        self.load_s = time.perf_counter() - t0
        self.stop = threading.Event()

    def info(self) -> dict:
        import torch

        return {"host": os.uname().nodename, "pid": os.getpid(), "device": str(self.model.device),
                "load_s": round(self.load_s, 3), "threads": torch.get_num_threads()}

    def run(self, index: int, board=None) -> dict:
        """Run shard ``index``; progress goes to ``board`` (a :class:`ProgressBoard` actor) at most
        once a second. The actor runs this on its main thread: torch on another thread of a Ray
        worker computed 12-15% slower when measured."""
        last = [0.0]

        def report(frames: int, sets: int) -> None:
            now = time.monotonic()
            if board is not None and now - last[0] >= 1.0:
                last[0] = now
                board.put.remote(index, frames, sets)  # fire and forget

        return run_shard(self.root, self.plan, index, self.model, self.stop, on_progress=report)


class ProgressBoard:
    """Frames and sets of the shards in flight, as the workers last reported them (a Ray actor)."""

    def __init__(self) -> None:
        self.now: dict[int, tuple[int, int]] = {}

    def put(self, index: int, frames: int, sets: int) -> None:
        self.now[index] = (frames, sets)

    def take(self) -> dict:
        return dict(self.now)


class _Board:
    """Progress of the whole run: shards done, frames and sets over every worker, ETA."""

    def __init__(self, plan: ShardPlan, todo, mode: str, interval, stream) -> None:
        self.total_shards = len(plan.shards)
        self.done = self.total_shards - len(todo)
        self.frames_done = 0
        self.sets_done = 0
        self.live: dict[int, tuple[int, int]] = {}  # shard index -> (frames, sets) in flight
        self.progress = Progress(sum(s.frames for s in todo), mode, interval, stream)
        self.progress.prefix = self._prefix

    def _prefix(self) -> str:
        running = f", {len(self.live)} running" if self.live else ""
        return f"shards {self.done}/{self.total_shards} done{running} | "

    def finished(self, shard, marker: dict) -> None:
        self.live.pop(shard.index, None)
        self.done += 1
        self.frames_done += shard.frames
        self.sets_done += marker["sets"]

    def counts(self) -> tuple[int, int]:
        return (self.frames_done + sum(f for f, _ in self.live.values()),
                self.sets_done + sum(s for _, s in self.live.values()))

    def update(self, force: bool = False) -> None:
        self.progress.update(*self.counts(), force=force)

    def finish(self) -> None:
        self.progress.finish(*self.counts())


def _run_here(root: Path, plan: ShardPlan, todo, stop, board: _Board, cfg, stream, worker_box: list) -> list:
    """Shards one after another in this process, with one model (loaded on first need)."""
    failures = []
    for shard in todo:
        if stop.is_set():
            break
        if not worker_box:
            model = load_interruptibly(cfg, Path(plan.model_path), stream if cfg.announce_model_load else None)
            worker_box.append(ShardWorker(str(root), model=model))
        worker = worker_box[0]
        worker.stop = stop

        def seen(frames, sets, index=shard.index):
            board.live[index] = (frames, sets)
            board.update()

        board.live[shard.index] = (0, 0)
        try:
            marker = run_shard(root, plan, shard.index, worker.model, stop, on_progress=seen)
        except ShardsError as exc:
            board.live.pop(shard.index, None)
            if not stop.is_set():
                failures.append((shard, str(exc)))
            continue
        board.finished(shard, marker)
        board.update(force=True)
    return failures


def _ray_init(opts: FleetOptions, stream):
    import ray

    if ray.is_initialized():
        return ray
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    if opts.ray == "local":  # a cluster of its own, even where another one runs
        kwargs["num_cpus"] = os.cpu_count() or 1
    stream.write(f"ray: {'starting a local cluster' if opts.ray == 'local' else f'joining {opts.ray}'}\n")
    stream.flush()
    ray.init(address=opts.ray, **kwargs)
    return ray


def _probe(address: str, timeout_s: float = 10.0) -> None:
    """A HOST:PORT that takes no connection is an error now: ray.init would retry it for minutes,
    deaf to Ctrl-C."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "local", "auto", a ray:// client address: Ray's own errors are prompt
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ExtractError(f"--ray {address}: nothing answers there ({exc.strerror or exc}); is the cluster "
                           f"up (ray start --head), and is this its GCS address?") from None


def _connect(opts: FleetOptions, stream) -> None:
    """Join (or start) the cluster and check that a worker fits on it; ExtractError otherwise.
    Called before the run's signal handlers are installed: ray.init installs its own for SIGTERM."""
    _probe(opts.ray)
    try:
        ray = _ray_init(opts, stream)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractError(f"--ray {opts.ray}: {reason}") from None
    have = ray.cluster_resources()
    need = {"GPU": opts.gpus_per_worker, "CPU": opts.cpus_per_worker or 0}
    for kind, flag in (("GPU", "--gpus-per-worker"), ("CPU", "--cpus-per-worker")):
        if need[kind] > have.get(kind, 0):
            raise ExtractError(f"{flag} {need[kind]:g}: the cluster has {have.get(kind, 0):g} {kind}s in all, so no "
                               f"worker could ever start")


def _run_ray(root: Path, plan: ShardPlan, todo, stop, board: _Board, opts: FleetOptions, stream) -> list:
    """Shards on Ray actors, each with its model; a dead actor is replaced and its shard redone."""
    ray = _ray_init(opts, stream)
    cpus = opts.cpus_per_worker
    if cpus is None:
        total = ray.cluster_resources().get("CPU", 1)
        cpus = max(1, int(total // opts.workers))
    threads = None if opts.gpus_per_worker else max(1, int(cpus))
    actor_cls = ray.remote(ShardWorker).options(num_cpus=cpus, num_gpus=opts.gpus_per_worker, max_restarts=0)
    spawn = lambda: actor_cls.remote(str(root), threads, own_process=True)  # noqa: E731
    reports = ray.remote(ProgressBoard).options(num_cpus=0).remote()
    n = max(1, min(opts.workers, len(todo)))
    idle = collections.deque(spawn() for _ in range(n))
    queue = collections.deque(todo)
    inflight: dict = {}  # ObjectRef -> (actor, shard)
    failures, deaths = [], 0
    try:
        while (queue or inflight) and not stop.is_set():
            while queue and idle:
                actor, shard = idle.popleft(), queue.popleft()
                inflight[actor.run.remote(shard.index, reports)] = (actor, shard)
                board.live[shard.index] = (0, 0)
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in done:
                actor, shard = inflight.pop(ref)
                try:
                    marker = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    deaths += 1
                    board.live.pop(shard.index, None)
                    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    stream.write(f"\nworker died during {shard.name} ({reason}); the shard will be redone\n")
                    try:  # an actor only unreachable for now must not finish the shard beside its replacement
                        ray.kill(actor)
                    except Exception:
                        pass
                    if deaths > 2 * n + 2:
                        failures.append((shard, f"workers keep dying ({deaths} so far); last: {exc}"))
                        queue.clear()
                        continue
                    queue.appendleft(shard)
                    idle.append(spawn())
                    continue
                except ray.exceptions.RayTaskError as exc:
                    board.live.pop(shard.index, None)
                    failures.append((shard, str(getattr(exc, "cause", exc))))
                    idle.append(actor)
                    continue
                board.finished(shard, marker)
                idle.append(actor)
            _poll(ray, reports, inflight, board)
            board.update()
    finally:
        for ref, (actor, shard) in inflight.items():
            board.live.pop(shard.index, None)
        for actor in list(idle) + [a for a, _ in inflight.values()] + [reports]:
            try:
                ray.kill(actor)
            except Exception:
                pass
    return failures


def _poll(ray, reports, inflight: dict, board: _Board) -> None:
    """Frames and sets of the shards in flight, from the progress board."""
    running = {shard.index for _, shard in inflight.values()}
    if not running:
        return
    ready, _ = ray.wait([ref := reports.take.remote()], timeout=0.2)
    if ready:
        for index, counts in ray.get(ref).items():
            if index in running:
                board.live[index] = counts


# -------------------------------------------------------------------------------------- run
def run_sharded(cfg, opts: FleetOptions, stream=None, progress: str = "auto",
                progress_interval: float | None = None, stop: threading.Event | None = None) -> int:
    """A sharded run (see the module doc); returns the exit status of `qvl-ros extract`."""
    stream = stream if stream is not None else sys.stderr
    root, plan, resumed, lock = _prepare(cfg, opts, stream)
    stop = stop if stop is not None else threading.Event()
    ray_was_up = opts.ray is None or _ray_is_up()
    try:
        with lock:
            return _run_rounds(cfg, opts, root, plan, resumed, stop, stream, progress, progress_interval)
    finally:
        if not ray_was_up:  # this run connected (or started a local cluster): leave now, not at exit, which
            import ray      # took over a second longer

            ray.shutdown()


def _ray_is_up() -> bool:
    import ray

    return ray.is_initialized()


def _redo_failed_seams(root: Path, plan: ShardPlan, stream) -> list:
    """Discard every done shard whose seam fails its check, to be redone with a wider overlap;
    returns the failures."""
    seams = seam_failures(root, plan)
    for index, problem in seams:
        wider = grow_overlap(root, plan, plan.shards[index])
        stream.write(f"seam before {plan.shards[index].name}: {problem}; redoing it with "
                     f"{wider / 1e9:g} s of overlap\n")
    return seams


def _run_rounds(cfg, opts: FleetOptions, root: Path, plan: ShardPlan, resumed: bool, stop: threading.Event, stream,
                progress: str, progress_interval) -> int:
    """The shards not done, in rounds until the seams hold; the summary; the exit status."""
    t0 = time.perf_counter()
    # A run stopped between its last shard and the seam check left shards whose seams nobody checked.
    _redo_failed_seams(root, plan, stream)
    todo = pending_shards(root, plan)
    checked = not todo  # every shard done, and every seam just checked holds
    if resumed:
        stream.write(f"resuming {root}: {len(plan.shards) - len(todo)} of {len(plan.shards)} shards done, "
                     f"{len(todo)} to run\n")
    else:
        stream.write(f"plan: {len(plan.shards)} shard{'s' if len(plan.shards) != 1 else ''} of "
                     f"{plan.shard_ns / 1e9:g} s, overlap {plan.overlap_ns / 1e9:g} s, in {root}\n")
    stream.flush()
    failures, ran, local, seams = [], 0, [], []
    if opts.ray is not None and todo:
        _connect(opts, stream)
    with StopOnSignal(stop, cfg.handle_signals, stream) as signals:
        try:
            for _ in range(MAX_SEAM_ROUNDS):
                todo = pending_shards(root, plan)
                if not todo or stop.is_set():
                    break
                board = _Board(plan, todo, progress, progress_interval, stream)
                if opts.ray is None:
                    failures = _run_here(root, plan, todo, stop, board, cfg, stream, local)
                else:
                    failures = _run_ray(root, plan, todo, stop, board, opts, stream)
                board.finish()
                ran += len(todo) - len(pending_shards(root, plan))
                if failures or stop.is_set():
                    break
                seams = _redo_failed_seams(root, plan, stream)
                checked = not seams
        except KeyboardInterrupt:  # a second Ctrl-C
            stop.set()
            if signals.signum is None:
                signals.signum = signal.SIGINT
        signals.closing = True
    left = pending_shards(root, plan)
    markers = [read_marker(root, s) for s in plan.shards if s not in left]
    sets = sum(m["sets"] for m in markers if m)
    elapsed = time.perf_counter() - t0
    stream.write(f"{len(plan.shards) - len(left)} of {len(plan.shards)} shards done ({ran} in this run), "
                 f"{sets} sets, in {root} ({elapsed:.1f} s)\n")
    for shard, reason in failures:
        stream.write(f"  {shard.name} failed: {reason}\n")
    if left and not failures and seams and not stop.is_set():
        stream.write(f"  the seams before {', '.join(plan.shards[i].name for i, _ in seams)} still failed after "
                     f"{MAX_SEAM_ROUNDS} rounds\n")
    if left:
        stream.write(f"rerun the same command to finish the other {len(left)} shard"
                     f"{'s' if len(left) != 1 else ''}\n")
    elif not checked:
        stream.write("stopped before the seams between the shards were checked: rerun the same command "
                     "to check them\n")
    else:
        export = f" (the export goes to {plan.export_dir})" if plan.export else ""
        stream.write(f"merge into one bag with: qvl-ros merge {root} --out OUTPUT{export}\n")
    stream.flush()
    if signals.signum is not None and (left or not checked):
        return EXIT_SIGNAL.get(signals.signum, EXIT_FAILED)
    if left or not checked:
        return EXIT_FAILED
    if sets == 0 and not cfg.allow_empty:
        stream.write("no set was produced (pass --allow-empty if that is expected)\n")
        return EXIT_EMPTY
    return EXIT_OK

