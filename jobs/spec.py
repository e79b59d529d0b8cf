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
    [render]     longest_edge = 980                     timeout_s = 60
    [resources]  num_replicas = 1                       gpus_per_replica = 1  batch_size = 8
    [[tasks]]    kind = "ocr"                           max_new_tokens = 512
    [[tasks]]    kind = "qa"  questions = ["What is the title?"]
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

TASK_KINDS = ("ocr", "caption", "qa", "custom")
DTYPES = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("sdpa", "flash_attention_2", "eager")
QUANTIZATION = ("none", "bnb-4bit", "awq")
PROMPT_FORMATS = ("auto", "instruct", "base")


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
    endpoint_url: str = ""
    region: str = ""
    profile: str = ""
    anon: bool = False


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


@dataclass
class RenderSpec:
    # PDF pages are rendered so their longest edge is this many pixels (0: the processor's longest_edge),
    # which is all the model will see, instead of rendering big and shrinking.
    longest_edge: int = 0
    max_pixels: int = 40_000_000  # decoded images larger than this are refused (decompression bombs)
    max_pages: int = 5000  # pages past this in one document become one error row
    timeout_s: float = 60.0  # per-page render/decode time limit


@dataclass
class TaskSpec:
    kind: str = "ocr"
    name: str = ""  # defaults to kind; the `task` column
    prompt: str = ""  # custom prompt text (kind="custom"), or an override of the built-in one
    questions: list[str] = field(default_factory=list)  # kind="qa"
    max_new_tokens: int = 512
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: list[str] = field(default_factory=list)

    @property
    def task_name(self) -> str:
        return self.name or self.kind


@dataclass
class ResourceSpec:
    address: str = ""  # Ray address: "" starts a local Ray, "auto" or "ray://host:10001" joins a cluster
    num_replicas: int = 1  # model replicas (actors); one per GPU on a GPU cluster
    gpus_per_replica: float | None = None  # None: 1 when device is cuda, else 0
    cpus_per_replica: float = 1.0
    cpus_per_preprocess_task: float = 1.0
    batch_size: int = 8  # pages per model batch (upper bound; see max_batch_pixels)
    max_batch_pixels: int = 0  # 0 = no pixel budget; else sub-batches are cut at this many pixels
    ray_num_cpus: int = 0  # logical CPUs for a local Ray (0: max(4, cores)); see README on small machines
    gpu_price_per_hour: float = 0.0  # for the run summary's cost figures


@dataclass
class JobSpec:
    run_id: str = ""
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    render: RenderSpec = field(default_factory=RenderSpec)
    tasks: list[TaskSpec] = field(default_factory=list)
    resources: ResourceSpec = field(default_factory=ResourceSpec)

    def validate(self) -> "JobSpec":
        """Check the settings a run cannot do without; raise SpecError naming the fix."""
        if not self.input.uri:
            raise SpecError("no input: pass --input URI (a folder, glob, file or s3:// prefix) or set [input] uri")
        if not self.output.uri:
            raise SpecError("no output: pass --output URI or set [output] uri")
        if not self.model.id:
            raise SpecError("no model: pass --model (a hub id or a local checkpoint path) or set [model] id")
        _check_choice("model.dtype", self.model.dtype, DTYPES)
        _check_choice("model.device", self.model.device, DEVICES)
        _check_choice("model.attn_implementation", self.model.attn_implementation, ATTENTION)
        _check_choice("model.quantization", self.model.quantization, QUANTIZATION)
        _check_choice("model.prompt_format", self.model.prompt_format, PROMPT_FORMATS)
        if not self.tasks:
            raise SpecError("no task: pass --task ocr|caption|qa or add a [[tasks]] table")
        names = set()
        for task in self.tasks:
            _check_choice("tasks.kind", task.kind, TASK_KINDS)
            if task.kind == "qa" and not task.questions and not self.input.manifest:
                raise SpecError("task 'qa' needs a question: pass --question TEXT or set questions = [...]")
            if task.kind == "custom" and not task.prompt:
                raise SpecError("task 'custom' needs prompt = \"...\" in its [[tasks]] table")
            if task.max_new_tokens < 1:
                raise SpecError(f"task {task.task_name!r}: max_new_tokens must be >= 1")
            if task.task_name in names:
                raise SpecError(f"two tasks are named {task.task_name!r}: give one a distinct name = \"...\"")
            names.add(task.task_name)
        if self.resources.num_replicas < 1:
            raise SpecError("resources.num_replicas must be >= 1")
        if self.resources.batch_size < 1:
            raise SpecError("resources.batch_size must be >= 1")
        if self.output.overwrite and self.output.retry_failed:
            raise SpecError("--overwrite and --retry-failed contradict each other: pick one")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        raise SpecError(f"unknown setting(s) in [{where}]: {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
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
            kwargs[key] = value
    return cls(**kwargs)


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
