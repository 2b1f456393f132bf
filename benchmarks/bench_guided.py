"""Guided decoding's cost: native decode tok/s with and without a JSON schema, same engine, same run.

Every sequence generates exactly `--new` tokens either way: the unguided run ignores eos, and the
guided run's schema (an array of at least `--min-items` strings of at most 16 characters) cannot be
complete within `--new` tokens, so it runs to max_tokens too, spending most steps inside strings,
where the mask allows the most tokens. Decode tok/s is timed from the step in which every sequence
has its first token. Unguided and guided runs alternate `--repeats` times on one engine and the best
of each is kept; the mask's own time (EngineStats.guided_mask_seconds_total) is reported per decode
step. Target: guided at most 15 % slower than unguided at batch 8. The last stdout line is one JSON
object.

    python benchmarks/bench_guided.py                            # SmolLM2-135M and tiny-hybrid, batch 1 and 8
    python benchmarks/bench_guided.py --native-threads 1         # one compute thread (2 cores shared)
    python benchmarks/bench_guided.py --models tiny-hybrid --new 32 --repeats 1   # smoke
"""
from __future__ import annotations

import argparse
import json
import time

TARGET_RATIO = 0.85  # guided tok/s over unguided tok/s at batch 8: at most 15 % slower


def _engine(model_name: str, batch: int, new: int):
    from transformers import AutoTokenizer

    from hybridserve.engine import EngineConfig, LLMEngine
    from hybridserve.models.builtin import materialize
    from hybridserve.models.loader import load_model

    path = materialize(model_name)
    tok = AutoTokenizer.from_pretrained(str(path))
    cfg = EngineConfig(max_context=256 + new, max_num_seqs=batch, max_num_batched_tokens=2048, block_size=16,
                       cache_memory_gb=0.25, enable_prefix_caching=False)
    return LLMEngine(load_model(path), tok, cfg, name=model_name), tok


def _prompts(tok, batch: int) -> list[list[int]]:
    asks = [f"List {10 + i} city names as a JSON array of strings." for i in range(batch)]
    if tok.chat_template is None:
        return [tok.encode(a) for a in asks]
    texts = [tok.apply_chat_template([{"role": "user", "content": a}], add_generation_prompt=True, tokenize=False)
             for a in asks]
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def decode_run(engine, prompts: list[list[int]], params) -> tuple[float, int, int]:
    """(decode seconds, decode tokens, decode steps) of one batch run to completion."""
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", p, params)
    started: set[str] = set()
    t0, tokens, steps, lengths = None, 0, 0, []
    while engine.has_unfinished():
        outs = engine.step()
        if t0 is not None:
            tokens += sum(len(o.delta_token_ids) for o in outs)
            steps += 1
        started |= {o.request_id for o in outs}
        lengths += [len(o.token_ids) for o in outs if o.finished]
        if t0 is None and len(started) == len(prompts):
            t0 = time.perf_counter()
    if len(set(lengths)) != 1:
        raise RuntimeError(f"sequences generated different lengths {sorted(set(lengths))}: not comparable")
    return time.perf_counter() - t0, tokens, steps


def point(model_name: str, batch: int, a) -> dict:
    from hybridserve.engine import SamplingParams
    from hybridserve.engine.guided import GuidedSpec

    engine, tok = _engine(model_name, batch, a.new)
    prompts = _prompts(tok, batch)
    schema = {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": a.min_items,
              "maxItems": 4 * a.min_items}
    plain = SamplingParams(max_tokens=a.new, temperature=0.0, ignore_eos=True)
    guided = SamplingParams(max_tokens=a.new, temperature=0.0, guided=GuidedSpec.json_schema(schema))
    decode_run(engine, prompts[:1], SamplingParams(max_tokens=4, temperature=0.0, guided=guided.guided))  # warm-up
    best = {"unguided": 0.0, "guided": 0.0}
    mask_s_per_step = []
    for _ in range(a.repeats):
        for name, params in (("unguided", plain), ("guided", guided)):
            mask0 = engine.stats().guided_mask_seconds_total
            secs, tokens, steps = decode_run(engine, prompts, params)
            best[name] = max(best[name], tokens / secs)
            if name == "guided":
                mask_s_per_step.append((engine.stats().guided_mask_seconds_total - mask0) / max(1, steps + 1))
            print(f"  {model_name} B={batch} {name:<8} {tokens / secs:8.1f} tok/s ({tokens} tokens, {secs:.2f} s)",
                  flush=True)
    return {"model": model_name, "batch": batch, "unguided_tok_s": best["unguided"], "guided_tok_s": best["guided"],
            "ratio": best["guided"] / best["unguided"], "mask_ms_per_step": 1e3 * min(mask_s_per_step)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m-instruct,tiny-hybrid")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new", type=int, default=64, help="tokens generated per sequence")
    ap.add_argument("--min-items", type=int, default=200, help="the schema's minItems (beyond reach of --new)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--native-threads", type=int, default=None, help="torch compute threads")
    a = ap.parse_args()
    import torch

    if a.native_threads:
        torch.set_num_threads(a.native_threads)
    print(f"guided decoding cost: {torch.get_num_threads()} thread(s), {a.new} tokens per sequence, "
          f"best of {a.repeats} alternating repeats", flush=True)
    rows = [point(m, int(b), a) for m in a.models.split(",") for b in a.batches.split(",")]
    print(f"\n{'model':<24}{'B':>3} | {'unguided tok/s':>14} | {'guided tok/s':>12} | {'ratio':>5} | "
          f"{'mask ms/step':>12}")
    for r in rows:
        print(f"{r['model']:<24}{r['batch']:>3} | {r['unguided_tok_s']:>14.1f} | {r['guided_tok_s']:>12.1f} | "
              f"{r['ratio']:>5.2f} | {r['mask_ms_per_step']:>12.3f}")
    top = max(int(b) for b in a.batches.split(","))
    verdicts = {}
    for r in rows:
        if r["batch"] == top:
            verdicts[r["model"]] = r["ratio"] >= TARGET_RATIO
            print(f"{r['model']} batch {top}: guided/unguided {r['ratio']:.2f} vs target >= {TARGET_RATIO} "
                  f"(ratio to target {r['ratio'] / TARGET_RATIO:.2f}): {'PASS' if verdicts[r['model']] else 'FAIL'}")
    print(json.dumps({"bench": "guided_decoding", "threads": torch.get_num_threads(), "new_tokens": a.new,
                      "rows": rows, "target_ratio_at_top_batch": TARGET_RATIO, "pass": all(verdicts.values())}))
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
