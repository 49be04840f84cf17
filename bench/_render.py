"""Markdown tables for BENCHMARKS.md from a bench/run_all.py results JSON.

Each bench's table lives between `<!-- run_all:<bench> begin -->` and `<!-- run_all:<bench> end -->`
in BENCHMARKS.md; rendering rewrites only those blocks, and only for benches the results hold.
"""
from __future__ import annotations

import re
from typing import Any, Callable


def _f(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}"


def provenance(results: dict[str, Any], name: str) -> str:
    bench = results["benches"][name]
    m = results["machine"]
    load = m.get("loadavg_start"), m.get("loadavg_end")
    dirty = " (with uncommitted changes)" if results.get("dirty") else ""
    return (f"_Rendered from `bench/run_all.py --scale {results['scale']}` at commit `{results['commit'][:7]}`"
            f"{dirty}, {results['started_at']}; {m.get('cpus')} CPUs ({m.get('cpu_model')}), load average "
            f"{load[0]} at the start and {load[1]} at the end; the bench ran {bench['seconds']:.0f} s. "
            f"Command: `{' '.join(bench['command'])}`._")


STEP_ORDER = ("setup", "read", "tokenise", "batching", "padding", "forward", "spacy", "augmentation", "arrow",
              "process", "write: parquet", "write: hash", "write: marker", "write: the rest")


def _step_rank(step: str) -> int:
    """Steps in the order a shard goes through them (JSON files keep keys sorted by name)."""
    return next((i for i, prefix in enumerate(STEP_ORDER) if step.lower().startswith(prefix)), len(STEP_ORDER))


def render_label_profile(r: dict[str, Any]) -> str:
    """`bench/label.py --profile`: ratios to the fair loop and where the stage's time goes."""
    p, ratio, t = r["profile"], r["profile"]["ratios"], r["profile"]["stage_timing"]
    n = r["sentences"]
    fair = ", ".join(f"{x:.1f} s" for x in p["fair_seconds_runs"])
    out = [f"{n:,} SST-2 sentences, token budget {r['settings']['token_budget']}, {r['settings']['rows_per_shard']} "
           f"rows per shard, 1 actor with {r['settings']['num_cpus']:g} CPUs; load average {r['loadavg'][0]} → "
           f"{r['loadavg'][1]}.", "",
           "| measure | value | goal |", "|---|---|---|",
           f"| fair bare loop (before, after the stage) | {fair} → {_f(n / p['fair_seconds'])} sentences/s | |",
           f"| label stage wall (whole run with `ray.init`: {p['whole_run_seconds']:.1f} s) | {p['stage_seconds']:.1f} s "
           f"→ {_f(n / p['stage_seconds'])} sentences/s | |",
           f"| stage wall ÷ fair bare loop | **{_f(ratio['stage_over_fair'], 2)}** | ≥ 0.95 |",
           f"| stage model time ÷ fair bare loop | **{_f(ratio['model_time_over_fair'], 2)}** | |",
           f"| whole run ÷ fair bare loop | {_f(ratio['whole_run_over_fair'], 2)} | |",
           f"| fp32 matmul now (FLOP ceiling, {p['flops_per_token'] / 1e6:.1f} MFLOP/token) | "
           f"{sum(p['matmul_gflops_runs']) / 2:.1f} GFLOP/s = {p['token_ceiling_per_s']:.0f} tokens/s | |",
           f"| useful tokens/s ÷ ceiling: fair loop, stage wall | {_f(ratio['fair_tokens_over_ceiling'], 2)}, "
           f"{_f(ratio['stage_tokens_over_ceiling'], 2)} | ≥ 0.85 |", "",
           "| label stage wall, from the run's manifest `timing` | seconds | share |", "|---|---|---|"]
    parts = [("actor setup (imports, model load)", t.get("slowest_setup_seconds", 0.0)),
             ("model time (`process`: tokenise, batch, forward, Arrow)", t.get("compute_seconds", 0.0)),
             ("shard write (Parquet, hash, marker)", t.get("write_seconds", 0.0)),
             ("the rest: process start, shard hand-off, scheduling", t.get("rest_seconds", 0.0))]
    out += [f"| {k} | {v:.1f} | {100 * v / p['stage_seconds']:.0f}% |" for k, v in parts]
    ip = p["in_process"]
    out += ["", f"In-process breakdown of the same stage code ({ip['rows']} sentences, {ip['batches']} batches, "
            f"{ip['wall_seconds']:.1f} s, no Ray):", "", "| step | seconds | share | ms per batch |", "|---|---|---|---|"]
    batches = max(ip["batches"], 1)
    out += [f"| {k} | {v:.3f} | {100 * v / ip['wall_seconds']:.1f}% | {1000 * v / batches:.1f} |"
            for k, v in sorted(ip["breakdown"].items(), key=lambda kv: _step_rank(kv[0]))]
    return "\n".join(out)


def render_label(r: dict[str, Any]) -> str:
    if r.get("bench") == "label_profile":
        return render_label_profile(r)
    rate, ratio = r["sentences_per_s"], r["ratios"]
    rows = [("kdpipe `read → label` on Ray, label stage wall time (actor start-up included)", rate["stage"]),
            ("the same, whole run including `ray.init`", rate["whole_run"]),
            ("the label stage's model time only (sum over shards)", rate["stage_model_time"]),
            ("fair bare loop: same model, the stage's length-sorted token-budget batches, no Ray/Parquet",
             rate["fair"]),
            ("naive bare loop: batches of 64 in corpus order (reference only)", rate["naive"]),
            ("`transformers.pipeline`, default batching", rate["pipeline"])]
    out = [f"{r['sentences']:,} SST-2 sentences, token budget {r['settings']['token_budget']}, "
           f"{r['settings']['rows_per_shard']} rows per shard, {r['settings']['concurrency']} actor with "
           f"{r['settings']['num_cpus']:g} CPUs.", "", "| method | sentences/s |", "|---|---|"]
    out += [f"| {name} | {_f(v)} |" for name, v in rows]
    out += ["", "| ratio | measured | goal |", "|---|---|---|",
            f"| stage wall ÷ fair bare loop | **{_f(ratio['stage_over_fair'], 2)}** | ≥ 0.95 |",
            f"| stage model time ÷ fair bare loop | {_f(ratio['model_time_over_fair'], 2)} | |",
            f"| whole run (with `ray.init`) ÷ fair bare loop | {_f(ratio['whole_run_over_fair'], 2)} | |",
            f"| stage ÷ `pipeline()` | {_f(ratio['stage_over_pipeline'], 2)} | ≥ 1.5 |"]
    out.append(f"\nLogits on disk: {r['logits_bytes_per_row']} bytes/row ({r['logits_dtype']}, zstd).")
    if r.get("topk"):
        t = r["topk"]
        out.append(f"Top-{t['k']} targets (tiny T5, {t['rows']} sentences): {t['bytes_per_token']} bytes/token.")
    return "\n".join(out)


def render_augment(r: dict[str, Any]) -> str:
    n = r["sentences"]
    raw, bare = r["raw_tagging_seconds"], r["raw_tagging_seconds"] + r["bare_augment_seconds"]
    out = [f"{n:,} SST-2 sentences, n_iter {r['settings']['n_iter']}, {r['settings']['shards']} shards.", "",
           "| method | sentences/s | seconds |", "|---|---|---|",
           f"| raw `nlp.pipe` tagging, 1 process | {_f(n / raw)} | {_f(raw)} |",
           f"| bare chain: tagging + unigram counts + augmentation, 1 process | {_f(n / bare)} | {_f(bare)} |"]
    for w, run in r["runs"].items():
        st = run["stages"]
        parts = ", ".join(f"{k} {v['seconds']:.1f}" for k, v in st.items())
        out.append(f"| kdpipe end to end, {w} worker(s) ({parts}) | {_f(n / run['seconds'])} | {_f(run['seconds'])} |")
    names = {"pos_tag_1w_over_raw_pipe": ("pos_tag stage, 1 worker ÷ raw `nlp.pipe`", ""),
             "chain_1w_over_raw_pipe": ("whole chain, 1 worker ÷ raw `nlp.pipe`", "≥ 0.8"),
             "chain_1w_over_bare_chain": ("whole chain, 1 worker ÷ bare chain", ""),
             "chain_2w_over_1w": ("whole chain, 2 workers ÷ 1 worker", "≥ 1.7"),
             "chain_2w_over_2x1w": ("whole chain, 2 workers ÷ (2 × 1 worker)", ""),
             "pos_tag_2w_over_1w": ("pos_tag stage, 2 workers ÷ 1 worker", "")}
    out += ["", "| ratio | measured | goal |", "|---|---|---|"]
    out += [f"| {names.get(k, (k, ''))[0]} | {_f(v, 2)} | {names.get(k, (k, ''))[1]} |" for k, v in r["ratios"].items()]
    out += ["", "| stage, from `manifest.json` `timing` (workers) | wall | actor setup (slowest) | model | write |",
            "|---|---|---|---|---|"]
    for w, run in r["runs"].items():
        for name in ("pos_tag", "augment"):
            st = run["stages"].get(name, {})
            if "compute_seconds" in st:
                out.append(f"| {name} ({w}) | {st['seconds']:.1f} | {st.get('slowest_setup_seconds', 0):.1f} | "
                           f"{st['compute_seconds']:.1f} | {st['write_seconds']:.1f} |")
    for name, prof in (r.get("profile") or {}).items():
        if prof.get("breakdown"):
            out += ["", f"In-process {name} ({prof['wall_seconds']:.1f} s, no Ray): " + ", ".join(
                f"{k} {v:.2f} s" for k, v in sorted(prof["breakdown"].items(), key=lambda kv: _step_rank(kv[0]))) + "."]
    return "\n".join(out)


def render_train(r: dict[str, Any]) -> str:
    return "\n".join([
        f"{r['rows']:,} synthetic rows in {r['shards']} shards, BiLSTM `{r['model']}`, batch {r['batch_size']}, "
        f"{r['threads']} thread(s), best of {r['repeat']} alternating runs.", "",
        "| bare loop, the stage's batches (ex/s) | train stage (ex/s) | ratio | goal |", "|---|---|---|---|",
        f"| {_f(r['best_bare_examples_per_s'])} | {_f(r['best_stage_examples_per_s'])} | "
        f"**{_f(r['ratio_stage_over_bare'], 2)}** | ≥ 0.9 |"])


def render_sst2_kd(r: dict[str, Any]) -> str:
    res = r["results"]
    t = res["teacher"]
    out = [f"Training subset {r['rows']:,} rows, seeds {r['seeds']}, n_iter {r['n_iter']}; SST-2 dev "
           f"({r['dev_rows']} sentences).", "",
           "| model | dev accuracy (mean ± std) | params | sentences/s | speed-up vs teacher |", "|---|---|---|---|---|",
           f"| teacher | {100 * t['accuracy']:.2f} | {t['parameters']:,} | {_f(t['sentences_per_s'])} | 1.0× |"]
    for key, label in (("student_kd_aug", "BiLSTM, KD + augmentation"), ("student_kd", "BiLSTM, KD"),
                       ("student_nokd", "BiLSTM, no KD")):
        s = res[key]
        out.append(f"| {label} | {100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_std']:.2f} | "
                   f"{s['parameters']:,} | {_f(s['sentences_per_s'])} | {_f(s['speedup'])}× |")
    gap = res.get("gap_closed")
    out.append(f"\nShare of the teacher–student gap closed by KD + augmentation: "
               f"{'n/a' if gap is None else f'{100 * gap:.0f}%'}.")
    return "\n".join(out)


def render_multi30k_seqkd(r: dict[str, Any]) -> str:
    seeds = len(r.get("seeds") or [0])
    out = [f"Teacher on {r['teacher_pairs']:,} pairs, students on {r['train_pairs']:,}; learning rate chosen per "
           f"student from {', '.join(f'{lr:g}' for lr in r['lr_grid'])} by greedy BLEU on {r['val_rows']:,} "
           f"validation sentences (seed 0), then {seeds} seed(s) at that rate; {r['test_rows']:,} test sentences; "
           f"beam {r['beams']} (teacher checkpoint: {r['teacher_checkpoint_num_beams']}, labels: "
           f"{r.get('label_num_beams')})"
           f"{'; tiny models: a smoke run, not a result' if r.get('tiny') else ''}.", "",
           "| model | decode | lr | params | BLEU (mean ± sd) | chrF (mean ± sd) | sentences/s | speed vs teacher beam |",
           "|---|---|---|---|---|---|---|---|"]
    for m in r["models"]:
        lr = f"{m['lr']:g}" if "lr" in m else "-"
        out.append(f"| {m['name']} | {m['decode']} | {lr} | {m['parameters']:,} | {m['bleu_mean']:.2f} ± "
                   f"{m['bleu_sd']:.2f} | {m['chrf_mean']:.1f} ± {m['chrf_sd']:.1f} | "
                   f"{_f(sorted(m['sentences_per_s'])[len(m['sentences_per_s']) // 2])} | "
                   f"{m['speedup_vs_teacher_beam']:.1f}× |")
    out += ["", "| student | " + " | ".join(f"val BLEU @ {lr:g}" for lr in r["lr_grid"]) + " | chosen |",
            "|---|" + "---|" * (len(r["lr_grid"]) + 1)]
    for name, scores in r["validation_bleu"].items():
        out.append(f"| {name} | " + " | ".join(f"{scores[f'{lr:g}']:.2f}" for lr in r["lr_grid"]) +
                   f" | {r['chosen_lr'][name]:g} |")
    return "\n".join(out)


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "label": render_label, "augment": render_augment, "train": render_train,
    "sst2_kd": render_sst2_kd, "multi30k_seqkd": render_multi30k_seqkd}


def block_re(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- run_all:{re.escape(name)} begin -->\n).*?(<!-- run_all:{re.escape(name)} end -->)",
                      re.DOTALL)


def render_into(text: str, results: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """(new text, benches rendered, benches with results but no block in the text)."""
    done, missing = [], []
    for name, bench in results["benches"].items():
        if bench.get("result") is None or name not in RENDERERS:
            continue
        pattern = block_re(name)
        if not pattern.search(text):
            missing.append(name)
            continue
        body = f"{provenance(results, name)}\n\n{RENDERERS[name](bench['result'])}\n"
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
        done.append(name)
    return text, done, missing
