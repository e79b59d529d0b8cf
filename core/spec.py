"""The typed job spec: the single source of configuration for a Scriptorium run.

A spec comes from a TOML file (`--job FILE.toml`), from command-line flags, or both (flags win). It is a
tree of frozen pydantic models, one per section; each stage receives only the section it needs: the
lister gets `InputSpec`, the renderer `RenderSpec`, the model stage `ModelSpec` and the tasks, the sink
`OutputSpec`, every reader and writer `StorageSpec`. `scriptorium schema` prints the JSON Schema of a job
file, which editors use to complete and check `job.toml` (docs/job-spec.md#editor-support).

TOML layout (every key optional except where a run needs it):

    run_id = "archive-2026-11"
    [input]      uri = "s3://bucket/archive/**/*.pdf"   include = [...]  exclude = [...]  max_size_mb = 500
    [output]     uri = "s3://bucket/results/"           rows_per_file = 2000
    [storage]    endpoint_url = "http://minio:9000"     region = "us-east-1"  profile = "..."  anon = false
    [model]      id = "HuggingFaceM4/idefics2-8b"       dtype = "bf16"  attn_implementation = "sdpa"
    [render]     page_edge = 0 (automatic) or dpi       timeout_s = 60
    [resources]  num_replicas = 1                       gpus_per_replica = 1  batch_size = 0 (auto)
    [[tasks]]    kind = "ocr"                           max_new_tokens = 512
    [[tasks]]    kind = "qa"  questions = ["What is the title?"]
    [[tasks]]    kind = "extract"  name = "invoice"  schema = "invoice.schema.json" (or an inline table)
    [routing]    text_layer = true                      ocr_engine = "model"     dedup = true

Types and choices are checked when a spec is built (`spec_from_dict`, `load_spec`, the models' own
constructors); what a run needs besides (an input, an output, a model, a question for QA...) is checked
by `JobSpec.check_runnable()`. Every problem is a `SpecError` of one line naming the setting and the fix.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from scriptorium.core.errors import SpecError
from scriptorium.core.redaction import redact_uri

TaskKind = Literal["ocr", "caption", "qa", "custom", "extract"]
CaptionDetail = Literal["short", "detailed"]
TaskScope = Literal["page", "document"]
OcrEngine = Literal["model", "tesseract", "idefics2"]  # "idefics2": the model, by its first family's name
Dtype = Literal["auto", "fp32", "fp16", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
Attention = Literal["sdpa", "flash_attention_2", "eager"]
Quantization = Literal["none", "bnb-4bit", "awq"]
PromptFormat = Literal["auto", "instruct", "base"]
Engine = Literal["static", "continuous"]
KvCache = Literal["static", "dynamic"]
EXAMPLE_KEYS = ("image", "prompt", "text")

# Automatic `[resources] batch_size`. Each decoding step reads all the weights whatever the batch, so on a
# GPU a step for a hundred sequences costs little more than one for a few: the cap is high and the
# KV-cache token budget sizes batches to the GPU's memory. On CPU, compute grows with the batch.
GPU_BATCH_SIZE = 256
CPU_BATCH_SIZE = 8
MIN_LEASE_TIMEOUT_S = 5  # the holder renews every timeout / 6 seconds: shorter would be mostly renewing


def choices(kind) -> tuple[str, ...]:
    """The values a Literal setting accepts (the CLI offers the same ones)."""
    return get_args(kind)


class Section(BaseModel):
    """A spec section: unknown keys are refused (a typo must not be silently ignored), values keep their
    TOML types (`batch_size = "8"` is an error, not 8), and a section never changes once built."""

    # Field docstrings become the descriptions of the JSON Schema (`scriptorium schema`): editors show them.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)

    def __init__(self, **values):
        try:
            super().__init__(**values)
        except ValidationError as exc:  # a section built in Python fails as a job file does: in one line
            raise SectionError(type(self), exc.errors()) from None

    def updated(self, **changes):
        """A copy with `changes` applied and checked again; a dict updates a sub-section's keys."""
        data = self.model_dump()
        for key, value in changes.items():
            current = data.get(key)
            data[key] = {**current, **value} if isinstance(value, dict) and isinstance(current, dict) else value
        return build(type(self), data)


class InputSpec(Section):
    uri: str = ""
    """A folder or prefix (everything below it), a glob, a single file, or a manifest (manifest = true):
    local paths, file://, s3://, gs://."""
    include: list[str] = []
    """Glob patterns on the object name"""
    exclude: list[str] = []
    max_size_mb: float = 0
    """0 = no limit; larger files become error rows"""
    manifest: bool = False
    """`uri` is a manifest file (txt/csv/jsonl/parquet) listing inputs"""
    manifest_allow: list[str] = []
    """What manifest entries may point at besides the manifest's own bucket (or folder) and public http(s)
    hosts: URI prefixes ("s3://other-bucket/", "/data/scans/", "http://10.0.0.5:8080/"), or "*" for
    anything (connectors/manifest_policy.py). Other entries are error rows, never read."""


class OutputSpec(Section):
    uri: str = ""
    """The folder or prefix of the Parquet results; {run_id} in it becomes the run's id."""
    rows_per_file: int = 2000
    """A Parquet file is published when it holds this many rows..."""
    seconds_per_file: float = 120.0
    """...or when this much time has passed, so a kill loses little"""
    overwrite: bool = False
    """Delete this output's earlier results and start again."""
    retry_failed: bool = False
    """Redo only the units whose rows are errors."""
    wait: bool = False
    """Another run holds the output's lease: wait for it instead of exiting (connectors/lease.py)."""
    lease_timeout_s: float = 120.0
    """A lease whose heartbeat is older than this many seconds is taken over (at least 5)."""

    @field_validator("lease_timeout_s")
    @classmethod
    def _lease_timeout(cls, value):
        if not value >= MIN_LEASE_TIMEOUT_S:
            raise ValueError(f"output.lease_timeout_s must be >= {MIN_LEASE_TIMEOUT_S} (seconds without a heartbeat "
                             "before another run may take the output over)")
        return value


class StorageSpec(Section):
    """What a worker needs to open a URI. Travels to every Ray worker with the job; holds no secrets."""

    endpoint_url: str = ""
    """S3-compatible stores (MinIO, R2, Ceph): s3:// URIs only"""
    region: str = ""
    profile: str = ""
    anon: bool = False
    gcs_endpoint_url: str = ""
    """A GCS emulator or gateway (JSON API): gs:// URIs only"""
    # http(s) reads: None fetches any URL it is given (a caller's own); a job's reads carry its manifest
    # policy, the prefixes that may be private hosts (connectors/manifest_policy.py). Set from [input]
    # manifest_allow by `with_manifest_policy`, not in a job file.
    http_allow: SkipJsonSchema[tuple[str, ...] | None] = None

    def with_manifest_policy(self, input_spec: InputSpec) -> StorageSpec:
        """These options for a job's reads: http(s) under the manifest policy, `[input] manifest_allow`
        and the origin of an http(s) manifest (its entries may sit beside it)."""
        allow = list(input_spec.manifest_allow)
        if re.match(r"(?i)https?://", input_spec.uri):
            allow.append("/".join(redact_uri(input_spec.uri).split("/", 3)[:3]) + "/")
        return self.updated(http_allow=tuple(allow))


class ModelSpec(Section):
    id: str = ""
    """A hub id (HuggingFaceM4/idefics2-8b, HuggingFaceM4/idefics2-8b-base) or a local checkpoint folder."""
    dtype: Dtype = "auto"
    """Auto: bf16 on GPU, fp32 on CPU"""
    attn_implementation: Attention = "sdpa"
    quantization: Quantization = "none"
    device: Device = "auto"
    """auto: decided once by the driver from the Ray cluster's GPUs (cuda, one GPU per replica, when it has
    any; else cpu). A replica only uses a GPU Ray assigned it"""
    prompt_format: PromptFormat = "auto"
    """Auto: instruct if the checkpoint has a chat template, else base"""
    do_image_splitting: bool | None = None
    """None: the checkpoint's processor config decides"""
    longest_edge: int | None = None
    shortest_edge: int | None = None
    kv_cache: KvCache = "static"
    """The static engine's KV cache. static: allocated once per batch and written in place (faster per
    decode step on a GPU); dynamic: transformers' default, grown at every step (pipeline/model/budget.py)."""
    engine: Engine = "static"
    """static: batches through `generate`, each decoded until its longest page ends. continuous:
    transformers' continuous batching (pipeline/model/continuous.py): a finished page's slot goes to the
    next one at once. Static is the faster one on a GPU (BENCHMARKS.md, GPU)."""

    @model_validator(mode="before")
    @classmethod
    def _no_compile(cls, data):
        if isinstance(data, dict) and "compile" in data:
            raise ValueError("model.compile is no longer a setting: measured on an H200, the compiled decode step "
                             "recompiled at every call (a second per step, against 25 ms without); the static "
                             "engine now preallocates its KV cache by default (model.kv_cache, BENCHMARKS.md)")
        return data

    @field_validator("longest_edge", "shortest_edge")
    @classmethod
    def _positive_edge(cls, value, info):
        if value is not None and value < 1:
            raise ValueError(f"model.{info.field_name} must be a positive number of pixels, got {value!r}")
        return value

    @model_validator(mode="after")
    def _edges_agree(self):
        if self.longest_edge and self.shortest_edge and self.shortest_edge > self.longest_edge:
            raise ValueError(f"model.shortest_edge ({self.shortest_edge}) is larger than model.longest_edge "
                             f"({self.longest_edge})")
        return self


class RenderSpec(Section):
    page_edge: int = 0
    """PDF pages are rendered so their longest edge is this many pixels. 0 (automatic): at what the model
    can use, twice the processor's longest_edge ([model] longest_edge) with image splitting, that edge
    without (pipeline/render/size.py). Images are never resized here."""
    dpi: float = 0
    """Instead of page_edge: PDF pages are rendered at this many pixels per inch of their page box."""
    scans_at_own_resolution: bool = True
    """With the automatic size, a scanned page (raster images cover it, no visible text) is rendered at no
    more than its scan's own resolution: never upscaled. A page_edge or dpi of your own applies to
    scans too."""
    max_pixels: int = 40_000_000
    """Decoded images larger than this are refused (decompression bombs)"""
    max_pages: int = 5000
    """A source with more pages than this is refused (one error row): PDF pages, TIFF frames, the images of
    a tar shard or the rows of a Parquet one."""
    max_image_mb: float = 100.0
    """One image of a shard (a tar member, a Parquet cell) larger than this is refused (an error row for it),
    from the tar header, the cell's length or the row group's dictionary, before its bytes are read."""
    max_memory_mb: int = 4096
    """What a renderer process may allocate beyond its libraries (RLIMIT_AS, render/sandbox.py); a file that
    needs more is an error row. 0 = no limit."""
    timeout_s: float = 60.0
    """Per page; past 1.5x + 2 s the rendering process is killed (render/sandbox.py)"""
    sandbox: bool = True
    """Render in a child process that is killed when a page overruns its time limit or crashes it
    (render/sandbox.py); false renders in the worker itself, where only the soft time limit applies."""
    # Derived by the driver, never read from a job file (so not in the JSON Schema): `with_halvable_pages`.
    _halvable: bool = PrivateAttr(default=False)

    @model_validator(mode="before")
    @classmethod
    def _page_edge_not_longest_edge(cls, data):
        if isinstance(data, dict) and "longest_edge" in data:
            raise ValueError(f"[render] longest_edge is named page_edge: write [render] page_edge = "
                             f"{data['longest_edge']!r} (the longest edge of a rendered PDF page, in pixels; "
                             "[model] longest_edge is the processor's image size)")
        return data

    @model_validator(mode="after")
    def _caps_positive(self):
        if self.max_pages < 1 or self.max_image_mb <= 0 or self.max_memory_mb < 0:
            raise ValueError("render.max_pages and render.max_image_mb must be > 0, render.max_memory_mb >= 0 "
                             "(0: no limit)")
        return self

    @field_validator("page_edge", "dpi")
    @classmethod
    def _not_negative(cls, value, info):
        if value < 0:
            raise ValueError(f"render.{info.field_name} must be >= 0 (0: automatic)")
        return value

    @model_validator(mode="after")
    def _one_size(self):
        if self.page_edge and self.dpi:
            raise ValueError(f"render.page_edge = {self.page_edge} and render.dpi = {self.dpi:g} both size "
                             "PDF pages: set one of them")
        return self

    @property
    def automatic_size(self) -> bool:
        return not (self.page_edge or self.dpi)

    @property
    def halvable(self) -> bool:
        """A PDF page rendered at the full page_edge gets even edges that halve to exactly the model's size
        (pipeline/render/size.py), so its four quadrants are alike and its whole-page crop is a 2:1
        reduction, the fast resize (pipeline/crops.py). Only the driver turns it on, for the automatic
        size with image splitting (`with_halvable_pages`), last: a copy made by `updated` has it off."""
        return self._halvable

    def with_halvable_pages(self) -> RenderSpec:
        """A copy whose `halvable` is on."""
        copy = self.model_copy()
        copy._halvable = True
        return copy


class TaskSpec(Section):
    # `schema` is the TOML key; the attribute is `json_schema` (pydantic's BaseModel has a `schema` method).
    model_config = ConfigDict(**Section.model_config, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    kind: TaskKind = "ocr"
    name: str = ""
    """Defaults to kind; the `task` column"""
    prompt: str = ""
    """Custom prompt text (kind="custom"), or an override of the built-in one"""
    questions: list[str] = []
    """Kind="qa"; none: each document's manifest questions"""
    detail: CaptionDetail = "short"
    """Kind = "caption": short (one sentence) or detailed."""
    scope: TaskScope = "page"
    """page: one row per page; document: one row per document (page = -1), whose prompt shows the
    document's first `document_pages` pages, in order, as interleaved images."""
    document_pages: int = 4
    """Scope = "document": how many leading pages the prompt shows."""
    examples: list[dict[str, str]] = []
    """Few-shot examples shown before the page: [{image = URI, text = "the answer", prompt = "the question"}]
    (`prompt` defaults to the task's own instruction; base checkpoints see `<image>` + text only)."""
    max_new_tokens: int = 512
    """At most this many generated tokens per row (the `truncated` column says when it was reached)."""
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: list[str] = []
    """Generation stops at the first of these; the answer ends before it."""
    json_schema: str | dict[str, Any] = Field(default="", alias="schema")
    """Kind = "extract": the JSON Schema every answer follows, as a path or URI of a .json file (local,
    s3://, gs://) or an inline table; the answer's value lands in the typed column `extract_<name>`."""
    temperature_ramp: list[float] = []
    """A degenerate generation (one phrase repeated until max_new_tokens; flagged in the `degenerate` column)
    is generated again by sampling at each of these temperatures in turn, e.g. [0.4, 0.8], until one is not
    degenerate. Empty: flag only."""

    @property
    def task_name(self) -> str:
        return self.name or self.kind

    @model_validator(mode="after")
    def _shape(self):
        name = self.task_name
        if self.kind == "custom" and not self.prompt:
            raise ValueError("task 'custom' needs prompt = \"...\" in its [[tasks]] table")
        if self.kind == "extract":
            if not self.json_schema:
                raise ValueError(f"task {name!r}: kind = \"extract\" needs schema = \"PATH.json\" (or an inline "
                                 "table) in its [[tasks]] table")
            if not self.name:
                raise ValueError("an extract task needs a name (its column is extract_<name>): name = \"invoice\"")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
                raise ValueError(f"extract task {self.name!r}: its name becomes the column extract_{self.name}: "
                                 "use letters, digits and _ only")
            if self.stop_strings:
                raise ValueError(f"task {name!r}: stop_strings cannot cut an extract answer (the schema's "
                                 "grammar decides where the JSON ends)")
        elif self.json_schema:
            raise ValueError(f"task {name!r}: schema is for kind = \"extract\" only")
        if self.document_pages < 1:
            raise ValueError(f"task {name!r}: document_pages must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"task {name!r}: max_new_tokens must be >= 1")
        if any(t <= 0 for t in self.temperature_ramp):
            raise ValueError(f"task {name!r}: temperature_ramp must be temperatures > 0, e.g. [0.4, 0.8]")
        for example in self.examples:
            if not example.get("image") or "text" not in example:
                raise ValueError(f"task {name!r}: each example needs image = URI and text = \"...\"")
            unknown = set(example) - set(EXAMPLE_KEYS)
            if unknown:
                raise ValueError(f"task {name!r}: unknown example key(s) {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(EXAMPLE_KEYS)}")
        return self


class RoutingSpec(Section):
    """Cheaper routes than the model, tried before a page reaches the GPU (see pipeline/routes/)."""

    text_layer: bool = False
    """OCR tasks on PDF pages with a good embedded text layer use it as is"""
    text_layer_min_chars: int = 40
    """Fewer non-space characters than this: not a usable text layer"""
    ocr_engine: OcrEngine = "model"
    """tesseract: OCR tasks run Tesseract (CPU) instead of the model ("idefics2" is a synonym of "model")."""
    tesseract_language: str = "eng"
    """Tesseract language(s), e.g. eng+deu."""
    dedup: bool = False
    """Pixel-identical pages are processed once per run and their result reused"""
    dedup_cache_mb: int = 256
    """Results kept for later duplicates (least recently used go first)"""
    dedup_across_runs: bool = True
    """With dedup: also reuse results earlier runs published to this output"""


class LoggingSpec(Section):
    """How the driver logs (jobs/logs.py)."""

    format: Literal["text", "json"] = "text"
    """text: lines for people; json: one JSON object per line (level, time, run id, event, fields), the
    stages' warnings and errors on Ray workers included, for log collectors"""


class ResourceSpec(Section):
    """Where and how big a run is. Two settings may also come from the driver's environment, read once
    by `scriptorium run` (`with_environment`): SCRIPTORIUM_RAY_ADDRESS for `address`, and
    SCRIPTORIUM_RAY_PROGRESS=1 for `ray_progress`."""

    address: str = ""
    """Ray address: "" starts a local Ray, "auto" joins the cluster this runs in. Left empty (here and by
    --address): SCRIPTORIUM_RAY_ADDRESS, if set"""
    num_replicas: int = 1
    """Model replicas (actors); one per GPU on a GPU cluster"""
    gpus_per_replica: float | None = None
    """GPUs Ray reserves per replica (num_gpus). None: 1 when the replicas run on cuda, else 0"""
    cpus_per_replica: float = 1.0
    cpus_per_preprocess_task: float = 1.0
    batch_size: int = 0
    """Pages per model batch, an upper bound: 0 (auto) is GPU_BATCH_SIZE on a GPU replica, where the token
    budget below usually decides, and CPU_BATCH_SIZE on CPU."""
    max_batch_pixels: int = 0
    """0 = no pixel budget; else sub-batches are cut at this many crop pixels"""
    max_batch_tokens: int = 0
    """Tokens per model batch, prompt + max_new_tokens per sequence (what its KV cache holds): 0 (auto) fits
    the KV cache in half the GPU memory left after loading the model (pipeline/model/budget.py); no budget
    on CPU."""
    ray_num_cpus: int = 0
    """Logical CPUs for a local Ray (0: max(4, cores)); docs/job-spec.md#resources says why at least 4"""
    gpu_price_per_hour: float = 0.0
    """For the run summary's cost figures"""
    metrics: bool = True
    """Record the application metrics (pages, rows, tokens, batches: docs/operations.md#metrics) through
    Ray's metrics system; false records none"""
    ray_progress: bool = False
    """Keep Ray Data's own progress bars and per-operator log blocks, which the run's progress line
    otherwise replaces: for looking into a stalled operator. SCRIPTORIUM_RAY_PROGRESS=1 sets it too"""

    @field_validator("num_replicas")
    @classmethod
    def _at_least_one(cls, value):
        if value < 1:
            raise ValueError("resources.num_replicas must be >= 1")
        return value

    @field_validator("batch_size", "max_batch_pixels", "max_batch_tokens")
    @classmethod
    def _not_negative(cls, value, info):
        if value < 0:
            raise ValueError(f"resources.{info.field_name} must be >= 0 (0: automatic)")
        return value

    def pages_per_batch(self, on_gpu: bool) -> int:
        """`batch_size`, or its automatic value for a replica with (or without) a GPU."""
        if self.batch_size:
            return self.batch_size
        return GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE

    def with_environment(self, environ: Mapping[str, str]) -> ResourceSpec:
        """These settings with the driver's environment filled in: SCRIPTORIUM_RAY_ADDRESS where no
        address is set, SCRIPTORIUM_RAY_PROGRESS=1 turns `ray_progress` on."""
        return self.updated(address=self.address or environ.get("SCRIPTORIUM_RAY_ADDRESS", ""),
                            ray_progress=self.ray_progress or environ.get("SCRIPTORIUM_RAY_PROGRESS") == "1")


class JobSpec(Section):
    run_id: str = ""
    input: InputSpec = InputSpec()
    output: OutputSpec = OutputSpec()
    storage: StorageSpec = StorageSpec()
    model: ModelSpec = ModelSpec()
    render: RenderSpec = RenderSpec()
    tasks: list[TaskSpec] = []
    routing: RoutingSpec = RoutingSpec()
    resources: ResourceSpec = ResourceSpec()
    logging: LoggingSpec = LoggingSpec()

    @field_validator("tasks")
    @classmethod
    def _distinct_names(cls, tasks):
        names = [t.task_name for t in tasks]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two tasks are named {name!r}: give one a distinct name = \"...\"")
        return tasks

    def check_runnable(self) -> "JobSpec":
        """Check what a run cannot do without, beyond types and choices; raise SpecError naming the fix."""
        if not self.input.uri:
            raise SpecError("no input: pass --input URI (a folder, glob, file or s3:// prefix) or set [input] uri")
        if not self.output.uri:
            raise SpecError("no output: pass --output URI or set [output] uri")
        self.check_processable()
        if self.output.overwrite and self.output.retry_failed:
            raise SpecError("--overwrite and --retry-failed contradict each other: pick one")
        return self

    def check_processable(self) -> "JobSpec":
        """What the stages need, wherever the documents come from: a task, a model when a task needs one,
        model options this machine can run, a question for QA (unless a manifest brings them)."""
        if not self.model.id and self.needs_model:
            raise SpecError("no model: pass --model (a hub id or a local checkpoint path) or set [model] id")
        _check_model_options(self.model)
        _check_gpus(self.model, self.resources)
        if not self.tasks:
            raise SpecError("no task: pass --task ocr|caption|qa|custom or add a [[tasks]] table (kind = \"extract\" too)")
        for task in self.tasks:
            if task.kind == "qa" and not task.questions and not self.input.manifest:
                raise SpecError("task 'qa' needs a question: pass --question TEXT or set questions = [...]")
        return self

    @property
    def needs_model(self) -> bool:
        """False when every task is page OCR done by Tesseract: such a job runs without a model or GPU."""
        return not all(t.kind == "ocr" and t.scope == "page" and self.routing.ocr_engine == "tesseract"
                       for t in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


# -- run ids -------------------------------------------------------------------------------------------
def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:4]


def check_run_id(run_id: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
        raise SpecError(f"run_id {run_id!r} may only contain letters, digits, '-' and '_' (at most 64)")
    return run_id


def output_uri_for_run(uri: str, run_id: str) -> str:
    """`{run_id}` in the output URI becomes the run's id, so runs can be partitioned by run:
    `s3://bucket/digitize/run_id={run_id}` -> `s3://bucket/digitize/run_id=2026-11`. Resuming a run
    means passing the same run id again; a new id starts a new partition."""
    return uri.replace("{run_id}", run_id)


def _check_model_options(model: ModelSpec) -> None:
    """Settings that need a GPU or an optional package: refuse them here, in one line, rather than let
    every model replica fail to load. The driver is expected to have the workers' packages installed."""
    if model.attn_implementation == "flash_attention_2":
        if model.device == "cpu" or model.dtype == "fp32":
            raise SpecError("attn_implementation = \"flash_attention_2\" runs on CUDA GPUs in fp16/bf16 only: "
                            "set device = \"cuda\" and dtype = \"bf16\", or use attn_implementation = \"sdpa\"")
        _require_package("flash_attn", "attn_implementation = \"flash_attention_2\"",
                         "pip install flash-attn --no-build-isolation", "attn_implementation = \"sdpa\"")
    if model.engine == "continuous" and model.attn_implementation == "eager":
        # Its paged form (paged|eager) would be set on the shared text model, where the static engine's
        # fallback calls (a repetition penalty, a retry) need plain attention.
        raise SpecError("engine = \"continuous\" needs attn_implementation = \"sdpa\" or \"flash_attention_2\", "
                        "not \"eager\"")
    if model.quantization in ("bnb-4bit", "awq") and model.device == "cpu":
        raise SpecError(f"quantization = \"{model.quantization}\" needs a CUDA GPU: set device = \"cuda\" or quantization = \"none\"")
    if model.quantization == "bnb-4bit":
        _require_package("bitsandbytes", "quantization = \"bnb-4bit\"", "pip install bitsandbytes", "quantization = \"none\"")
    if model.quantization == "awq":
        # transformers 5 loads AWQ checkpoints through GPT-QModel (and accelerate).
        _require_package("gptqmodel", "quantization = \"awq\"", "pip install gptqmodel accelerate", "a non-AWQ checkpoint")


def _check_gpus(model: ModelSpec, resources: ResourceSpec) -> None:
    """A cuda replica runs on the GPU Ray assigns it: with none reserved, every replica would fail to load."""
    if model.device == "cuda" and resources.gpus_per_replica == 0:
        raise SpecError("device = \"cuda\" with gpus_per_replica = 0: Ray would give the replicas no GPU. Set "
                        "gpus_per_replica > 0 (1: a GPU per replica), or device = \"cpu\"")


def _require_package(module: str, setting: str, install: str, alternative: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SpecError(f"{setting} needs the {module} package, which is not installed: {install} "
                        f"(on the driver and every GPU worker), or use {alternative}")


# -- building specs, with pydantic's errors as one line -----------------------------------------------
_TYPE_WORDS = {"int": "a whole number", "float": "a number", "bool": "true or false", "string": "a string in quotes",
               "list": "a list", "dict": "a table", "model": "a table"}


class SectionError(SpecError):
    """A section that cannot be built; keeps pydantic's errors, so a section that holds it can name the
    setting by its whole path (`model.dtype`), not only by its own part (`dtype`)."""

    def __init__(self, model: type[Section], errors: list[dict]):
        self.model, self.errors = model, errors
        super().__init__(_one_line(model, errors))


def build(model: type[Section], data: Any):
    """`model` from `data`, or SpecError with the first problem in one line."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SectionError(model, exc.errors()) from None


def _flattened(errors: list[dict]) -> list[dict]:
    """Errors of sections built inside a section (pydantic calls their constructors), at their full path."""
    flat = []
    for error in errors:
        inner = error.get("ctx", {}).get("error")
        if error["type"] == "value_error" and isinstance(inner, SectionError):
            flat += [{**e, "loc": (*error["loc"], *e["loc"])} for e in _flattened(inner.errors)]
        else:
            flat.append(error)
    return flat


def _one_line(model: type[Section], errors: list[dict]) -> str:
    errors = _flattened(errors)
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    if unknown:  # all typos of one table together, each with its closest known key
        where = unknown[0]["loc"][:-1]
        owner = _section_at(model, where)
        known = sorted(owner.model_fields)
        names = [str(e["loc"][-1]) for e in unknown if e["loc"][:-1] == where]
        named = [n + "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(n, known, 1)) for n in names]
        return f"unknown setting(s) in [{_table_name(where)}]: {', '.join(named)}; known: {', '.join(known)}"
    error = errors[0]
    loc, kind = error["loc"], error["type"]
    if kind == "value_error":
        return str(error["ctx"]["error"])
    value = error.get("input")
    if kind == "literal_error":
        owner = _section_at(model, loc[:-1])
        allowed = choices(owner.model_fields[loc[-1]].annotation)
        return f"{_dotted(loc)} = {value!r} is not one of {', '.join(allowed)}"
    wanted = next((words for prefix, words in _TYPE_WORDS.items() if kind.startswith(prefix)), None)
    if wanted:
        return f"[{_table_name(loc[:-1])}] {loc[-1]} = {value!r} should be {wanted}"
    return f"{_dotted(loc)}: {error['msg']}"


def _section_at(model: type[Section], loc: tuple) -> type[Section]:
    """The section class at `loc` (("tasks", 0) is TaskSpec)."""
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation
        model = get_args(annotation)[0] if get_args(annotation) else annotation
    return model


def _table_name(loc: tuple) -> str:
    names = [str(p) for p in loc if not isinstance(p, int)]
    return ".".join(names) or "job"


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if not isinstance(p, int))


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"a job spec must be a table, got {type(data).__name__}")
    return build(JobSpec, data)


def load_spec(path: str | Path) -> JobSpec:
    """Read a TOML job spec. Errors name the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"job spec {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"job spec {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise SpecError(f"job spec {path} is not UTF-8 text") from None
    return spec_from_dict(data)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a job file (`scriptorium schema`)."""
    schema = JobSpec.model_json_schema()
    schema["title"] = "Scriptorium job spec"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema

