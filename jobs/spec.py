"""The typed job spec: the single source of configuration for a Scriptorium run.

A spec comes from a TOML file (`--job FILE.toml`), from command-line flags, or both (flags win).
Each stage receives only the section it needs: the lister gets `InputSpec`, the renderer `RenderSpec`,
the model actor `ModelSpec` and the task list, the sink `OutputSpec`.

TOML layout (every key optional except where a run needs it):

    run_id = "archive-2026-11"
    [input]      uri = "s3://bucket/archive/**/*.pdf"   include = [...]  exclude = [...]  max_size_mb = 500
    [output]     uri = "s3://bucket/results/"           rows_per_file = 2000
    [storage]    endpoint_url = "http://minio:9000"     region = "us-east-1"  profile = "..."  anon = false
    [model]      id = "HuggingFaceM4/idefics2-8b"       dtype = "bf16"  attn_implementation = "sdpa"
    [render]     dpi = 300  (or longest_edge = 1960)    timeout_s = 60
    [resources]  num_replicas = 1                       gpus_per_replica = 1  batch_size = 0 (auto)
    [[tasks]]    kind = "ocr"                           max_new_tokens = 512
    [[tasks]]    kind = "qa"  questions = ["What is the title?"]
    [routing]    text_layer = true                      ocr_engine = "idefics2"  dedup = true
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

TASK_KINDS = ("ocr", "caption", "qa", "custom")
CAPTION_DETAILS = ("short", "detailed")
TASK_SCOPES = ("page", "document")
EXAMPLE_KEYS = ("image", "prompt", "text")
OCR_ENGINES = ("idefics2", "tesseract")
DTYPES = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("sdpa", "flash_attention_2", "eager")
QUANTIZATION = ("none", "bnb-4bit", "awq")
PROMPT_FORMATS = ("auto", "instruct", "base")
# Automatic `[resources] batch_size`. Each decoding step reads all the weights whatever the batch, so on a
# GPU a step for a hundred sequences costs little more than one for a few: the cap is high and the
# KV-cache token budget sizes batches to the GPU's memory. On CPU, compute grows with the batch.
GPU_BATCH_SIZE = 256
CPU_BATCH_SIZE = 8


class SpecError(ValueError):
    """A job spec that cannot run; the message names the setting and how to fix it."""


@dataclass
class InputSpec:
    uri: str = ""
    include: list[str] = field(default_factory=list)  # glob patterns on the object name
    exclude: list[str] = field(default_factory=list)
    max_size_mb: float = 0  # 0 = no limit; larger files become error rows
    manifest: bool = False  # `uri` is a manifest file (txt/csv/jsonl/parquet) listing inputs


@dataclass
class OutputSpec:
    uri: str = ""
    rows_per_file: int = 2000  # a Parquet file is published when it holds this many rows...
    seconds_per_file: float = 120.0  # ...or when this much time has passed, so a kill loses little
    overwrite: bool = False
    retry_failed: bool = False


@dataclass
class StorageSpec:
    endpoint_url: str = ""  # S3-compatible stores (MinIO, R2, Ceph): s3:// URIs only
    region: str = ""
    profile: str = ""
    anon: bool = False
    gcs_endpoint_url: str = ""  # a GCS emulator or gateway (JSON API): gs:// URIs only


@dataclass
class ModelSpec:
    id: str = ""
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attn_implementation: str = "sdpa"
    quantization: str = "none"
    device: str = "auto"
    prompt_format: str = "auto"  # auto: instruct if the checkpoint has a chat template, else base
    do_image_splitting: bool | None = None  # None: the checkpoint's processor config decides
    longest_edge: int | None = None
    shortest_edge: int | None = None
    # Static KV cache for generation; on CUDA, transformers then torch.compiles the decoding step.
    # Opt-in until bench/gpu.py shows it faster on a GPU (see BENCHMARKS.md).
    compile: bool = False


@dataclass
class RenderSpec:
    # How large PDF pages are rendered (images are never resized here). Neither set: at what the model can
    # use, twice the processor's longest_edge with image splitting, the longest_edge without, and a
    # scanned page at no more than its scan's own resolution (pipeline/render_size.py). Either one set:
    # every page so its longest edge is `longest_edge` pixels, or at `dpi` dots per inch of its page box.
    longest_edge: int = 0
    dpi: float = 0
    max_pixels: int = 40_000_000  # decoded images larger than this are refused (decompression bombs)
    max_pages: int = 5000  # a document with more pages than this is refused: one error row
    timeout_s: float = 60.0  # per page; past 1.5x + 2 s the rendering process is killed (pipeline/sandbox.py)


@dataclass
class TaskSpec:
    kind: str = "ocr"
    name: str = ""  # defaults to kind; the `task` column
    prompt: str = ""  # custom prompt text (kind="custom"), or an override of the built-in one
    questions: list[str] = field(default_factory=list)  # kind="qa"; none: each document's manifest questions
    detail: str = "short"  # kind="caption": "short" (one sentence) or "detailed"
    # "page": one row per page. "document": one row per document (page = -1) whose prompt shows the
    # document's first `document_pages` pages, in order, as interleaved images.
    scope: str = "page"
    document_pages: int = 4
    # Few-shot examples shown before the page: [{image = URI, text = "the answer", prompt = "the question"}]
    # (`prompt` defaults to the task's own instruction; base checkpoints see `<image>` + text only).
    examples: list[dict] = field(default_factory=list)
    max_new_tokens: int = 512
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: list[str] = field(default_factory=list)
    # A degenerate generation (one phrase repeated until max_new_tokens; flagged in the `degenerate`
    # column) is generated again by sampling at each of these temperatures in turn, e.g. [0.4, 0.8],
    # until one is not degenerate. Empty: flag only.
    temperature_ramp: list[float] = field(default_factory=list)

    @property
    def task_name(self) -> str:
        return self.name or self.kind


@dataclass
class RoutingSpec:
    """Cheaper routes than the model, tried before a page reaches the GPU (see pipeline/routes.py)."""

    text_layer: bool = False  # OCR tasks on PDF pages with a good embedded text layer use it as is
    text_layer_min_chars: int = 40  # fewer non-space characters than this: not a usable text layer
    ocr_engine: str = "idefics2"  # "tesseract": OCR tasks run Tesseract (CPU) instead of the model
    tesseract_language: str = "eng"  # Tesseract language(s), e.g. "eng+deu"
    dedup: bool = False  # pixel-identical pages are processed once per run and their result reused
    dedup_cache_mb: int = 256  # results kept for later duplicates (least recently used go first)
    dedup_across_runs: bool = True  # with dedup: also reuse results earlier runs published to this output


@dataclass
class ResourceSpec:
    address: str = ""  # Ray address: "" starts a local Ray, "auto" or "ray://host:10001" joins a cluster
    num_replicas: int = 1  # model replicas (actors); one per GPU on a GPU cluster
    gpus_per_replica: float | None = None  # None: 1 when device is cuda, else 0
    cpus_per_replica: float = 1.0
    cpus_per_preprocess_task: float = 1.0
    # Pages per model batch, an upper bound: 0 (auto) is GPU_BATCH_SIZE on a GPU replica, where the
    # token budget below usually decides, and CPU_BATCH_SIZE on CPU.
    batch_size: int = 0
    max_batch_pixels: int = 0  # 0 = no pixel budget; else sub-batches are cut at this many crop pixels
    # Tokens per model batch, prompt + max_new_tokens per sequence (what its KV cache holds): 0 (auto)
    # fits the KV cache in half the GPU memory left after loading the model (pipeline/batch_budget.py);
    # no budget on CPU.
    max_batch_tokens: int = 0
    ray_num_cpus: int = 0  # logical CPUs for a local Ray (0: max(4, cores)); see README on small machines
    gpu_price_per_hour: float = 0.0  # for the run summary's cost figures

    def pages_per_batch(self, on_gpu: bool) -> int:
        """`batch_size`, or its automatic value for a replica with (or without) a GPU."""
        if self.batch_size:
            return self.batch_size
        return GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE


@dataclass
class JobSpec:
    run_id: str = ""
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    render: RenderSpec = field(default_factory=RenderSpec)
    tasks: list[TaskSpec] = field(default_factory=list)
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    resources: ResourceSpec = field(default_factory=ResourceSpec)

    def validate(self) -> "JobSpec":
        """Check the settings a run cannot do without; raise SpecError naming the fix."""
        if not self.input.uri:
            raise SpecError("no input: pass --input URI (a folder, glob, file or s3:// prefix) or set [input] uri")
        if not self.output.uri:
            raise SpecError("no output: pass --output URI or set [output] uri")
        if not self.model.id and self.needs_model:
            raise SpecError("no model: pass --model (a hub id or a local checkpoint path) or set [model] id")
        _check_choice("model.dtype", self.model.dtype, DTYPES)
        _check_choice("model.device", self.model.device, DEVICES)
        _check_choice("model.attn_implementation", self.model.attn_implementation, ATTENTION)
        _check_choice("model.quantization", self.model.quantization, QUANTIZATION)
        _check_choice("model.prompt_format", self.model.prompt_format, PROMPT_FORMATS)
        _check_model_options(self.model)
        if not self.tasks:
            raise SpecError("no task: pass --task ocr|caption|qa or add a [[tasks]] table")
        names = set()
        for task in self.tasks:
            _check_choice("tasks.kind", task.kind, TASK_KINDS)
            if task.kind == "qa" and not task.questions and not self.input.manifest:
                raise SpecError("task 'qa' needs a question: pass --question TEXT or set questions = [...]")
            if task.kind == "custom" and not task.prompt:
                raise SpecError("task 'custom' needs prompt = \"...\" in its [[tasks]] table")
            _check_task_shape(task)
            if task.max_new_tokens < 1:
                raise SpecError(f"task {task.task_name!r}: max_new_tokens must be >= 1")
            if any(not isinstance(t, (int, float)) or t <= 0 for t in task.temperature_ramp):
                raise SpecError(f"task {task.task_name!r}: temperature_ramp must be temperatures > 0, e.g. [0.4, 0.8]")
            if task.task_name in names:
                raise SpecError(f"two tasks are named {task.task_name!r}: give one a distinct name = \"...\"")
            names.add(task.task_name)
        _check_choice("routing.ocr_engine", self.routing.ocr_engine, OCR_ENGINES)
        _check_render_size(self.render)
        if self.resources.num_replicas < 1:
            raise SpecError("resources.num_replicas must be >= 1")
        for budget in ("batch_size", "max_batch_pixels", "max_batch_tokens"):
            if getattr(self.resources, budget) < 0:
                raise SpecError(f"resources.{budget} must be >= 0 (0: automatic)")
        if self.output.overwrite and self.output.retry_failed:
            raise SpecError("--overwrite and --retry-failed contradict each other: pick one")
        return self

    @property
    def needs_model(self) -> bool:
        """False when every task is page OCR done by Tesseract: such a job runs without a model or GPU."""
        return not all(t.kind == "ocr" and t.scope == "page" and self.routing.ocr_engine == "tesseract"
                       for t in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_task_shape(task: TaskSpec) -> None:
    _check_choice(f"task {task.task_name!r}: detail", task.detail, CAPTION_DETAILS)
    _check_choice(f"task {task.task_name!r}: scope", task.scope, TASK_SCOPES)
    if task.document_pages < 1:
        raise SpecError(f"task {task.task_name!r}: document_pages must be >= 1")
    for example in task.examples:
        if not isinstance(example, dict) or not example.get("image") or "text" not in example:
            raise SpecError(f"task {task.task_name!r}: each example needs image = URI and text = \"...\"")
        unknown = set(example) - set(EXAMPLE_KEYS)
        if unknown:
            raise SpecError(f"task {task.task_name!r}: unknown example key(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(EXAMPLE_KEYS)}")


def _check_render_size(render: RenderSpec) -> None:
    if render.longest_edge < 0 or render.dpi < 0:
        raise SpecError("render.longest_edge and render.dpi must be >= 0 (0: the model decides)")
    if render.longest_edge and render.dpi:
        raise SpecError(f"render.longest_edge = {render.longest_edge} and render.dpi = {render.dpi:g} both size "
                        "PDF pages: set one of them")


def _check_model_options(model: ModelSpec) -> None:
    """Settings that need a GPU or an optional package: refuse them here, in one line, rather than let
    every model replica fail to load. The driver is expected to have the workers' packages installed."""
    for edge in ("longest_edge", "shortest_edge"):
        value = getattr(model, edge)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise SpecError(f"model.{edge} must be a positive number of pixels, got {value!r}")
    if model.longest_edge and model.shortest_edge and model.shortest_edge > model.longest_edge:
        raise SpecError(f"model.shortest_edge ({model.shortest_edge}) is larger than model.longest_edge ({model.longest_edge})")
    if model.attn_implementation == "flash_attention_2":
        if model.device == "cpu" or model.dtype == "fp32":
            raise SpecError("attn_implementation = \"flash_attention_2\" runs on CUDA GPUs in fp16/bf16 only: "
                            "set device = \"cuda\" and dtype = \"bf16\", or use attn_implementation = \"sdpa\"")
        _require_package("flash_attn", "attn_implementation = \"flash_attention_2\"",
                         "pip install flash-attn --no-build-isolation", "attn_implementation = \"sdpa\"")
    if model.quantization in ("bnb-4bit", "awq") and model.device == "cpu":
        raise SpecError(f"quantization = \"{model.quantization}\" needs a CUDA GPU: set device = \"cuda\" or quantization = \"none\"")
    if model.quantization == "bnb-4bit":
        _require_package("bitsandbytes", "quantization = \"bnb-4bit\"", "pip install bitsandbytes", "quantization = \"none\"")
    if model.quantization == "awq":
        # transformers 5 loads AWQ checkpoints through GPT-QModel (and accelerate).
        _require_package("gptqmodel", "quantization = \"awq\"", "pip install gptqmodel accelerate", "a non-AWQ checkpoint")


def _require_package(module: str, setting: str, install: str, alternative: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SpecError(f"{setting} needs the {module} package, which is not installed: {install} "
                        f"(on the driver and every GPU worker), or use {alternative}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{name} = {value!r} is not one of {', '.join(choices)}")


def _from_dict(cls, data: dict[str, Any], where: str):
    """Build dataclass `cls` from a dict, refusing unknown keys (a typo must not be silently ignored)."""
    if not isinstance(data, dict):
        raise SpecError(f"[{where}] must be a table, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        import difflib

        named = [k + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(k, known, 1)) for k in sorted(unknown)]
        raise SpecError(f"unknown setting(s) in [{where}]: {', '.join(named)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, key)
        elif key == "tasks":
            if not isinstance(value, list):
                raise SpecError("tasks must be an array of tables: [[tasks]]")
            kwargs[key] = [_from_dict(TaskSpec, t, "tasks") for t in value]
        else:
            _check_type(where, key, value, hint)
            kwargs[key] = value
    return cls(**kwargs)


_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string in quotes"}


def _check_type(where: str, key: str, value: Any, hint: Any) -> None:
    """A value of the wrong type (batch_size = "8") is named here, not met later as a TypeError."""
    options = get_args(hint) if get_origin(hint) in (Union, type(int | None)) else (hint,)
    if value is None and type(None) in options:
        return
    if not any(_matches(value, option) for option in options if option is not type(None)):
        wanted = " or ".join(_TYPE_WORDS.get(o, "a list" if get_origin(o) is list else str(o))
                             for o in options if o is not type(None))
        raise SpecError(f"[{where}] {key} = {value!r} should be {wanted}")


def _matches(value: Any, hint: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):  # TOML has no int/float confusion to forgive, except 1 for 1.0
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if get_origin(hint) is list:
        (item,) = get_args(hint) or (Any,)
        return isinstance(value, list) and all(item is Any or _matches(v, item) for v in value)
    return True  # richer types are checked where they are used


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    return _from_dict(JobSpec, data, "job")


def load_spec(path: str | Path) -> JobSpec:
    """Read a TOML job spec. Errors name the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"job spec {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"job spec {path} is not valid TOML: {exc}") from None
    return spec_from_dict(data)
