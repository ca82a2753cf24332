"""Math answer reward for verl: last ``\\boxed{}`` (or an ``Answer:`` line), checked with HF Math-Verify.

verl contract (see ``docs/rewards.md``): ``compute_score(data_source, solution_str, ground_truth,
extra_info=None, **kwargs) -> dict``, called with keywords from executor threads inside Ray actors.
The returned dict always has the same keys, because verl stacks ``reward_extra_info`` per key:

* ``score`` (float): :data:`SCORE_CORRECT` = 1.0 or :data:`SCORE_WRONG` = 0.0 (no answer, wrong, timeout);
* ``acc`` (bool), ``pred`` (str: the extracted answer, truncated; ``""`` when none was found);
* ``timeout`` (bool): the Math-Verify call hit its deadline; ``format_ok`` (bool): an answer was found;
* ``status`` (str): ``correct`` | ``wrong`` | ``no_answer`` | ``timeout`` | ``error``.

Design, and why:

* Extraction is in-process, linear-time and bounded (a 1 MB response costs milliseconds). Unlike
  verl's ``math_dapo`` it looks at the whole response, not just its last 300 characters.
* Cheap in-process decisions first: equal normalised strings or equal plain numbers (``42`` = ``42.0``)
  are correct, two different plain integers are wrong. Only the rest goes to Math-Verify.
* Math-Verify (sympy, antlr) runs in a :class:`~dyjr_verl.rewards.deadline.DeadlinePool` worker with
  its own signal-based timeouts disabled; the pool kills a worker that overruns ``timeout_s`` and
  replaces it, so ``10^{10^{10}}``-style answers cost at most the deadline and never hang verl.
* Nothing heavy is imported here: sympy and Math-Verify live only in the worker processes.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, NamedTuple, Sequence

from dyjr_verl.rewards import bool_option, check_kwargs
from dyjr_verl.rewards.deadline import (
    DeadlineExceeded,
    DeadlinePool,
    LazyPool,
    PoolStartError,
    by_reference,
    in_fork_server,
    register_preload,
)

__all__ = [
    "SCORE_CORRECT",
    "SCORE_WRONG",
    "DEFAULT_TIMEOUT_S",
    "EXTRACT_MODES",
    "compute_score",
    "compute_score_batch",
    "compute_score_async",
    "extract_answer",
    "extract_boxed",
    "extract_answer_line",
    "normalize_answer",
    "get_pool",
    "configure_pool",
]

SCORE_CORRECT = 1.0
SCORE_WRONG = 0.0  # also for: no answer found, Math-Verify timeout, worker crash
DEFAULT_TIMEOUT_S = 5.0
#: Extraction modes, tried in the order given by the ``extract`` kwarg.
EXTRACT_MODES = ("boxed", "answer_line")
#: Extracted answers longer than this are not sent to Math-Verify (no MATH answer is near this long).
MAX_ANSWER_CHARS = 1000
#: Responses longer than this are only searched in their last ``MAX_SCAN_CHARS`` characters.
MAX_SCAN_CHARS = 2_000_000
#: ``pred`` in the returned dict is truncated to this many characters (it is logged by verl).
MAX_PRED_CHARS = 200
#: How many trailing ``\boxed`` occurrences are tried before giving up (bounds unbalanced-brace inputs).
MAX_BOXED_TRIES = 8

STATUSES = ("correct", "wrong", "no_answer", "timeout", "error")

# --------------------------------------------------------------------------------------------------
# extraction

_BOX_CMDS = ("\\boxed", "\\fbox")


def _match_braces(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_idx``; backslash-escaped braces do not count."""
    depth = 0
    i, n = open_idx, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (also ``\\boxed 5``), else ``None``."""
    end = len(text)
    for _ in range(MAX_BOXED_TRIES):
        pos = max(text.rfind(cmd, 0, end) for cmd in _BOX_CMDS)
        if pos < 0:
            return None
        cmd_len = len("\\boxed") if text.startswith("\\boxed", pos) else len("\\fbox")
        j = pos + cmd_len
        if j < len(text) and (text[j].isalpha()):  # e.g. \boxedfoo: another command
            end = pos
            continue
        k = j
        while k < len(text) and text[k] in " \t":
            k += 1
        if k < len(text) and text[k] == "{":
            close = _match_braces(text, k)
            if close is not None:
                return text[k + 1 : close].strip()
        elif k > j and k < len(text):  # "\boxed 5": one space-delimited token
            m = re.match(r"[^\s$]+", text[k:])
            if m:
                return m.group(0).rstrip(".")
        end = pos
    return None


_ANSWER_LINE_RES = (
    re.compile(r"(?im)^[ \t>*#_]*(?:the[ \t]+)?(?:final[ \t]+)?answer(?:[ \t]+is)?[ \t*_]*[:：][ \t]*(?P<ans>[^\n]+)"),
    re.compile(r"(?m)^[ \t]*####[ \t]*(?P<ans>[^\n]+)"),
    re.compile(r"(?i)\bfinal answer is[ \t:]*(?P<ans>[^\n]+)"),
)
_HOPE_RE = re.compile(r"(?i)\.?\s*I hope it is correct\.?\s*$")


def extract_answer_line(text: str) -> str | None:
    """The last ``Answer: X`` / ``Final answer: X`` / ``#### X`` / ``The final answer is X`` line."""
    best: tuple[int, str] | None = None
    for rx in _ANSWER_LINE_RES:
        last = None
        for last in rx.finditer(text):
            pass
        if last is not None and (best is None or last.start() > best[0]):
            best = (last.start(), last.group("ans"))
    if best is None:
        return None
    ans = _HOPE_RE.sub("", best[1]).strip()
    ans = ans.strip("*_ ").rstrip(".").strip()
    ans = _strip_math_delims(ans).rstrip(".").strip()
    return ans or None


def extract_answer(text: str, modes: Sequence[str] = EXTRACT_MODES) -> str | None:
    """Apply the extraction ``modes`` in order (see :data:`EXTRACT_MODES`); first hit wins."""
    if len(text) > MAX_SCAN_CHARS:
        text = text[-MAX_SCAN_CHARS:]
    for mode in modes:
        if mode == "boxed":
            ans = extract_boxed(text)
        elif mode == "answer_line":
            ans = extract_answer_line(text)
        else:
            raise ValueError(f"unknown extract mode {mode!r}; expected a subset of {EXTRACT_MODES}")
        if ans:
            return ans
    return None


# --------------------------------------------------------------------------------------------------
# normalisation (in-process fast path; conservative: only rewrites that keep the value)

_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_SPACING_RE = re.compile(r"\\[!,;:> ]|\\q?quad\b|~|\\displaystyle|\\left(?![a-zA-Z])|\\right(?![a-zA-Z])")
_CMD_SPACE_RE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z0-9])")
_WS_RE = re.compile(r"\s+")
_TEXT_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}$")
_NUM_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")


def _strip_math_delims(s: str) -> str:
    s = s.strip()
    changed = True
    while changed and s:
        changed = False
        for left, right in _DELIMS:
            if len(s) > len(left) + len(right) - 1 and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                changed = True
                break
    return s


def normalize_answer(s: str) -> str:
    """Canonical string for exact comparison: delimiters, spacing macros, ``\\dfrac``, whitespace."""
    s = _strip_math_delims(s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _SPACING_RE.sub(" ", s)
    s = _CMD_SPACE_RE.sub(r"\1 ", s.strip())
    # Remove whitespace except the single space that keeps "\pi r" from becoming "\pir".
    parts = re.split(r"(\\[a-zA-Z]+ )", s)
    s = "".join(p if p.startswith("\\") else _WS_RE.sub("", p) for p in parts).strip()
    s = s.rstrip(".")
    m = _TEXT_WRAP_RE.match(s)
    if m:
        s = m.group(1).strip()
    return s


def _plain_number(s: str) -> Decimal | None:
    if len(s) > 64 or not _NUM_RE.match(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def _quick_verdict(gold: str, pred: str) -> bool | None:
    """True/False when decidable without Math-Verify, else None."""
    g, p = normalize_answer(gold), normalize_answer(pred)
    if g and g == p:
        return True
    gn, pn = _plain_number(g), _plain_number(p)
    if gn is not None and pn is not None:
        if gn == pn:
            return True
        if "." not in g and "." not in p:  # two different integers
            return False
    return None


# --------------------------------------------------------------------------------------------------
# worker side (runs in DeadlinePool processes only)


def _warm_worker() -> None:
    """Pool initializer: import Math-Verify, silence its 'timeout disabled' warnings, warm its parsers."""
    import logging

    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _parse_cached("\\frac{1}{2}")
    _verify_in_worker(("\\frac{1}{2}",), "0.5")


#: Typical competition-math answer shapes. Parsing them once warms ANTLR's DFA (the bulk of a cold
#: worker's parse cost) and sympy's caches; done in the fork server, every worker inherits the result.
_WARMUP_ANSWERS = (
    "42", "-7", "3.25", "0.5", "\\frac{3}{4}", "-\\frac{1}{2}", "\\dfrac{5}{6}", "\\frac{\\sqrt{3}}{2}",
    "2\\sqrt{5}", "\\sqrt[3]{2}", "3\\pi", "\\frac{\\pi}{6}", "e^{2}", "2^{10}", "x^2 + 2x + 1", "a_1",
    "(3, -2)", "\\left( 3, \\frac{\\pi}{2} \\right)", "[2, 5)", "(-\\infty, 0] \\cup [1, \\infty)", "\\{1, 2, 3\\}",
    "1, 2, 3", "x = 5", "y = 2x + 3", "x \\in [-2, 7]", "x > 3", "90^\\circ", "45^{\\circ}", "30\\%", "\\$12.50",
    "\\text{(C)}", "\\text{Evelyn}", "\\mathrm{odd}", "10,080", "1{,}000", "\\log_2 3", "\\ln 5", "\\sin x",
    "\\cos 2\\theta", "\\tan^{-1} 2", "\\binom{10}{3}", "5!", "|x - 1|", "\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}",
    "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "3 + 4i", "\\frac{1 + \\sqrt{5}}{2}", "2 \\times 10^{3}",
    "\\infty", "\\emptyset", "\\sqrt{2} - 1", "\\frac{x + 1}{x - 1}", "(x - 2)(x + 3)", "6 \\text{ cm}",
    "\\overline{AB}", "\\angle ABC", "\\frac{a}{b} + c^{2}", "\\sum_{k=1}^{n} k", "p - q", "-\\frac{\\pi}{6}",
)


def _warm_fork_server() -> None:
    """Parse and compare :data:`_WARMUP_ANSWERS` (about 1 s, once per fork server)."""
    _warm_worker()
    for i, answer in enumerate(_WARMUP_ANSWERS):
        try:
            _verify_in_worker((answer,), _WARMUP_ANSWERS[(i + 1) % len(_WARMUP_ANSWERS)])
            _verify_in_worker((answer,), answer)
        except Exception:  # noqa: BLE001 - warm-up only
            pass


@functools.lru_cache(maxsize=4096)
def _parse_cached(answer: str) -> tuple[Any, ...]:
    """Parse a bare answer (gold or pred) as ``\\boxed{answer}``; cached because GRPO repeats golds n times."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return tuple(
        parse(
            "\\boxed{" + answer + "}",
            extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
            parsing_timeout=None,
        )
    )


def _verify_in_worker(golds: tuple[str, ...], pred: str) -> str:
    """``"correct"`` | ``"wrong"`` | ``"unparsed"`` (nothing parseable); gold first, as Math-Verify requires."""
    from math_verify import verify

    parsed_pred = list(_parse_cached(pred))
    if not parsed_pred:
        return "unparsed"
    any_gold = False
    for gold in golds:
        parsed_gold = list(_parse_cached(gold))
        any_gold = any_gold or bool(parsed_gold)
        if parsed_gold and verify(parsed_gold, parsed_pred, timeout_seconds=None):
            return "correct"
    return "wrong" if any_gold else "unparsed"


# --------------------------------------------------------------------------------------------------
# pool management

# Import Math-Verify (sympy, antlr: ~1 s) once in the fork server, so that replacing a killed worker
# costs a fork, whichever pool happens to start the server first. Nothing is imported here. The sympy
# modules are the ones Math-Verify imports lazily during its first comparisons (units, sets, groups).
_MATH_PRELOAD = (
    "math_verify",
    "sympy.physics.units",
    "sympy.combinatorics",
    "sympy.tensor.tensor",
    "sympy.sets.setexpr",
    "sympy.sets.handlers.issubset",
    "sympy.assumptions.wrapper",
    "antlr4.LL1Analyzer",
)
_MODULE = "dyjr_verl.rewards.math"  # the importable name, also when verl loaded this file by path
register_preload(*_MATH_PRELOAD, _MODULE)

if in_fork_server():  # this module is being preloaded by the fork server: warm what workers will inherit
    _warm_fork_server()

_POOL = LazyPool("math-verify", memory_limit_mb=2048, preload=_MATH_PRELOAD,
                 initializer=by_reference(_warm_worker, _MODULE))


def configure_pool(
    max_workers: int | None = None, memory_limit_mb: int | None = 2048, start_method: str | None = None
) -> None:
    """Set the worker count / memory cap of the shared Math-Verify pool (restarts it if already running)."""
    _POOL.configure(max_workers, memory_limit_mb, start_method)


def get_pool() -> DeadlinePool:
    """The process-wide Math-Verify pool; created on first use, workers started on demand."""
    return _POOL.get()


# --------------------------------------------------------------------------------------------------
# scoring


class _Options(NamedTuple):
    timeout_s: float
    modes: tuple[str, ...]
    fast_path: bool


#: The keyword options (``reward_kwargs``) of every entry point.
OPTIONS = ("timeout_s", "extract", "fast_path")


def _options(kwargs: dict[str, Any]) -> _Options:
    check_kwargs(_MODULE, kwargs, OPTIONS)
    timeout_s = kwargs.get("timeout_s", DEFAULT_TIMEOUT_S)
    try:
        timeout_s = float(timeout_s)
    except (TypeError, ValueError):
        raise ValueError(f"timeout_s must be a number of seconds, got {timeout_s!r}") from None
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    modes = kwargs.get("extract", EXTRACT_MODES)
    if isinstance(modes, str):
        modes = (modes,)
    modes = tuple(modes)
    bad = [m for m in modes if m not in EXTRACT_MODES]
    if not modes or bad:
        raise ValueError(f"extract must be a non-empty subset of {EXTRACT_MODES}, got {modes!r}")
    return _Options(timeout_s, modes, bool_option("fast_path", kwargs.get("fast_path", True)))


def _golds(ground_truth: Any) -> tuple[str, ...]:
    """Gold answer(s) as bare strings; a gold containing ``\\boxed{}`` is unwrapped."""
    if ground_truth is None:
        raise ValueError("ground_truth is None; expected the gold answer string")
    items: Iterable[Any]
    if isinstance(ground_truth, (list, tuple)) or type(ground_truth).__name__ == "ndarray":
        items = list(ground_truth)
    else:
        items = [ground_truth]
    out = []
    for item in items:
        s = str(item).strip()
        if "\\boxed" in s or "\\fbox" in s:
            s = extract_boxed(s) or s
        s = _strip_math_delims(s)
        if s:
            out.append(s)
    if not out:
        raise ValueError(f"ground_truth is empty: {ground_truth!r}")
    return tuple(out)


def _result(status: str, pred: str, *, timeout: bool = False) -> dict[str, Any]:
    ok = status == "correct"
    return {
        "score": SCORE_CORRECT if ok else SCORE_WRONG,
        "acc": ok,
        "pred": pred[:MAX_PRED_CHARS],
        "timeout": timeout,
        "format_ok": status != "no_answer",
        "status": status,
    }


def _prepare(solution_str: Any, ground_truth: Any, opts: _Options) -> tuple[dict[str, Any] | None, tuple[tuple[str, ...], str]]:
    """Decide in-process if possible; else return the (golds, pred) job for the pool."""
    golds = _golds(ground_truth)
    text = "" if solution_str is None else str(solution_str)
    pred = extract_answer(text, opts.modes)
    if pred is None:
        return _result("no_answer", ""), (golds, "")
    if opts.fast_path:
        verdicts = [_quick_verdict(g, pred) for g in golds]
        if any(v is True for v in verdicts):
            return _result("correct", pred), (golds, pred)
        if all(v is False for v in verdicts):
            return _result("wrong", pred), (golds, pred)
    if len(pred) > MAX_ANSWER_CHARS:
        return _result("wrong", pred), (golds, pred)
    return None, (golds, pred)


def _finish(golds: tuple[str, ...], pred: str, ok: bool, value: Any) -> dict[str, Any]:
    if ok:
        if value == "unparsed":  # Math-Verify found nothing to compare: normalised string match decides
            same = any(normalize_answer(g) == normalize_answer(pred) for g in golds)
            return _result("correct" if same else "wrong", pred)
        return _result("correct" if value == "correct" else "wrong", pred)
    if isinstance(value, DeadlineExceeded):
        return _result("timeout", pred, timeout=True)
    return _result("error", pred)  # WorkerCrashed (segfault, OOM) or an exception raised in the worker


def compute_score(
    data_source: str | None = None,
    solution_str: str | None = None,
    ground_truth: Any = None,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Score one response (verl custom-reward signature; ``data_source`` is not used for dispatch).

    Keyword options (verl: ``+reward.custom_reward_function.reward_kwargs.<name>=...``):
        timeout_s: hard deadline for the Math-Verify check, default :data:`DEFAULT_TIMEOUT_S`.
        extract: extraction modes in order, subset of :data:`EXTRACT_MODES` (default both).
        fast_path: allow the in-process string/number decision (default True; tests turn it off).
    Any other keyword raises ``ValueError`` (except the ones verl itself adds, ``reward_router_address``
    and ``reward_model_tokenizer``).
    """
    opts = _options(kwargs)
    done, (golds, pred) = _prepare(solution_str, ground_truth, opts)
    if done is not None:
        return done
    try:
        value = get_pool().run(by_reference(_verify_in_worker, _MODULE), golds, pred, timeout_s=opts.timeout_s)
    except PoolStartError:
        raise  # broken environment: fail loudly rather than score everything 0
    except Exception as exc:  # noqa: BLE001 - DeadlineExceeded, WorkerCrashed, worker exceptions
        return _finish(golds, pred, False, exc)
    return _finish(golds, pred, True, value)


async def compute_score_async(
    data_source: str | None = None,
    solution_str: str | None = None,
    ground_truth: Any = None,
    extra_info: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``async`` twin of :func:`compute_score` (verl awaits coroutine scorers instead of using a thread)."""
    opts = _options(kwargs)
    done, (golds, pred) = _prepare(solution_str, ground_truth, opts)
    if done is not None:
        return done
    try:
        verify = by_reference(_verify_in_worker, _MODULE)
        value = await get_pool().run_async(verify, golds, pred, timeout_s=opts.timeout_s)
    except PoolStartError:
        raise
    except Exception as exc:  # noqa: BLE001
        return _finish(golds, pred, False, exc)
    return _finish(golds, pred, True, value)


def compute_score_batch(
    data_sources: Sequence[str | None] | None = None,
    solution_strs: Sequence[str] = (),
    ground_truths: Sequence[Any] = (),
    extra_infos: Sequence[dict[str, Any] | None] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Score many responses; the Math-Verify checks run concurrently on all pool workers."""
    if len(solution_strs) != len(ground_truths):
        raise ValueError(
            f"solution_strs and ground_truths differ in length: {len(solution_strs)} vs {len(ground_truths)}"
        )
    opts = _options(kwargs)
    results: list[dict[str, Any] | None] = []
    jobs: list[tuple[int, tuple[str, ...], str]] = []
    for i, (sol, gt) in enumerate(zip(solution_strs, ground_truths)):
        done, (golds, pred) = _prepare(sol, gt, opts)
        results.append(done)
        if done is None:
            jobs.append((i, golds, pred))
    if jobs:
        pool = get_pool()
        verify = by_reference(_verify_in_worker, _MODULE)
        futures = [pool.submit(verify, golds, pred, timeout_s=opts.timeout_s) for _, golds, pred in jobs]
        for (i, golds, pred), fut in zip(jobs, futures):
            exc = fut.exception()
            if isinstance(exc, PoolStartError):
                raise exc
            results[i] = _finish(golds, pred, exc is None, fut.result() if exc is None else exc)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]
