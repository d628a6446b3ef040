"""The eval loop: (task × haystack × length × depth × seed) × method × decode policy on one model, one JSONL row per
sample.

Rows are appended and flushed as they finish; a rerun skips every row already in the file, so a killed run loses
nothing. Each method is patched in through ``longattn.patch`` (never forked model code), the prompt is prefilled once
(timed), and the answer is decoded greedily from the cache. With a decode policy the cache is the policy's
``LongattnCache`` (``handle.cache()``), in one of two settings (DESIGN.md, Measuring): question-aware, the whole prompt
is prefilled and compression runs at its end; question-agnostic, the context alone is prefilled and compressed, then
the question is fed (as kvpress measures: the cache cannot know what will be asked). Both inside the timed prefill;
every decoding step reads from the cache. Rows then carry what the cache holds and reads (see ``eval/kvstats.py``
for how each number is obtained)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from longattn.eval.kvstats import ReadMeter, dense_bytes, held_bytes
from longattn.eval.memory import PeakMemory
from longattn.eval.methods import DENSE, MethodSpec, applied
from longattn.eval.perplexity import perplexity, text_ids
from longattn.eval.tasks import make_sample, score
from longattn.eval.tasks.needles import DEPTHLESS
from longattn.hf.compat import cache_kwargs, output_cache
from longattn.jsonl import open_append

KEY_FIELDS = ("task", "haystack", "length", "depth", "seed", "method", "decode", "kv_setting", "model", "dtype")
# rows written before decode policies (or the question-agnostic setting) were evaluated: dense cache, question-aware
KEY_DEFAULTS = {"decode": "dense", "kv_setting": "aware"}
SETTINGS = ("aware", "agnostic")


@dataclass(frozen=True)
class Job:
    """One sample under one prefill method and one decode policy."""

    task: str
    haystack: str
    length: int
    depth: float
    seed: int
    method: MethodSpec
    decode: MethodSpec = DENSE
    setting: str = "aware"  # KV setting of a decode policy: "aware" (sees the question) or "agnostic"


def grid(tasks: Iterable[str], lengths: Iterable[int], depths: Iterable[float], methods: Iterable[MethodSpec], *,
         seeds: Iterable[int] = (0,), haystacks: Iterable[str] = ("noise",),
         decodes: Iterable[MethodSpec] = (DENSE,), settings: Iterable[str] = ("aware",)) -> list[Job]:
    """Every combination, grouped by (method, decode policy) (one patch each); depthless tasks run once per length;
    perplexity (no decoding) runs on the dense cache only; the dense cache has no setting (it keeps everything)."""
    settings = list(settings)
    unknown = [x for x in settings if x not in SETTINGS]
    if unknown or not settings:
        raise ValueError(f"settings: expected some of {SETTINGS}, got {settings}")
    jobs = []
    decodes = list(decodes)
    for m in methods:
        for dec in decodes:
            for setting in (settings if dec.name != "dense" else ["aware"]):
                for t in tasks:
                    if t == "perplexity" and dec.name != "dense":
                        continue
                    for h in haystacks:
                        for n in lengths:
                            for d in ((0.5,) if t in DEPTHLESS + ("perplexity",) else depths):
                                jobs.extend(Job(t, h, n, d, s, m, dec, setting) for s in seeds)
    return jobs


def row_key(row: dict) -> tuple:
    return tuple(row[k] if k not in KEY_DEFAULTS else row.get(k, KEY_DEFAULTS[k]) for k in KEY_FIELDS)


def finished(out: Path) -> set[tuple]:
    """Keys of the rows already in ``out`` (a torn last line from a killed run is ignored)."""
    keys = set()
    if out.exists():
        for line in out.read_text().splitlines():
            try:
                keys.add(row_key(json.loads(line)))
            except (json.JSONDecodeError, KeyError):
                continue
    return keys


def rows_of(jobs: list[Job], out: Path, *, model_name: str, dtype: torch.dtype) -> list[dict]:
    """The rows of ``out`` that belong to ``jobs`` (the last one when a key repeats)."""
    from longattn.eval.report import load_rows

    name = str(dtype).replace("torch.", "")
    wanted = {row_key(_key_row(j, model_name, name)) for j in jobs}
    latest = {row_key(r): r for r in load_rows([out]) if row_key(r) in wanted}
    return list(latest.values())


def run(jobs: list[Job], model, tokenizer, out: Path, *, model_name: str, impl: str = "auto",
        progress: bool = True, environment: dict | None = None) -> list[dict]:
    """Run the jobs not yet in ``out``, appending a row per job; returns the new rows."""
    from tqdm.auto import tqdm

    dtype = str(model.dtype).replace("torch.", "")
    done = finished(out)
    todo = [j for j in jobs if row_key(_key_row(j, model_name, dtype)) not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(total=len(todo), disable=not progress, desc="eval", unit="sample")
    with open_append(out) as f:
        for method, decode in dict.fromkeys((j.method, j.decode) for j in todo):
            with applied(model, method, impl, decode=decode) as handle:
                for job in (j for j in todo if (j.method, j.decode) == (method, decode)):
                    bar.set_postfix_str(f"{method.label} {decode.label} {job.task} {job.length} d={job.depth}")
                    row = _key_row(job, model_name, dtype) | run_one(job, model, tokenizer, handle)
                    row |= environment or {}
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    rows.append(row)
                    bar.update()
    bar.close()
    return rows


def _key_row(job: Job, model_name: str, dtype: str) -> dict:
    return {"task": job.task, "haystack": job.haystack, "length": job.length, "depth": job.depth, "seed": job.seed,
            "method": job.method.label, "decode": job.decode.label, "kv_setting": job.setting, "model": model_name,
            "dtype": dtype}


@torch.no_grad()
def run_one(job: Job, model, tokenizer, handle) -> dict:
    """Prefill (timed, peak memory), greedy decode, score; density from what the patch recorded.

    ``handle``: the ``Patched`` handle from ``applied`` (a bare ``PatchState`` still works for dense decoding). With
    a decode policy the prompt goes into ``handle.cache()``. Decode fields: ``kv_bytes_gpu`` / ``kv_bytes_cpu``
    (everything the cache holds per side after prefill + compression; ``*_max``: the max over that point and every
    decode step), ``kv_bytes_kept`` (the key/value payload after prefill + compression), ``kv_bytes_dense`` (what
    a dense cache holds for the prompt, computed from the shapes), ``compression`` = dense / kept,
    ``kv_read_fraction`` (query-aware policies only, else None: the selected slots plus what choosing them read),
    ``kv_scoring_fraction`` (that choosing part alone), ``decode_ms_per_token`` and ``tokens_per_s``
    (decoding steps only, timed per step around the model call)."""
    state = getattr(handle, "state", handle)
    if job.decode.name != "dense" and getattr(state, "policy", None) is None:
        raise ValueError(f"decode: job asks for {job.decode.label!r} but the model was patched without a policy")
    if job.task == "perplexity":
        return _perplexity_row(job, model, tokenizer, state)
    sample = make_sample(tokenizer, job.task, job.length, job.depth, seed=job.seed, haystack=job.haystack)
    device = next(model.parameters()).device
    ids = tokenizer(sample.prompt, return_tensors="pt").input_ids.to(device)
    agnostic = job.setting == "agnostic"
    split = _context_tokens(tokenizer, sample, ids) if agnostic else ids.shape[1]
    cache = handle.cache(auto_compress=not agnostic) if job.decode.name != "dense" else None
    if cache is not None and state.policy.budget is not None:
        try:  # a compression target above the context is no measurement: the row says so and stays finished
            state.policy.check_budget(state.policy.budget, split)
        except ValueError as e:
            return {"family": job.method.family, "config": job.method.knobs, "decode_config": job.decode.knobs,
                    "tokens": ids.shape[1], "correct": None, "skipped": str(e)}
    state.clear_densities()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        kwargs = cache_kwargs(model, cache) if cache is not None else {}
        out = model(ids[:, :split], use_cache=True, logits_to_keep=1, **kwargs)
        if agnostic:  # compress what the context left, then let the question in
            cache = output_cache(out)
            cache.compress()
            out = model(ids[:, split:], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
        _sync(device)
        prefill_ms = (time.perf_counter() - start) * 1e3
    densities = list(state.densities)
    cache, token = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
    held = held_bytes(cache)
    dense = dense_bytes(cache, ids.shape[1])
    peak = {"gpu": held["gpu"], "cpu": held["cpu"]}
    generated = [token]
    decode_s = 0.0
    with ReadMeter(getattr(state, "policy", None)) as meter:
        for _ in range(sample.max_new_tokens - 1):
            if int(token) == tokenizer.eos_token_id:
                break
            start = time.perf_counter()
            out = model(token, use_cache=True, **cache_kwargs(model, cache))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            decode_s += time.perf_counter() - start
            generated.append(token)
            meter.flush()
            now = held_bytes(cache)
            peak = {k: max(v, now[k]) for k, v in peak.items()}
    steps = len(generated) - 1
    text = tokenizer.decode(torch.cat(generated, 1)[0], skip_special_tokens=True)
    return {
        "family": job.method.family,
        "config": job.method.knobs,
        "decode_config": job.decode.knobs,
        "tokens": ids.shape[1],
        "density": sum(densities) / len(densities) if densities else 1.0,
        "correct": score(sample, text),
        "answers": list(sample.answers),
        "output": text[:200],
        "prefill_ms": round(prefill_ms, 1),
        "decode_ms_per_token": round(decode_s * 1e3 / max(1, steps), 2),
        "tokens_per_s": round(steps / decode_s, 1) if steps and decode_s > 0 else None,
        "kv_bytes_gpu": held["gpu"],
        "kv_bytes_cpu": held["cpu"],
        "kv_bytes_gpu_max": peak["gpu"],
        "kv_bytes_cpu_max": peak["cpu"],
        "kv_bytes_kept": held["kv"],
        "kv_bytes_dense": dense,
        "compression": round(dense / held["kv"], 4) if held["kv"] else None,
        "kv_read_fraction": None if meter.fraction is None else round(meter.fraction, 4),
        "kv_scoring_fraction": None if meter.scoring_fraction is None else round(meter.scoring_fraction, 4),
        "peak_mem_mb": None if mem.peak_mb is None else round(mem.peak_mb, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def _context_tokens(tokenizer, sample, ids: torch.Tensor) -> int:
    """How many of the prompt's tokens ``ids`` are its context: the context tokenised alone, as far as it agrees
    with the prompt's own tokens (so both settings feed the model the same ids); the question keeps at least one."""
    if not sample.question:
        raise ValueError(f"kv_setting: task {sample.task!r} has no separate question; run it question-aware")
    alone = tokenizer(sample.context, return_tensors="pt").input_ids[0].to(ids.device)
    n = min(len(alone), ids.shape[1] - 1)
    agree = (alone[:n] == ids[0, :n]).long()
    return int(agree.cumprod(0).sum())


def _perplexity_row(job: Job, model, tokenizer, state) -> dict:
    device = next(model.parameters()).device
    ids = text_ids(tokenizer, job.length, job.haystack).to(device)
    state.clear_densities()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        ppl = perplexity(model, ids)
        _sync(device)
        ms = (time.perf_counter() - start) * 1e3
    return {"family": job.method.family, "config": job.method.knobs, "tokens": ids.shape[1],
            "density": sum(state.densities) / len(state.densities) if state.densities else 1.0, "correct": None,
            "perplexity": round(ppl, 4), "prefill_ms": round(ms, 1), "decode_ms_per_token": None,
            "peak_mem_mb": None if mem.peak_mb is None else round(mem.peak_mb, 1),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
