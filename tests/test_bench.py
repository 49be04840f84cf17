"""bench/: one meaning of --scale everywhere, --json in every bench, run_all's selection and the
rendering of BENCHMARKS.md blocks. Arguments and text only: no timings, nothing is benchmarked."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import _env  # noqa: E402
import run_all  # noqa: E402
from _render import render_into  # noqa: E402


def test_scale_is_a_fraction_and_a_row_count_names_the_fix():
    assert _env.scale_fraction("0.01") == 0.01 and _env.scale_fraction("1") == 1.0
    for bad in ("0", "-0.5", "1.5", "abc"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"\(0, 1\]"):
            _env.scale_fraction(bad)
    with pytest.raises(argparse.ArgumentTypeError, match=r"--scale 0\.02"):
        _env.scale_fraction("2000", full_rows=100_000)
    assert _env.scaled(67_349, 0.075) == 5051 and _env.scaled(100, 1e-9) == 1 and _env.scaled(100, 1.0) == 100


def test_label_bench_takes_a_fraction():
    import label

    args = label.parse_args(["--scale", "0.01", "--json", "x.json"])
    assert args.scale == 0.01 and args.json == Path("x.json")
    with pytest.raises(SystemExit) as e:
        label.parse_args(["--scale", "2000"])
    assert e.value.code == 2


@pytest.mark.parametrize("script", sorted(s for _, (s, _) in run_all.BENCHES.items()))
def test_every_bench_documents_scale_as_a_fraction_and_takes_json(script):
    out = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "--json" in text and "fraction in (0, 1] of the full-size run" in text
    bad = subprocess.run([sys.executable, str(BENCH / script), "--scale", "5"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "fraction in (0, 1]" in bad.stderr


def test_run_all_selection_and_arguments(tmp_path):
    assert run_all.select(None, None) == list(run_all.BENCHES)
    assert run_all.select("augment,label", None) == ["label", "augment"]  # run order, not given order
    assert run_all.select(None, "sst2_kd,multi30k_seqkd,storage,lm_distill") == ["train", "label", "augment"]
    with pytest.raises(SystemExit, match="unknown bench"):
        run_all.select("lable", None)
    cmd = run_all.command("label", 0.05, tmp_path / "l.json", tmp_path)
    assert cmd[1].endswith("bench/label.py") and cmd[2:6] == ["--scale", "0.05", "--json", str(tmp_path / "l.json")]
    with pytest.raises(SystemExit):
        run_all.parse_args(["--scale", "0.05"])  # no --out
    with pytest.raises(SystemExit):
        run_all.parse_args(["--scale", "20", "--out", "r.json"])


def test_run_all_scales_storage_plan_and_seeds_with_the_scale(tmp_path):
    cmd = run_all.command("storage", 0.05, tmp_path / "s.json", tmp_path)
    assert cmd[cmd.index("--plan-rows") + 1] == "50000" and cmd[cmd.index("--plan-shards") + 1] == "50"
    assert cmd[cmd.index("--rounds") + 1] == "2"
    full = run_all.command("storage", 1.0, tmp_path / "s.json", tmp_path)
    assert full[full.index("--plan-rows") + 1] == "1000000" and full[full.index("--plan-shards") + 1] == "1000"
    for name in run_all.SEEDED:
        small, big = (run_all.command(name, s, tmp_path / "x.json", tmp_path) for s in (0.05, 1.0))
        assert small[small.index("--seeds") + 1] == "2" and big[big.index("--seeds") + 1] == "3"
        assert small[small.index("--workdir") + 1] == str(tmp_path / name)  # removed with run_all's temp dir
    # every option run_all passes is one the bench documents in its --help
    for name in run_all.BENCHES:
        cmd = run_all.command(name, 0.05, tmp_path / "x.json", tmp_path)
        out = subprocess.run([cmd[0], cmd[1], "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert out.returncode == 0, (name, out.stderr)
        assert not [a for a in cmd[2:] if a.startswith("--") and a not in out.stdout], name


def fake_results() -> dict:
    label = {"sentences": 5051, "settings": {"token_budget": 8192, "rows_per_shard": 1000, "concurrency": 1,
                                             "num_cpus": 2.0},
             "sentences_per_s": {"stage": 150.0, "whole_run": 120.0, "stage_model_time": 190.0, "fair": 200.0,
                                 "naive": 140.0, "pipeline": 90.0},
             "ratios": {"stage_over_fair": 0.75, "model_time_over_fair": 0.95, "whole_run_over_fair": 0.6,
                        "stage_over_naive": 1.07, "stage_over_pipeline": 1.67},
             "logits_bytes_per_row": 10.25, "logits_dtype": "float32", "topk": None}
    train = {"rows": 4000, "shards": 4, "model": "small", "batch_size": 32, "threads": 1, "repeat": 3,
             "best_bare_examples_per_s": 1800.0, "best_stage_examples_per_s": 1710.0, "ratio_stage_over_bare": 0.95}
    return {"commit": "0123456789abcdef", "dirty": False, "scale": 0.05, "started_at": "2026-12-07 01:00 UTC",
            "machine": {"cpus": 2, "cpu_model": "AMD EPYC", "loadavg_start": 5.1, "loadavg_end": 6.2},
            "versions": {}, "benches": {
                "label": {"command": ["bench/label.py", "--scale", "0.05"], "returncode": 0, "seconds": 80, "result": label},
                "train": {"command": ["bench/train.py", "--scale", "0.05"], "returncode": 0, "seconds": 20, "result": train},
                "augment": {"command": ["bench/augment.py", "--scale", "0.05"], "returncode": 1, "seconds": 3,
                            "result": None}}}


def test_render_rewrites_only_marked_blocks_of_benches_with_results():
    text = ("# Benchmarks\nintro stays\n<!-- run_all:label begin -->\nold label table\n<!-- run_all:label end -->\n"
            "between stays\n<!-- run_all:augment begin -->\nold augment table\n<!-- run_all:augment end -->\n")
    new, done, missing = render_into(text, fake_results())
    assert done == ["label"] and missing == ["train"]  # augment failed: its block is left alone
    assert "old label table" not in new and "old augment table" in new
    assert new.startswith("# Benchmarks\nintro stays\n") and "between stays\n" in new
    assert "| stage wall ÷ fair bare loop | **0.75** | ≥ 0.95 |" in new
    assert "commit `0123456`" in new and "load average 5.1" in new and "`bench/label.py --scale 0.05`" in new
    again, _, _ = render_into(new, fake_results())
    assert again == new  # idempotent


def test_benchmarks_md_blocks_are_balanced():
    text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    for name in run_all.BENCHES:
        assert text.count(f"<!-- run_all:{name} begin -->") == text.count(f"<!-- run_all:{name} end -->") <= 1


def test_label_profile_renders_ratios_and_the_breakdown_in_shard_order():
    from _render import render_label

    profile = {"fair_seconds_runs": [30.0, 34.0], "fair_seconds": 32.0, "stage_seconds": 64.0, "whole_run_seconds": 70.0,
               "flops_per_token": 2.17e7, "matmul_gflops_runs": [10.0, 12.0], "token_ceiling_per_s": 500.0,
               "ratios": {"stage_over_fair": 0.5, "model_time_over_fair": 0.6, "whole_run_over_fair": 0.46,
                          "fair_tokens_over_ceiling": 0.8, "stage_tokens_over_ceiling": 0.4},
               "stage_timing": {"slowest_setup_seconds": 8.0, "compute_seconds": 53.0, "write_seconds": 1.0,
                                "rest_seconds": 2.0},
               "in_process": {"rows": 100, "batches": 2, "wall_seconds": 10.0,
                              "breakdown": {"write: hash": 0.1, "forward": 9.0, "tokenise": 0.5, "setup (model load)": 0.4}}}
    r = {"bench": "label_profile", "sentences": 5051, "loadavg": [30.1, 40.2],
         "settings": {"token_budget": 8192, "rows_per_shard": 1000, "num_cpus": 2.0}, "profile": profile}
    text = render_label(r)
    assert "| stage wall ÷ fair bare loop | **0.50** | ≥ 0.95 |" in text and "load average 30.1 → 40.2" in text
    assert "| actor setup (imports, model load) | 8.0 | 12% |" in text
    steps = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "ms per batch" not in line]
    assert steps[-4:] == ["setup (model load)", "tokenise", "forward", "write: hash"]


def test_multi30k_picks_each_students_rate_on_validation_from_one_grid():
    import multi30k_seqkd as m

    assert m.select_lr({5e-4: 10.0, 1e-3: 12.5, 2e-3: 3.0}) == 1e-3
    assert m.select_lr({2e-3: 7.0, 5e-4: 7.0}) == 5e-4  # a tie goes to the smaller rate
    with pytest.raises(ValueError, match="no validation scores"):
        m.select_lr({})
    raw = yaml.safe_load((REPO / "manifests" / "multi30k-seqkd.yaml").read_text(encoding="utf-8"))
    runs = [(s, lr, 0) for s in m.STUDENTS for lr in (5e-4, 2e-3)] + [("student_wordkd", 2e-3, 2)]
    out = m.with_runs(raw, runs)
    stages = {s["name"]: s for s in out["stages"]}
    assert not set(m.STUDENTS) & set(stages) and not any(s["type"] == "evaluate" for s in out["stages"])
    for student, lr, seed in runs:
        spec = stages[m.run_name(student, lr, seed)]
        assert spec["config"]["train"]["lr"] == lr and spec["config"]["seed"] == seed
        assert spec["config"]["target"] == {s["name"]: s for s in raw["stages"]}[student]["config"]["target"]
    assert raw["stages"][-1]["type"] == "evaluate"  # the template itself is untouched
    args = m.parse_args(["--lrs", "2e-3,1e-3", "--beams", "3"])
    assert args.lrs == [1e-3, 2e-3] and args.beams == 3
    with pytest.raises(SystemExit):
        m.parse_args(["--lrs", "fast"])


def fake_sst2() -> dict:
    def student(acc, params, speed, **extra):
        return {"accuracy_mean": acc, "accuracy_std": 0.01, "accuracies": [acc], "parameters": params,
                "sentences_per_s": speed, "speedup": speed / 70.0, **extra}

    return {"bench": "sst2_kd", "scale": 0.4, "rows": 2000, "seeds": [0], "n_iter": 10, "variants": ["cnn"],
            "results": {"teacher": {"accuracy": 0.85, "parameters": 22_713_986, "sentences_per_s": 70.0},
                        "student_kd_aug": student(0.78, 2_818_802, 2500.0), "student_kd": student(0.70, 2_793_302, 2500.0),
                        "student_nokd": student(0.65, 2_793_302, 2500.0),
                        "variant_cnn": student(0.80, 2_000_000, 9000.0, label="CNN (Kim 2014), MSE", gap_closed=0.75),
                        "gap_closed": 0.65, "kd_aug_minus_nokd_points": 13.0}}


def test_sst2_frontier_plots_every_model_with_the_teacher_marked(tmp_path):
    import matplotlib.image

    import sst2_frontier

    pts = sst2_frontier.points(fake_sst2())
    assert [p["name"] for p in pts if p["teacher"]] == ["teacher (MiniLM-L6, fine-tuned)"]
    assert {p["name"] for p in pts} >= {"CNN (Kim 2014), MSE", "BiLSTM, no KD"} and len(pts) == 5
    assert next(p for p in pts if p["name"].startswith("CNN"))["accuracy"] == pytest.approx(80.0)
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"benches": {"sst2_kd": {"result": fake_sst2()}}}))
    assert sst2_frontier.main(["--from", str(results), "--out", str(tmp_path / "f.png")]) == 0
    assert matplotlib.image.imread(tmp_path / "f.png").ndim == 3


def test_sst2_frontier_draws_runs_at_two_n_iters_once_per_model(tmp_path):
    import sst2_frontier

    n10, n20 = fake_sst2(), fake_sst2()
    n20["n_iter"] = 20
    n20["results"]["student_kd_aug"]["accuracy_mean"] = 0.81
    n20["results"]["student_nokd"]["sentences_per_s"] = 1.0  # the same cached student, measured again
    pts = {p["name"]: p for p in sst2_frontier.merged_points([n10, n20])}
    assert pts["BiLSTM, KD + aug (MSE), n_iter 10"]["accuracy"] == pytest.approx(78.0)
    assert pts["BiLSTM, KD + aug (MSE), n_iter 20"]["accuracy"] == pytest.approx(81.0)
    assert "CNN (Kim 2014), MSE, n_iter 20" in pts and "BiLSTM, KD + aug (MSE)" not in pts
    assert pts["BiLSTM, no KD"]["sentences_per_s"] == 2500.0 and len(pts) == 7  # first file wins
    assert [p["name"] for p in sst2_frontier.merged_points([n10, n10])] == [p["name"] for p in sst2_frontier.points(n10)]
    files = [tmp_path / "a.json", tmp_path / "b.json"]
    for f, r in zip(files, (n10, n20)):
        f.write_text(json.dumps(r))
    assert sst2_frontier.main(["--from", *map(str, files), "--out", str(tmp_path / "f.png")]) == 0


def fake_every_bench() -> dict:
    """fake_results() plus a small result for every other bench run_all runs."""
    results = fake_results()
    augment = {"sentences": 3367, "raw_tagging_seconds": 10.0, "bare_augment_seconds": 5.0,
               "settings": {"n_iter": 20, "shards": 8},
               "runs": {"1": {"seconds": 20.0, "stages": {"pos_tag": {"seconds": 12.0, "compute_seconds": 10.0,
                                                                      "write_seconds": 0.5}}}},
               "ratios": {"chain_1w_over_raw_pipe": 0.5}}
    multi30k = {"teacher_pairs": 1450, "train_pairs": 500, "lr_grid": [1e-3, 2e-3], "val_rows": 51, "seeds": [0, 1],
                "test_rows": 50, "beams": 5, "teacher_checkpoint_num_beams": 5, "label_num_beams": 5,
                "models": [{"name": "student_seqkd", "decode": "greedy", "lr": 1e-3, "parameters": 1_500_000,
                            "bleu_mean": 3.2, "bleu_sd": 0.4, "chrf_mean": 20.0, "chrf_sd": 1.0,
                            "sentences_per_s": [9.0, 10.0, 11.0], "speedup_vs_teacher_beam": 4.0}],
                "validation_bleu": {"student_seqkd": {"0.001": 3.0, "0.002": 2.0}},
                "chosen_lr": {"student_seqkd": 1e-3}}
    storage = {"bench": "storage", "scale": 0.05, "rounds": 2, "label_rows": 3367,
               "label_rows_per_s": {"local": 40.0, "s3": 36.0},
               "label_seconds": {"local": [84.0, 85.0], "s3": [93.0, 95.0]},
               "s3_over_local_per_round": [0.9, 0.89], "s3_over_local": 0.895,
               "plan": {"rows": 50000, "rows_per_shard": 1000,
                        **{w: {"shards": 50, "write_seconds": 2.0, "default": {"seconds": s, "validation_seconds": 0.01},
                               "verify": {"seconds": 10 * s, "validation_seconds": 0.01}}
                           for w, s in (("local", 0.05), ("s3", 0.4))}}}
    lm = {"teacher": {"parameters": 1_000_000, "heldout": {"perplexity": 30.0}}, "student_parameters": 100_000,
          "codecs": {"sampled-12": {"bytes_per_token": 13.6, "nominal_bytes_per_token": 36,
                                    "kl_full_to_rebuilt": 0.25}},
          "runs": {"ce": [60.0, 62.0], "full": [50.0, 52.0], "sampled-12": [51.0, 53.0]}, "seconds": 900}
    for name, result in (("augment", augment), ("sst2_kd", {**fake_sst2(), "dev_rows": 872}), ("multi30k_seqkd", multi30k),
                         ("storage", storage), ("lm_distill", lm)):
        results["benches"][name] = {"command": [f"bench/{run_all.BENCHES[name][0]}", "--scale", "0.05"],
                                    "returncode": 0, "seconds": 100, "result": result}
    return results


def test_every_block_in_benchmarks_md_is_rendered_from_a_results_json_with_every_bench():
    text = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert all(f"<!-- run_all:{name} begin -->" in text for name in run_all.BENCHES)
    new, done, missing = render_into(text, fake_every_bench())
    assert sorted(done) == sorted(run_all.BENCHES) and missing == []
    assert "Not rendered at this commit yet" not in new
    assert "| S3 ÷ local throughput | per round 0.90, 0.89 | **0.90** median (goal ≥ 0.9) |" in new
    assert "| s3:// (moto) | 50 | 0.400 s (validation 0.010 s) | 4.000 s |" in new
    assert "| sampled-12 | 13.6 | 36 | 0.250 | 52.000 ± 1.414 | 51.00, 53.00 | 90% |" in new  # (61 - 52) / (61 - 51)
    assert "| ce | - | - | - | 61.000 ± 1.414 | 60.00, 62.00 | 0% |" in new
    outside = [block_free(t) for t in (text, new)]
    assert outside[0] == outside[1]  # the hand-written narrative around the blocks is untouched


def block_free(text: str) -> str:
    import re

    return re.sub(r"<!-- run_all:(\w+) begin -->\n.*?<!-- run_all:\1 end -->", "", text, flags=re.DOTALL)


def test_merged_results_keep_each_benchs_own_commit_and_scale(tmp_path):
    first = fake_results()
    rerun = {**fake_results(), "commit": "fedcba9876543210", "scale": 0.1, "started_at": "2026-12-07 02:00 UTC",
             "benches": {"label": fake_results()["benches"]["label"]}}
    merged = run_all.merge([first, rerun])
    assert merged["benches"]["label"]["commit"] == "fedcba9876543210" and merged["benches"]["label"]["scale"] == 0.1
    assert merged["benches"]["train"]["commit"] == "0123456789abcdef" and merged["benches"]["train"]["scale"] == 0.05
    text = ("<!-- run_all:label begin -->\n<!-- run_all:label end -->\n"
            "<!-- run_all:train begin -->\n<!-- run_all:train end -->\n")
    new, _, _ = render_into(text, merged)
    label, train = new.split("<!-- run_all:train begin -->")
    assert "--scale 0.1` at commit `fedcba9`" in label and "--scale 0.05` at commit `0123456`" in train
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, results in zip(paths, (first, rerun)):
        path.write_text(json.dumps(results))
    md = tmp_path / "B.md"
    md.write_text(text)
    assert run_all.main(["--from", *map(str, paths), "--render", "--benchmarks", str(md)]) == 1  # augment failed
    assert md.read_text() == new


def test_train_bench_runs_its_bare_loop_on_the_stages_batches(tmp_path):
    """bench/train.py end to end on 80 rows: it imported a
    seeding helper the training core had moved, and run_all's train bench exited 1."""
    import train

    out = tmp_path / "train.json"
    assert train.main(["--scale", "0.002", "--repeat", "1", "--vocab", "200", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["rows"] == 80 and r["examples"] == {"bare": 80, "stage": 80}  # 3 batches of 32
    assert r["ratio_stage_over_bare"] > 0
