"""What SGLang's /generate answers, read into our types with every field checked: an answer of another shape (an
SGLang release that renamed a field, another server on the port, a proxy's error page as JSON) is one EngineError
naming the endpoint, the field and an excerpt, not a KeyError or TypeError from inside a check. The reading
helpers (`unreadable`, `logprob_of`, `ids_of`) serve the OpenAI surfaces' answers too (openai_surfaces.py)."""

from __future__ import annotations

from typing import Any

from pytest_miles.engines.base import EngineError, Output


def unreadable(where: str, what: str, answer: Any) -> EngineError:
    return EngineError(f"{where} answered something this client cannot read: {what} (answer: {answer!r:.300})")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _logprob(value: Any) -> bool:
    """A number: NaN and infinities included (a kernel's NaN is a finding for the checks, not a bad answer)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


NAN = float("nan")


def logprob_of(value: Any, where: str, field: str, answer: Any) -> float:
    """One logprob as a float: null is NaN (orjson, which SGLang 0.5.17 answers with, writes NaN and +-Infinity
    as null)."""
    if value is None:
        return NAN
    if not _logprob(value):
        raise unreadable(where, f"{field} is not a logprob: {value!r:.80}", answer)
    return float(value)


def ids_of(value: Any, where: str, field: str, answer: Any) -> list[int]:
    """A list of token ids (non-negative integers)."""
    if not isinstance(value, list) or not all(_int(t) and t >= 0 for t in value):
        raise unreadable(where, f"{field} is not a list of token ids", answer)
    return list(value)


def token_logprobs(rows: Any, where: str, field: str, answer: Any, allow_none: bool = False) -> list[tuple]:
    """SGLang's [[logprob, token id, text?], ...] rows as (logprob, id) pairs. A null logprob is NaN: SGLang
    0.5.17 writes its answers with orjson, which writes NaN and +-Infinity as null (a kernel's NaN is a finding
    for the checks, not a bad answer). `allow_none`: a null is kept as None for the caller to place (the first
    input position has no logprob at all)."""
    if not isinstance(rows, list):
        raise unreadable(where, f"meta_info.{field} is not a list", answer)
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) < 2 or not _int(row[1]) \
                or not (_logprob(row[0]) or row[0] is None):
            raise unreadable(where, f"meta_info.{field}[{i}] is not [logprob, token id, ...]: {row!r:.80}", answer)
        out.append(((None if allow_none else NAN) if row[0] is None else float(row[0]), row[1]))
    return out


def continuation_logprobs(pairs: list[tuple], continuation: list[int], start: int, name: str) -> list[float]:
    """The logprobs of `continuation` in the (logprob, id) pairs of input positions `start`, `start` + 1, ...:
    located by its token ids (an off-by-one in the server's convention cannot compare the wrong positions), the
    last match first. A null is the sequence's first position (no logprob exists: never part of a match) or a
    NaN/Infinity that orjson wrote as null (NaN)."""
    n = len(continuation)
    for k in range(len(pairs) - n, -1, -1):
        window = pairs[k:k + n]
        if [t for _, t in window] == list(continuation) and (start + k > 0 or not window or window[0][0] is not None):
            return [NAN if lp is None else lp for lp, _ in window]
    raise EngineError(f"{name}: input_token_logprobs do not contain the continuation's token ids "
                      f"(got ids {[t for _, t in pairs][:20]}..., wanted {list(continuation)[:20]}...)")


def meta_of(item: Any, where: str) -> dict[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise unreadable(where, "no meta_info object", item)
    return item["meta_info"]


def output_of(item: Any, where: str) -> Output:
    """One /generate item (return_logprob true) as an Output: ids, logprobs, cached tokens, top-k maps and
    retractions, each checked."""
    meta = meta_of(item, where)
    lps = token_logprobs(meta.get("output_token_logprobs"), where, "output_token_logprobs", item)
    ids = ids_of(item.get("output_ids") or [t for _, t in lps], where, "output_ids", item)  # lengths: as given
    counts = {}
    for name in ("cached_tokens", "num_retractions"):
        value = meta.get(name)
        if value is not None and not (_int(value) and value >= 0):
            raise unreadable(where, f"meta_info.{name} is not a count", item)
        counts[name] = value
    top_rows = meta.get("output_top_logprobs") or []
    if not isinstance(top_rows, list):
        raise unreadable(where, "meta_info.output_top_logprobs is not a list", item)
    top = [{t: lp for lp, t in token_logprobs(row or [], where, f"output_top_logprobs[{i}]", item)}
           for i, row in enumerate(top_rows)]
    return Output(list(ids), [lp for lp, _ in lps], counts["cached_tokens"], top, counts["num_retractions"])
