"""The model card's options as job settings, and how the model stage batches pages.

Image splitting and edge sizes change what the model sees (crop shapes, `<image>` tokens, counted in
`n_input_tokens` exactly as the checkpoint's processor counts them), the static-cache mode gives the
same text, dtype reaches the model, and options that need a GPU or a missing package are refused in
one line before anything runs.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from scriptorium.core.errors import SpecError
from scriptorium.core.schema import PAGE_SCHEMA, table_from_rows
from scriptorium.core.spec import (
    InputSpec,
    JobSpec,
    ModelSpec,
    OutputSpec,
    ResourceSpec,
    TaskSpec,
    spec_from_dict,
)
from scriptorium.jobs.runner import run_job
from scriptorium.pipeline.model.collate import batch_by_shape
from scriptorium.pipeline.model.loading import load_model, load_processor, open_model_config
from scriptorium.pipeline.preprocess import PreprocessPages
from tests.conftest import make_image, read_rows

PAGE = (700, 495)  # height, width of a small page image

SETTINGS = {
    "checkpoint": ({}, 1, 700),  # overrides, crops per page, longest crop edge
    "split": ({"do_image_splitting": True}, 5, 700),
    "edge-490": ({"longest_edge": 490}, 1, 490),
    "split-490-300": ({"do_image_splitting": True, "longest_edge": 490, "shortest_edge": 300}, 5, 490),
}


def job(model_path, folder=None, out=None, **model_settings) -> JobSpec:
    return JobSpec(input=InputSpec(uri=str(folder or "in")), output=OutputSpec(uri=str(out or "out")),
                   model=ModelSpec(id=str(model_path), device="cpu", **model_settings),
                   tasks=[TaskSpec(kind="caption", max_new_tokens=4)], resources=ResourceSpec(batch_size=4))


@pytest.fixture(scope="module")
def pages_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pages")
    for i in range(3):
        make_image(folder / f"page{i}.png", size=(PAGE[1], PAGE[0]), color=(60 * i, 90, 200 - 50 * i), text=f"p{i}")
    return folder


@pytest.fixture(scope="module")
def results(tiny_model, pages_folder, ray_local, tmp_path_factory):
    """Result rows of one pipeline run per named setting, run on first use."""
    cache = {}

    def run(name: str, **model_settings) -> list[dict]:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"out-{name}")
            run_job(job(tiny_model, pages_folder, out, **model_settings))
            rows = read_rows(out)
            cache[name] = sorted(rows, key=lambda r: r["source_uri"])
        return cache[name]

    return run


@pytest.mark.parametrize("name", list(SETTINGS))
def test_splitting_and_edges_shape_the_crops(tiny_model, name):
    overrides, n_crops, longest = SETTINGS[name]
    _, settings = open_model_config(job(tiny_model, **overrides).check_runnable().model)
    rng = np.random.default_rng(0)
    page = {"source_uri": "mem://p.png", "kind": "image", "page": 0, "n_pages": 1, "status": "ok",
            "width": PAGE[1], "height": PAGE[0], "image": rng.integers(0, 256, (*PAGE, 3), np.uint8).tobytes()}
    out = pa.concat_tables(PreprocessPages(settings)(table_from_rows([page], PAGE_SCHEMA))).to_pylist()[0]
    shapes = out["crop_shapes"]
    assert len(shapes) == n_crops
    assert max(max(s) for s in shapes) == longest
    assert min(min(s) for s in shapes) >= settings.shortest_edge


@pytest.mark.slow
@pytest.mark.parametrize("name", ["checkpoint", "split-490-300"])  # each a pipeline run: keep them few
def test_input_tokens_follow_the_settings_as_the_checkpoints_processor_counts_them(tiny_model, pages_folder, results, name):
    overrides = SETTINGS[name][0]
    rows = results(name, **overrides)
    assert len(rows) == 3 and {r["status"] for r in rows} == {"ok"}
    _, settings = open_model_config(job(tiny_model, **overrides).check_runnable().model)
    processor = load_processor(str(tiny_model), settings)
    for row in rows:
        image = Image.open(pages_folder / row["source_uri"].rsplit("/", 1)[-1]).convert("RGB")
        expected = processor(text=row["prompt"], images=[image], return_tensors="pt")["input_ids"].shape[1]
        assert row["n_input_tokens"] == expected


@pytest.mark.slow
def test_splitting_sends_five_images_worth_of_tokens(results):
    whole, split = results("checkpoint")[0], results("split-490-300", **SETTINGS["split-490-300"][0])[0]
    image_seq_len = 64  # each of the 4 extra crops brings its <image> tokens and one <fake_token_around_image>
    assert split["n_input_tokens"] - whole["n_input_tokens"] == 4 * (image_seq_len + 1)


@pytest.mark.slow
def test_the_preallocated_kv_cache_generates_the_dynamic_caches_text(results):
    preallocated, dynamic = results("checkpoint"), results("dynamic-cache", kv_cache="dynamic")
    assert [r["text"] for r in preallocated] == [r["text"] for r in dynamic]
    assert [r["n_output_tokens"] for r in preallocated] == [r["n_output_tokens"] for r in dynamic]


def test_the_kv_cache_setting_reaches_generate(tiny_model, tmp_path, model_inputs):
    """The default preallocates the batch's cache, without the compile transformers would add to it;
    `kv_cache = "dynamic"` leaves transformers' default."""
    from scriptorium.pipeline.model.stage import GenerateAnswers
    from scriptorium.pipeline.prompts import PromptBook
    from tests.conftest import plan_row, preprocessed

    spec = job(tiny_model).check_runnable()
    _, settings = open_model_config(spec.model)
    pages = preprocessed(spec, [plan_row(make_image(tmp_path / "page.png", size=(PAGE[1], PAGE[0])))])
    for kv_cache in ("static", "dynamic"):
        model = spec.model.model_copy(update={"kv_cache": kv_cache})
        pa.concat_tables(GenerateAnswers(model, settings, PromptBook(spec.tasks, "instruct", {}))(pages))
    preallocated, dynamic = model_inputs
    assert (preallocated.get("cache_implementation"), preallocated.get("disable_compile")) == ("static", True)
    assert "cache_implementation" not in dynamic


def test_dtype_reaches_the_model(tiny_model):
    model = load_model(ModelSpec(id=str(tiny_model), dtype="bf16"), "cpu")
    assert model.dtype == torch.bfloat16


def test_the_kv_cache_is_a_toml_setting_and_compile_is_refused_with_the_reason():
    base = {"input": {"uri": "in"}, "output": {"uri": "out"}, "tasks": [{"kind": "ocr"}]}
    spec = spec_from_dict({**base, "model": {"id": "m", "kv_cache": "dynamic", "longest_edge": 490}}).check_runnable()
    assert spec.model.kv_cache == "dynamic" and spec.model.longest_edge == 490
    assert spec_from_dict({**base, "model": {"id": "m"}}).model.kv_cache == "static"
    with pytest.raises(SpecError, match="model.compile is no longer a setting: .* recompiled at every call"):
        spec_from_dict({**base, "model": {"id": "m", "compile": True}})


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"attn_implementation": "flash_attention_2", "device": "cpu"}, "CUDA GPUs in fp16/bf16"),
        ({"attn_implementation": "flash_attention_2", "device": "cuda", "dtype": "fp32"}, "CUDA GPUs in fp16/bf16"),
        ({"quantization": "bnb-4bit", "device": "cpu"}, "needs a CUDA GPU"),
        ({"shortest_edge": 500, "longest_edge": 400}, "larger than model.longest_edge"),
        ({"longest_edge": 0}, "positive number of pixels"),
    ],
)
def test_options_that_cannot_work_are_refused_with_the_fix(settings, message):
    data = {"input": {"uri": "in"}, "output": {"uri": "out"}, "tasks": [{"kind": "ocr"}],
            "model": {"id": "m", **settings}}
    with pytest.raises(SpecError, match=message):
        spec_from_dict(data).check_runnable()


@pytest.mark.parametrize(
    "settings, package",
    [({"attn_implementation": "flash_attention_2"}, "flash_attn"), ({"quantization": "bnb-4bit"}, "bitsandbytes"),
     ({"quantization": "awq"}, "gptqmodel")],
)
def test_a_missing_optional_package_is_a_job_error_naming_the_install(settings, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    data = {"input": {"uri": "in"}, "output": {"uri": "out"}, "tasks": [{"kind": "ocr"}],
            "model": {"id": "m", "device": "cuda", **settings}}
    with pytest.raises(SpecError, match=f"needs the {package} package.*pip install"):
        spec_from_dict(data).check_runnable()


# -- batching --------------------------------------------------------------------------------------------
def crops(*shapes):
    return [np.zeros((h, w, 3), np.uint8) for h, w in shapes]


def test_batches_group_similar_shapes_and_keep_every_item_once():
    items = [crops((980, 693)), crops((378, 980)), crops((980, 693)), crops((378, 980)), crops((980, 757))]
    batches = list(batch_by_shape(items, lambda c: c, batch_size=2))
    assert sorted(id(i) for b in batches for i in b) == sorted(id(i) for i in items)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert {c[0].shape for c in batches[0]} == {(378, 980, 3)}  # the two wide pages pad nothing
    assert {c[0].shape for c in batches[1]} == {(980, 693, 3)}


def test_a_pixel_budget_cuts_batches_by_crop_pixels():
    small, big = crops((400, 400)), crops((980, 980))
    items = [small, small, small, big, big]
    budget = 3 * 400 * 400  # three small pages fit; a big one needs a batch of its own
    batches = list(batch_by_shape(items, lambda c: c, batch_size=8, max_batch_pixels=budget))
    assert [len(b) for b in batches] == [3, 1, 1]
    assert [len(b) for b in batch_by_shape(items, lambda c: c, batch_size=8)] == [5]


def test_a_token_budget_cuts_batches_by_prompt_plus_new_tokens():
    page = crops((400, 400))
    short, long = (page, 300), (page, 1300)  # (crops, tokens): a one-page prompt, a four-page document prompt
    items = [short, short, short, long, long]
    batches = list(batch_by_shape(items, lambda i: i[0], batch_size=8, tokens_of=lambda i: i[1],
                                  max_batch_tokens=2000))
    assert sorted(sum(t for _, t in b) for b in batches) == [900, 1300, 1300]  # no batch over 2,000 tokens
    assert sorted(id(i) for b in batches for i in b) == sorted(id(i) for i in items)
    assert [len(b) for b in batch_by_shape(items, lambda i: i[0], batch_size=8, tokens_of=lambda i: i[1])] == [5]


def test_the_kv_cache_of_idefics2_8b_is_128_kib_per_token_and_sizes_gpu_batches():
    from transformers import MistralConfig

    from scriptorium.pipeline.model.budget import kv_cache_bytes_per_token, token_budget

    # idefics2-8b's text model, as its config.json gives it (head_dim = 4096 / 32).
    mistral_7b = MistralConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    assert kv_cache_bytes_per_token(mistral_7b, torch.bfloat16) == 2 * 32 * 8 * 128 * 2
    assert kv_cache_bytes_per_token(mistral_7b, torch.float32) == 2 * 32 * 8 * 128 * 4
    split_page_ocr = 340 + 512  # prompt tokens of a split page + max_new_tokens
    h100_free, a10g_free = 80e9 - 17e9, 24e9 - 17e9  # bytes left beside 8.4 B bf16 weights
    assert token_budget(mistral_7b, torch.bfloat16, h100_free) // split_page_ocr == 282  # > the 256 cap
    assert token_budget(mistral_7b, torch.bfloat16, a10g_free) // split_page_ocr == 31


def test_batch_size_is_automatic_by_default_and_a_set_value_wins():
    from scriptorium.core.spec import CPU_BATCH_SIZE, GPU_BATCH_SIZE

    assert ResourceSpec().pages_per_batch(on_gpu=True) == GPU_BATCH_SIZE
    assert ResourceSpec().pages_per_batch(on_gpu=False) == CPU_BATCH_SIZE
    assert ResourceSpec(batch_size=12).pages_per_batch(on_gpu=True) == 12
    data = {"input": {"uri": "in"}, "output": {"uri": "out"}, "tasks": [{"kind": "ocr"}], "model": {"id": "m"}}
    with pytest.raises(SpecError, match="max_batch_tokens must be >= 0"):
        spec_from_dict({**data, "resources": {"max_batch_tokens": -1}}).check_runnable()


def test_the_model_stage_keeps_each_batch_within_its_token_budget(tiny_model, tmp_path, model_inputs):
    """Five pages and a budget of two sequences' tokens: `generate` gets batches of 2, 2 and 1, with
    the texts of one batch of five."""
    from scriptorium.pipeline.model.stage import GenerateAnswers
    from scriptorium.pipeline.prompts import PromptBook
    from tests.conftest import plan_row, preprocessed

    for i in range(5):
        make_image(tmp_path / f"page{i}.png", size=(PAGE[1], PAGE[0]), color=(50 * i, 90, 200 - 40 * i), text=f"p{i}")
    spec = job(tiny_model).check_runnable()
    _, settings = open_model_config(spec.model)
    book = PromptBook(spec.tasks, "instruct", {})
    pages = preprocessed(spec, [plan_row(path) for path in sorted(tmp_path.glob("*.png"))])

    def texts(generator) -> dict[str, str]:
        return {r["source_uri"]: r["text"] for r in pa.concat_tables(generator(pages)).to_pylist() if r["status"] == "ok"}

    one_batch = GenerateAnswers(spec.model, settings, book, batch_size=8)
    expected = texts(one_batch)
    row = pa.concat_tables(one_batch(pages.slice(0, 1))).to_pylist()[0]
    per_sequence = row["n_input_tokens"] + row["max_new_tokens"]
    model_inputs.clear()
    budgeted = GenerateAnswers(spec.model, settings, book, ResourceSpec(max_batch_tokens=2 * per_sequence + 1),
                               batch_size=8)

    assert texts(budgeted) == expected and len(expected) == 5
    assert sorted(len(call["input_ids"]) for call in model_inputs) == [1, 2, 2]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_checkpoint_of_another_family_stops_the_job_naming_the_families_run(family, tmp_path, capsys):
    from scriptorium.jobs.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(f'{{"model_type": "{family}"}}')
    (tmp_path / "in").mkdir()
    code = main(["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                 "--model", str(tmp_path / "model"), "--task", "ocr"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1, error
    assert f"is a checkpoint of model type {family}: Scriptorium runs these families: idefics2 " in error
    assert "idefics3 (HuggingFaceM4/Idefics3-8B-Llama3); smolvlm (HuggingFaceTB/SmolVLM-256M-Instruct)" in error
