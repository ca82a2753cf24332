"""A process pool with a hard per-call deadline that works from any thread.

Why not the obvious tools:

* ``signal.alarm`` (math-verify's own timeout) only works in the main thread; verl's reward loop calls
  ``compute_score`` from executor threads inside Ray actors, where it raises or silently scores 0.
* ``concurrent.futures.ProcessPoolExecutor`` + ``future.result(timeout=...)`` stops *waiting*, but the
  worker keeps burning a core on the pathological input, and the pool cannot kill or replace it; a few
  such inputs and every worker is stuck.
* ``func_timeout`` / thread interrupts cannot stop C code (sympy big-integer arithmetic, SQLite's VM).

:class:`DeadlinePool` owns its worker processes. Each call is sent to one idle worker and must answer
within ``timeout_s`` (counted from the moment the worker receives it, so queueing behind other calls or
waiting for a worker to boot does not eat the budget). A worker that misses the deadline is SIGKILLed
and replaced lazily; a worker that crashes (segfault, OOM kill, ``RecursionError`` in C) is replaced the
same way. The caller gets :class:`DeadlineExceeded` or :class:`WorkerCrashed` and the pool stays usable.
Only when workers cannot be started at all (three boots in a row fail) do calls get
:class:`PoolStartError`, which the rewards re-raise: a broken environment must not look like a 0 reward.

Workers are started lazily (nothing happens at import or construction), via the ``forkserver`` start
method on Linux (fork-safe in threaded parents such as Ray actors, and a replacement costs a ``fork`` of
the server instead of a fresh interpreter) and ``spawn`` elsewhere. Modules named in ``preload`` are
imported once in the fork server where possible. Each worker gets an address-space limit
(``memory_limit_mb``) so that e.g. ``10^{10^{10}}`` fails with ``MemoryError`` instead of swapping the
host, and it dies with its parent (``PR_SET_PDEATHSIG`` plus a watchdog thread).

One manager thread per pool dispatches calls and enforces deadlines; ``submit`` is thread-safe and
returns a :class:`concurrent.futures.Future`, so sync (:meth:`run`), batch (:meth:`map`) and asyncio
(:meth:`run_async`) callers share the same workers. Nothing waits without a bound: a fork server that
does not answer within ``BOOT_TIMEOUT_S`` is killed, and if the manager thread itself fails, every
queued and running call fails with it.

``forkserver`` and ``spawn`` re-run the main script in the new process (as ``__mp_main__``). A script that
calls a reward at its top level, outside ``if __name__ == "__main__":``, would call it again there and
never let a worker start: :meth:`DeadlinePool.submit` refuses such a call up front
(:class:`PoolStartError`, one line saying what to add), and a reward called while a process is re-running
the main script fails the same way instead of waiting.
"""

from __future__ import annotations

import ast
import asyncio
import atexit
import collections
import functools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import socket
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "LazyPool",
    "DeadlineExceeded",
    "WorkerCrashed",
    "PoolStartError",
    "DeadlinePool",
    "default_start_method",
    "register_preload",
    "in_fork_server",
    "default_worker_count",
    "by_reference",
    "check_main_guard",
]

#: How long a freshly started worker may take to import its modules and report ready.
BOOT_TIMEOUT_S = 120.0
#: After this many consecutive failed boots, pending calls fail instead of waiting forever.
MAX_BOOT_FAILURES = 3


class DeadlineExceeded(TimeoutError):
    """The call did not finish within its deadline; its worker was killed."""


class WorkerCrashed(RuntimeError):
    """The worker process died while running the call (segfault, OOM kill, ``os._exit``)."""


class PoolStartError(RuntimeError):
    """Workers cannot be started at all (e.g. called from a daemonic multiprocessing worker).

    Unlike a per-call crash this is an environment problem, so reward functions let it propagate
    instead of scoring every sample 0.
    """


def by_reference(fn: Callable[..., Any], module: str) -> Callable[..., Any]:
    """``fn``, or its namesake from ``module`` when ``fn`` lives in a module workers cannot import.

    Calls are pickled by reference (module + name). verl loads ``reward.custom_reward_function.path``
    given as a *file* under a private name (``custom_module_<hash>``) that is not in ``sys.modules``;
    sending such a function would fail for every sample, so the installed module's copy is sent instead.
    """
    if fn.__module__ == module:
        return fn
    import importlib

    return getattr(importlib.import_module(module), fn.__name__)


def default_worker_count() -> int:
    """``$DYJR_REWARD_WORKERS`` if set, else min(4, CPU count): reward workers per scoring process."""
    env = os.environ.get("DYJR_REWARD_WORKERS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"DYJR_REWARD_WORKERS must be an integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"DYJR_REWARD_WORKERS must be >= 1, got {n}")
        return n
    return max(1, min(4, os.cpu_count() or 1))


def default_start_method() -> str:
    """``forkserver`` where available (Linux), else ``spawn``; never plain ``fork`` (unsafe in threaded parents)."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


#: Modules to import in the (process-global, shared) fork server, gathered from every caller that
#: registered them before the server started; see :func:`register_preload`.
_PRELOAD: list[str] = []


#: Set in the environment of the fork server we start (and so of its workers), never in ours.
FORK_SERVER_ENV = "DYJR_DEADLINE_FORK_SERVER"


def in_fork_server() -> bool:
    """True while a preload module is being imported by (or runs in a worker forked from) our fork server.

    A module registered with :func:`register_preload` can use this at import time to warm caches that
    every worker then inherits through ``fork`` (e.g. ANTLR's parser DFA, which otherwise costs each fresh
    worker its first few hundred parses).
    """
    return os.environ.get(FORK_SERVER_ENV) == "1"


def register_preload(*modules: str) -> None:
    """Ask for ``modules`` to be imported once in the fork server, if it has not started yet.

    Python has one fork server per process, started by whichever pool forks first; registering at
    import time (cheap: nothing is imported here) lets e.g. the SQL pool start a server that the
    Math-Verify pool can later fork warm workers from.
    """
    for m in modules:
        if m not in _PRELOAD:
            _PRELOAD.append(m)


# --------------------------------------------------------------------------------------------------
# the calling script's main guard

_GUARD = 'if __name__ == "__main__":'


def _reimported_main_file() -> str | None:
    """The file of ``__main__`` when new worker processes re-run it (what ``spawn``/``forkserver`` do), else None."""
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name is not None and (spec_name == "__main__" or spec_name.endswith(".__main__")):
        return None  # multiprocessing never re-runs a package's __main__ module
    path = getattr(main, "__file__", None)
    return path if path and os.path.isfile(path) else None


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = (test.left, test.comparators[0])
    return any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides) and any(
        isinstance(x, ast.Constant) and x.value == "__main__" for x in sides
    )


@functools.lru_cache(maxsize=8)
def _guarded_lines(path: str, mtime_ns: int) -> tuple[tuple[int, int], ...] | None:
    """Line ranges of the bodies of ``if __name__ == "__main__":`` blocks in ``path``; None if unreadable."""
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read(), path)
    except (OSError, SyntaxError, ValueError):
        return None
    return tuple(
        (node.body[0].lineno, node.body[-1].end_lineno or node.body[-1].lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_main_test(node.test)
    )


def _main_guard_lines() -> tuple[str, tuple[tuple[int, int], ...] | None] | None:
    path = _reimported_main_file()
    if path is None:
        return None
    try:
        return path, _guarded_lines(path, os.stat(path).st_mtime_ns)
    except OSError:
        return None


def check_main_guard() -> None:
    """Raise :class:`PoolStartError` when starting workers would re-run the code that is calling us.

    * In a process that is re-running the main script for multiprocessing (multiprocessing's own
      ``_inheriting`` flag, as in its "bootstrapping phase" check), a pool can never start.
    * In the original process, when the call comes from the main script's top-level code outside its
      ``if __name__ == "__main__":`` body, every worker start would repeat the call.
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise PoolStartError(
            "a reward was called while this process re-runs the main script to start a worker; "
            f"put the script's top-level code under '{_GUARD}'"
        )
    main_globals = getattr(sys.modules.get("__main__"), "__dict__", None)
    frame = sys._getframe(1)
    while frame is not None and not (frame.f_code.co_name == "<module>" and frame.f_globals is main_globals):
        frame = frame.f_back
    if frame is None:  # not called from the main script's top level (threads, Ray actors, functions)
        return
    guard = _main_guard_lines()
    if guard is None or guard[1] is None:  # the main script is not re-run, or cannot be read
        return
    path, ranges = guard
    line = frame.f_lineno
    if not any(a <= line <= b for a, b in ranges):
        raise PoolStartError(
            f"reward called at the top level of {path} (line {line}): its worker processes re-run "
            f"that script and would call it again; move the calling code under '{_GUARD}'"
        )


def _kill_fork_server() -> None:
    """SIGKILL this process's fork server (its blocked clients then read EOF instead of waiting forever)."""
    import multiprocessing.forkserver as fs
    import signal

    pid = getattr(getattr(fs, "_forkserver", None), "_forkserver_pid", None)
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------
# worker side


def _set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except Exception:  # pragma: no cover - best effort only
        pass


def _watchdog(owner_pid: int, state: dict[str, float]) -> None:
    """Exit when the owning process is gone or the current call overran its deadline by far.

    Backup only: the owner kills overdue workers itself, and a C loop holding the GIL starves this thread.
    """
    while True:
        time.sleep(0.5)
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            os._exit(70)
        except PermissionError:  # pid reused by another user's process: owner is gone
            os._exit(70)
        hard = state.get("hard_deadline", 0.0)
        if hard and time.monotonic() > hard:
            os._exit(71)


def _worker_main(
    conn: multiprocessing.connection.Connection,
    owner_pid: int,
    memory_limit_mb: int | None,
    initializer: Callable[[], Any] | None,
) -> None:
    """Worker loop: receive ``(fn, args, kwargs, timeout_s)``, reply ``("ok", value)`` or ``("err", exc)``."""
    _set_parent_death_signal()
    if memory_limit_mb:
        try:
            import resource

            limit = int(memory_limit_mb) * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):  # pragma: no cover - non-Linux
            pass
    state: dict[str, float] = {"hard_deadline": 0.0}
    threading.Thread(target=_watchdog, args=(owner_pid, state), daemon=True, name="deadline-watchdog").start()
    try:
        if initializer is not None:
            initializer()
    except BaseException as exc:  # report and die: the owner counts this as a failed boot
        _send_quietly(conn, ("boot_error", f"{type(exc).__name__}: {exc}"))
        return
    _send_quietly(conn, ("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, args, kwargs, timeout_s = msg
        # Generous self-destruct in case the owner's manager thread is wedged.
        state["hard_deadline"] = time.monotonic() + 2.0 * float(timeout_s) + 5.0
        try:
            reply: tuple[str, Any] = ("ok", fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the caller
            reply = ("err", _picklable_exception(exc))
        state["hard_deadline"] = 0.0
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            _send_quietly(conn, ("err", RuntimeError(f"result not picklable: {exc}")))
        except (OSError, EOFError):
            return


def _picklable_exception(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _send_quietly(conn: multiprocessing.connection.Connection, obj: Any) -> None:
    try:
        conn.send(obj)
    except Exception:
        pass


# --------------------------------------------------------------------------------------------------
# owner side


@dataclass(eq=False)
class _Task:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    timeout_s: float
    future: Future


@dataclass(eq=False)
class _Worker:
    process: Any
    conn: multiprocessing.connection.Connection
    started: float
    task: _Task | None = None
    deadline: float = 0.0
    ready: bool = False


@dataclass
class PoolStats:
    """Counters for tests and logging."""

    started: int = 0
    completed: int = 0
    timed_out: int = 0
    crashed: int = 0
    boot_failures: int = 0


_LIVE_POOLS: "weakref.WeakSet[DeadlinePool]" = weakref.WeakSet()


def _shutdown_all() -> None:
    for pool in list(_LIVE_POOLS):
        pool.shutdown()


atexit.register(_shutdown_all)


class DeadlinePool:
    """Worker processes with a hard, thread-safe per-call deadline (see the module docstring).

    Args:
        name: used in thread/process names and error messages.
        max_workers: number of worker processes (started on demand).
        start_method: ``forkserver`` (default on Linux) or ``spawn``.
        preload: modules imported once in the fork server (``forkserver`` only, and only if this
            process's fork server is not running yet, see :func:`register_preload`); workers import
            them themselves otherwise.
        memory_limit_mb: ``RLIMIT_AS`` for each worker; ``None`` for no limit.
        initializer: picklable zero-argument callable run in each worker before it reports ready
            (warm caches here so that the first call does not spend its deadline on imports).
    """

    def __init__(
        self,
        name: str,
        max_workers: int,
        *,
        start_method: str | None = None,
        preload: Sequence[str] = (),
        memory_limit_mb: int | None = 2048,
        initializer: Callable[[], Any] | None = None,
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        method = start_method or default_start_method()
        if method not in ("forkserver", "spawn"):
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', got {method!r}")
        self.name = name
        self.max_workers = int(max_workers)
        self.start_method = method
        self.preload = tuple(preload)
        self.memory_limit_mb = memory_limit_mb
        self.initializer = initializer
        self.stats = PoolStats()
        self._reset_state()
        _LIVE_POOLS.add(self)

    # -- public API ---------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any, timeout_s: float, **kwargs: Any) -> Future:
        """Queue ``fn(*args, **kwargs)``; the future fails with :class:`DeadlineExceeded` after ``timeout_s``."""
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self._check_fork()
        check_main_guard()
        fut: Future = Future()
        task = _Task(fn, args, kwargs, float(timeout_s), fut)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"DeadlinePool {self.name!r} is shut down")
            self._pending.append(task)
            self._ensure_manager()
        self._wake()
        return fut

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float, **kwargs: Any) -> Any:
        """Blocking :meth:`submit`; raises the worker's exception, :class:`DeadlineExceeded` or :class:`WorkerCrashed`."""
        return self.submit(fn, *args, timeout_s=timeout_s, **kwargs).result()

    async def run_async(self, fn: Callable[..., Any], *args: Any, timeout_s: float, **kwargs: Any) -> Any:
        """Awaitable :meth:`run` for asyncio callers (verl's reward loop accepts ``async def`` scorers)."""
        return await asyncio.wrap_future(self.submit(fn, *args, timeout_s=timeout_s, **kwargs))

    def map(
        self, fn: Callable[..., Any], arg_tuples: Iterable[tuple[Any, ...]], *, timeout_s: float
    ) -> list[tuple[bool, Any]]:
        """Run ``fn(*args)`` for each tuple concurrently; returns ``(ok, value_or_exception)`` in input order."""
        futures = [self.submit(fn, *args, timeout_s=timeout_s) for args in arg_tuples]
        out: list[tuple[bool, Any]] = []
        for fut in futures:
            exc = fut.exception()
            out.append((False, exc) if exc is not None else (True, fut.result()))
        return out

    def warm(self, n: int | None = None, wait_s: float = BOOT_TIMEOUT_S) -> int:
        """Start up to ``n`` workers now (default all) and wait until they are ready; returns the ready count."""
        want = self.max_workers if n is None else max(1, min(int(n), self.max_workers))
        self._check_fork()
        with self._lock:
            self._want_warm = max(self._want_warm, want)
            self._ensure_manager()
        self._wake()
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            with self._lock:
                ready = sum(1 for w in self._workers if w.ready)
                gave_up = self._want_warm == 0 and all(w.ready for w in self._workers)
            if ready >= want or gave_up:  # gave_up: boots failed MAX_BOOT_FAILURES times in a row
                return ready
            time.sleep(0.01)
        with self._lock:
            return sum(1 for w in self._workers if w.ready)

    def alive_workers(self) -> int:
        with self._lock:
            return sum(1 for w in self._workers if w.process.is_alive())

    def shutdown(self) -> None:
        """Stop the manager, kill all workers and fail queued calls; safe to call twice."""
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        with self._lock:
            workers = list(self._workers)
            self._workers.clear()
        for w in workers:
            if w.task is not None and not w.task.future.done():
                w.task.future.set_exception(WorkerCrashed(f"pool {self.name!r} shut down"))
            self._kill(w)
        for task in pending:
            if not task.future.done():
                task.future.set_exception(WorkerCrashed(f"pool {self.name!r} shut down"))
        for sock in (self._wake_r, self._wake_w):
            try:
                sock.close()
            except OSError:
                pass

    # -- internals ----------------------------------------------------------------------------------

    def _reset_state(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.RLock()  # future callbacks may re-enter submit()
        self._pending: collections.deque[_Task] = collections.deque()
        self._workers: list[_Worker] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._want_warm = 0
        self._boot_failures_in_a_row = 0
        self._last_boot_error = ""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def _check_fork(self) -> None:
        """After ``os.fork`` the copied workers and thread belong to the parent: start from scratch."""
        if os.getpid() != self._pid:
            self._reset_state()
            self.stats = PoolStats()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # buffer full means a wake-up is already pending; closed means shut down

    def _ensure_manager(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._manage, daemon=True, name=f"deadline-pool-{self.name}")
            self._thread.start()

    def _context(self) -> Any:
        ctx = multiprocessing.get_context(self.start_method)
        if self.start_method == "forkserver":
            import multiprocessing.forkserver as fs

            register_preload(*self.preload)
            server = getattr(fs, "_forkserver", None)
            running = server is not None and getattr(server, "_forkserver_pid", None) is not None
            if not running and server is not None and _PRELOAD:
                current = list(getattr(server, "_preload_modules", ["__main__"]))
                ctx.set_forkserver_preload(current + [m for m in _PRELOAD if m not in current])
                # Start it now, with the marker that lets preload modules warm up (see in_fork_server).
                os.environ[FORK_SERVER_ENV] = "1"
                try:
                    fs.ensure_running()
                finally:
                    os.environ.pop(FORK_SERVER_ENV, None)
        return ctx

    def _start_worker(self) -> None:
        try:
            ctx = self._context()
        except Exception as exc:  # e.g. the fork server cannot be started from here
            self._boot_failed(f"could not start worker: {type(exc).__name__}: {exc}")
            return
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        proc = ctx.Process(
            target=_worker_main,
            args=(child_conn, os.getpid(), self.memory_limit_mb, self.initializer),
            name=f"{self.name}-worker",
            daemon=True,
        )
        # The fork server answers only after importing its preload modules (on some Python versions the
        # main script too); if that never ends, Process.start() would block this thread, and every caller.
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _kill_fork_server()

        watchdog = threading.Timer(BOOT_TIMEOUT_S, expire) if self.start_method == "forkserver" else None
        try:
            if watchdog is not None:
                watchdog.daemon = True
                watchdog.start()
            proc.start()
        except Exception as exc:
            parent_conn.close()
            child_conn.close()
            why = (f"the fork server did not answer within {BOOT_TIMEOUT_S:g} s and was killed" if expired.is_set()
                   else f"{type(exc).__name__}: {exc}")
            self._boot_failed(f"could not start worker: {why}")
            return
        finally:
            if watchdog is not None:
                watchdog.cancel()
        child_conn.close()
        self.stats.started += 1
        self._workers.append(_Worker(proc, parent_conn, time.monotonic()))

    def _boot_failed(self, why: str) -> None:
        self.stats.boot_failures += 1
        self._boot_failures_in_a_row += 1
        self._last_boot_error = why
        if self._boot_failures_in_a_row >= MAX_BOOT_FAILURES:
            msg = f"pool {self.name!r}: worker processes fail to start ({why})"
            guard = _main_guard_lines()
            if guard is not None and guard[1] == ():
                msg += f"; workers re-run {guard[0]}, which has no '{_GUARD}' block: put its code under one"
            err = PoolStartError(msg)
            while self._pending:
                task = self._pending.popleft()
                if not task.future.done():
                    task.future.set_exception(err)
            self._want_warm = 0
            self._boot_failures_in_a_row = 0

    def _kill(self, w: _Worker) -> None:
        try:
            w.process.kill()
        except Exception:
            pass
        try:
            w.process.join(timeout=2.0)
        except Exception:
            pass
        try:
            w.conn.close()
        except Exception:
            pass

    def _retire(self, w: _Worker, exc: BaseException | None) -> None:
        """Remove ``w`` (lock held); fail its task with ``exc``."""
        if w in self._workers:
            self._workers.remove(w)
        if w.task is not None and exc is not None and not w.task.future.done():
            w.task.future.set_exception(exc)
        w.task = None
        self._kill(w)

    def _schedule(self) -> float | None:
        """Start workers, hand pending tasks to idle ones; returns the wait timeout (lock held)."""
        booting = sum(1 for w in self._workers if not w.ready)
        idle = [w for w in self._workers if w.ready and w.task is None]
        need = max(len(self._pending) - len(idle) - booting, self._want_warm - len(self._workers), 0)
        failures_before = self.stats.boot_failures
        while need > 0 and len(self._workers) < self.max_workers:
            self._start_worker()
            need -= 1
        start_failed = self.stats.boot_failures > failures_before
        while self._pending and idle:
            task = self._pending[0]
            if task.future.done():  # cancelled while queued
                self._pending.popleft()
                continue
            w = idle.pop()
            try:
                w.conn.send((task.fn, task.args, task.kwargs, task.timeout_s))
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                self._pending.popleft()
                task.future.set_exception(ValueError(f"cannot send call to worker: {exc}"))
                idle.append(w)
                continue
            except (OSError, EOFError):
                self._retire(w, None)  # dead idle worker; the task stays queued for another one
                continue
            self._pending.popleft()
            # False means it was cancelled just now; the worker is still busy with it and its reply is
            # dropped in _on_message (future already done), so keep the task attached either way.
            task.future.set_running_or_notify_cancel()
            w.task = task
            w.deadline = time.monotonic() + task.timeout_s
        if start_failed:
            return 0.05  # retry soon; PoolStartError after MAX_BOOT_FAILURES in a row
        now = time.monotonic()
        deadlines = [w.deadline for w in self._workers if w.task is not None]
        deadlines += [w.started + BOOT_TIMEOUT_S for w in self._workers if not w.ready]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - now)

    def _manage(self) -> None:
        try:
            self._manage_loop()
        except BaseException as exc:  # a bug: no caller may wait forever; each of them gets the error instead
            with self._lock:
                err = PoolStartError(f"pool {self.name!r}: manager thread failed: {type(exc).__name__}: {exc}")
                tasks = list(self._pending) + [w.task for w in self._workers if w.task is not None]
                self._pending.clear()
                for w in list(self._workers):
                    self._retire(w, None)
                self._thread = None
            for task in tasks:
                if not task.future.done():
                    task.future.set_exception(err)

    def _manage_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                timeout = self._schedule()
                conns = [w.conn for w in self._workers]
            try:
                ready = multiprocessing.connection.wait([self._wake_r, *conns], timeout)
            except OSError:
                ready = []
            with self._lock:
                if self._closed:
                    return
                if self._wake_r in ready:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                by_conn = {w.conn: w for w in self._workers}
                for c in ready:
                    w = by_conn.get(c)
                    if w is not None:
                        self._on_message(w)
                now = time.monotonic()
                for w in list(self._workers):
                    if w.task is not None and now >= w.deadline:
                        self.stats.timed_out += 1
                        self._retire(w, DeadlineExceeded(f"call exceeded its {w.task.timeout_s:g} s deadline"))
                    elif not w.ready and now >= w.started + BOOT_TIMEOUT_S:
                        self._retire(w, None)
                        self._boot_failed(f"worker not ready after {BOOT_TIMEOUT_S:g} s")
                if self._want_warm and sum(1 for w in self._workers if w.ready) >= self._want_warm:
                    self._want_warm = 0

    def _on_message(self, w: _Worker) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            w.process.join(timeout=1.0)
            code = w.process.exitcode
            if w.ready:
                self.stats.crashed += 1
                self._retire(w, WorkerCrashed(f"worker died during the call (exit code {code})"))
            else:
                self._retire(w, None)
                self._boot_failed(f"worker died while starting (exit code {code})")
            return
        except Exception as exc:  # unpicklable reply
            self._retire(w, WorkerCrashed(f"unreadable reply from worker: {type(exc).__name__}: {exc}"))
            return
        kind = msg[0]
        if kind == "ready":
            w.ready = True
            self._boot_failures_in_a_row = 0
            return
        if kind == "boot_error":
            self._retire(w, None)
            self._boot_failed(str(msg[1]))
            return
        task, w.task = w.task, None
        if task is None or task.future.done():
            return
        self.stats.completed += 1
        if kind == "ok":
            task.future.set_result(msg[1])
        else:
            task.future.set_exception(msg[1])



class LazyPool:
    """A process-wide :class:`DeadlinePool` created on first use (rewards import cheaply in every
    verl process and most never score). :meth:`configure` changes its settings and restarts it."""

    def __init__(self, name: str, *, memory_limit_mb: int | None, preload: Sequence[str] = (),
                 initializer: Callable[[], Any] | None = None) -> None:
        self.name = name
        self.default_memory_limit_mb = memory_limit_mb
        self._preload = tuple(preload)
        self._initializer = initializer
        self._settings: dict[str, Any] = {}
        self._pool: DeadlinePool | None = None
        self._lock = threading.Lock()

    def configure(self, max_workers: int | None = None, memory_limit_mb: int | None = None,
                  start_method: str | None = None) -> None:
        with self._lock:
            self._settings = {"max_workers": max_workers, "memory_limit_mb": memory_limit_mb,
                              "start_method": start_method}
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def get(self) -> DeadlinePool:
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._pool is None:
                self._pool = DeadlinePool(
                    self.name,
                    self._settings.get("max_workers") or default_worker_count(),
                    start_method=self._settings.get("start_method"),
                    preload=self._preload,
                    memory_limit_mb=self._settings.get("memory_limit_mb", self.default_memory_limit_mb),
                    initializer=self._initializer,
                )
            return self._pool
