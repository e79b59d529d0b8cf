"""The benchmark scripts start, run end to end on toy sizes and print their machine-readable lines.

No timing is asserted here (timings belong to `bench/`, run on a quiet machine): only that each script
works and reports `RESULT <metric> <value> <unit> target <op> <value>` for its headline figures.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow

RESULT = re.compile(r"^RESULT (\w+) (\d+(?:\.\d+)?) (\S+) target (>=|<=) (\d+(?:\.\d+)?)$", re.MULTILINE)


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def results_of(output: str) -> dict[str, str]:
    return {m.group(1): m.group(3) for m in RESULT.finditer(output)}


def test_the_gpu_suite_runs_every_section_on_cpu_with_the_tiny_architecture():
    # The functions and branches the lent GPU runs: the model stage's classes against a CPU run (both
    # engines, a static fallback, an injected out-of-memory error), the same for the tiny Idefics3 and
    # SmolVLM checkpoints (both engines), then the toy-size idefics2-8b architecture through both engines
    # and the model card's loop, the toy-size SmolVLM-256M and Idefics3-8B through the static engine on
    # their own grids of tiles, the decode-step and cache measurements, an extract task's grammar, the
    # length mix, the continuous engine's concurrency and the compile checks.
    # Pages at 490 instead of 980 only to keep the toy Idefics2 vision tower quick.
    done = run_bench("bench/gpu_suite.py", "--tiny", "--device", "cpu", "--pages", "3", "--longest-edge", "490")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sections failed: none" in done.stdout
    checks = ["suite_static_rows_equal_to_cpu", "suite_continuous_rows_equal_to_cpu", "suite_oom_rows_recovered",
              "suite_idefics3_static_rows_equal_to_cpu", "suite_idefics3_continuous_rows_equal_to_cpu",
              "suite_smolvlm_static_rows_equal_to_cpu", "suite_smolvlm_continuous_rows_equal_to_cpu"]
    for check in checks:
        assert re.search(rf"^RESULT {check} 1 ratio target >= 1$", done.stdout, re.MULTILINE), check
    # idefics2-8b's static, continuous and the card's loop; smolvlm-256m's and idefics3-8b's static; the length mix
    assert done.stdout.count("all exact: yes") == 6
    assert results_of(done.stdout) == {
        **dict.fromkeys(checks, "ratio"), "gpu_pages_per_s": "pages/s", "gpu_continuous_pages_per_s": "pages/s",
        "gpu_vs_snippet": "x", "gpu_mix_continuous_vs_static": "x"}
    for measured in ("gpu_pages_per_s_smolvlm256m", "gpu_pages_per_s_idefics3_8b", "gpu_vision_ms_per_page", "gpu_decode_step_ms_b2_dynamic", "gpu_decode_step_ms_b2_static",
                     "gpu_decode_step_ms_b2_static_compiled", "gpu_peak_memory", "gpu_mix_static_pages_per_s",
                     "gpu_vision_compiled_vs_eager", "gpu_continuous_tokens_per_s_r2", "gpu_extract_step_ratio_b4"):
        assert re.search(rf"^RESULT {measured} \S+ \S+$", done.stdout, re.MULTILINE), measured


def test_the_gpu_suite_stops_at_its_deadline_with_what_it_measured():
    done = run_bench("bench/gpu_suite.py", "--tiny", "--device", "cpu", "--pages", "2", "--longest-edge", "490",
                     "--skip", "correctness", "--deadline-s", "1")
    assert "DEADLINE: 1 s reached" in done.stdout
    assert "suite done" not in done.stdout


def test_engine_bench_counts_decoder_rows_for_both_engines():
    done = run_bench("bench/engine.py", "--pages", "6", "--max-new-tokens", "12", "--longest-edge", "112")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("(all exact)") == 2  # each page generated exactly its target, in both engines
    assert results_of(done.stdout) == {"decode_slot_efficiency": "ratio"}
    assert re.search(r"^RESULT static_decode_slot_efficiency \d\.\d+ ratio$", done.stdout, re.MULTILINE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_gpu_suite_without_a_gpu_says_so_and_measures_nothing():
    done = run_bench("bench/gpu_suite.py")
    assert done.returncode != 0
    assert "no CUDA GPU here" in done.stderr
    assert not results_of(done.stdout)


def test_preprocess_bench_reports_exact_crops_and_both_targets():
    done = run_bench("bench/preprocess.py", "--pages", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("equal the reference tensors exactly: yes") == 3  # idefics2, idefics3, smolvlm
    assert results_of(done.stdout) == {"preprocess_pages_per_core": "pages/s", "bytes_per_page": "MB",
                                       "preprocess_pages_per_core_idefics3": "pages/s",
                                       "preprocess_pages_per_core_smolvlm": "pages/s"}


def test_legibility_bench_reads_the_models_crops_with_tesseract():
    from scriptorium.pipeline.routes.tesseract import tessdata_path

    try:
        tessdata_path()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    done = run_bench("bench/legibility.py", "--sizes", "9", "--fonts", "helv")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "today (render at 980, then split)" in done.stdout
    assert results_of(done.stdout) == {"legibility_cer": "ratio"}


def test_extract_bench_reports_the_mask_cost_and_the_keywords_enforced():
    done = run_bench("bench/extract.py", "--steps", "4", "--vocab", "1000")
    assert done.returncode == 0, done.stderr[-3000:]
    assert results_of(done.stdout) == {"extract_mask_us_per_token": "us"}
    assert re.search(r"uniqueItems +llguidance: refused at start", done.stdout)
    assert re.search(r"maxLength +llguidance: 0/\d+ invalid", done.stdout)


def test_export_bench_reports_its_peak_memory():
    done = run_bench("bench/export.py", "--rows", "2000", "--text-bytes", "200")
    assert done.returncode == 0, done.stderr[-3000:]
    assert results_of(done.stdout) == {"export_peak_mb": "MB", "export_rows_per_s": "rows/s"}


def test_ledger_bench_plans_a_small_output_against_both_ledgers(tmp_path):
    done = run_bench("bench/ledger.py", "--sizes", "1e4", "--baseline-sizes", "1e4", "--scratch", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "before #19 at 1e4" in done.stdout  # the old ledger made the same plan (the bench checks)
    assert results_of(done.stdout) == {"resume_plan_s_1e4": "s", "resume_plan_peak_gb_1e4": "GB"}


def test_driver_soak_streams_rows_through_the_driver_and_reports_growth(tmp_path):
    done = run_bench("bench/driver_soak.py", "--rows", "20000", "--earlier-units", "1e4", "--scratch", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert results_of(done.stdout) == {"driver_growth_bytes_per_page": "B"}


def test_metrics_bench_runs_the_job_with_metrics_on_and_off():
    done = run_bench("bench/metrics.py", "--pages", "8", "--max-new-tokens", "4", "--repeats", "1", timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "metrics on" in done.stdout and "metrics off" in done.stdout
    assert results_of(done.stdout) == {"metrics_overhead": "x"}
