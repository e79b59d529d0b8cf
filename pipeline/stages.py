"""A job's stages, declared once: what each one runs, on which rows, with which resources.

    planned inputs -> RenderPages -> RoutePages (when a route is on) -> PreprocessPages -> GenerateAnswers
                                                                  or AnswerWithoutModel (no model needed)
                   -> ParseExtractions (when a task is kind = "extract": answers into typed columns)

`job_stages(spec, derived)` builds the list from the spec's sections and from what the driver derives
from them once (`derive`: the checkpoint's image settings, the render size, the prompt book, resources).
A caller that wants some of the stages takes them by name (`stage_named`, `stages_until`), never by place.
Two walkers use the same list: the Ray Data processor (processor.py), which maps each stage over a
dataset with its resources, and the in-process runner (local.py), which the tests use, so a test runs
exactly the chain a job runs. Each stage's step declares the schemas it takes and gives (steps.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa

from scriptorium.core.errors import SpecError
from scriptorium.core.image_settings import ImageSettings
from scriptorium.core.spec import JobSpec, ModelSpec, RenderSpec, ResourceSpec
from scriptorium.core.units import document_window
from scriptorium.pipeline.examples import load_examples
from scriptorium.pipeline.extraction import ExtractionTypes, ParseExtractions, load_schemas
from scriptorium.pipeline.metrics import Meter
from scriptorium.pipeline.model.loading import gpus_in_cluster, open_model_config
from scriptorium.pipeline.model.continuous_stage import GenerateAnswersContinuously
from scriptorium.pipeline.model.stage import GenerateAnswers
from scriptorium.pipeline.preprocess import PreprocessPages
from scriptorium.pipeline.prompts import PromptBook, resolve_prompt_format
from scriptorium.pipeline.render.size import resolved_render
from scriptorium.pipeline.render.stage import RenderPages
from scriptorium.pipeline.routes.stage import AnswerWithoutModel, RoutePages
from scriptorium.pipeline.routes.tesseract import tessdata_path

log = logging.getLogger("scriptorium")

# A plan file holds up to 200 documents and Ray Data runs one task per block, so without a cut a job of
# fewer than 200 documents would render on a single core. Blocks of a few documents let every CPU in the
# cluster render.
DOCUMENTS_PER_RENDER_TASK = 4
PAGES_PER_CPU_CALL = 4  # page rows per call of the CPU stages after rendering


@dataclass(frozen=True)
class Stage:
    name: str
    step: type  # the step class (steps.py): a callable over Arrow tables
    kwargs: dict = field(default_factory=dict)  # its constructor's arguments: the sections it needs
    rows_per_call: int = PAGES_PER_CPU_CALL  # rows per call (Ray Data's batch_size)
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    replicas: int = 0  # > 0: a pool of this many long-lived actors (the model); 0: stateless tasks
    concurrent_calls: int = 1  # blocks one actor works on at once (an async step feeds them to one engine)
    rows_per_block: int = 0  # > 0: cut the stream into blocks of this many rows before the stage
    schema: pa.Schema | None = None  # the step's output schema where the job decides it (extract columns)

    @property
    def input_schema(self):
        return self.step.input_schema

    @property
    def output_schema(self):
        return self.schema if self.schema is not None else self.step.output_schema

    @property
    def resources(self) -> dict:
        """What Ray reserves for each task, or each replica, of this stage: one place, so what a test starts
        an actor with is what the processor asks Ray Data for."""
        return dict(num_cpus=self.num_cpus, num_gpus=self.num_gpus)


@dataclass(frozen=True)
class Derived:
    """What the driver works out once from the spec and the checkpoint, for every stage."""

    processor: object  # the checkpoint's processor (None when no task needs the model)
    image_settings: ImageSettings
    render: RenderSpec  # the spec's, with the render size resolved
    prompts: PromptBook
    model: ModelSpec  # the spec's, with device "auto" decided for every replica: "cuda" or "cpu"
    gpus_per_replica: float  # what Ray reserves for each replica (num_gpus)
    pages_per_batch: int  # pages per model batch on this job's replicas


def derive(spec: JobSpec, cluster_gpus: Callable[[], float] = gpus_in_cluster) -> Derived:
    """Load the checkpoint's processor (when a task needs the model), the few-shot examples and check the
    routes' tools: everything a job needs before its first page, with a SpecError for what is missing.
    Then place the replicas; `cluster_gpus` (how many GPUs they can be placed on) is asked only for
    device = "auto" with gpus_per_replica unset, so a runner joins Ray for it then, not before."""
    processor, image_settings = open_model_config(spec.model) if spec.needs_model else (None, ImageSettings())
    if spec.routing.ocr_engine == "tesseract":
        try:
            tessdata_path()
        except RuntimeError as exc:
            raise SpecError(f"routing.ocr_engine = \"tesseract\": {exc}") from None
    prompts = PromptBook(spec.tasks, resolve_prompt_format(processor, spec.model.prompt_format),
                         load_examples(spec.tasks, image_settings, spec.storage), load_schemas(spec.tasks, spec.storage))
    device, gpus = "cpu", 0.0  # a job without the model has no replicas to place
    if spec.needs_model:
        device, gpus = replica_placement(spec.model, spec.resources, cluster_gpus)
    return Derived(
        processor=processor,
        image_settings=image_settings,
        render=resolved_render(spec.render, image_settings),
        prompts=prompts,
        model=spec.model.updated(device=device),
        gpus_per_replica=gpus,
        pages_per_batch=spec.resources.pages_per_batch(on_gpu=device == "cuda"),
    )


def replica_placement(model: ModelSpec, resources: ResourceSpec,
                      cluster_gpus: Callable[[], float]) -> tuple[str, float]:
    """The device every model replica loads onto ("cuda" or "cpu") and the GPUs Ray reserves for each,
    decided once: a replica that decided "auto" for itself would see GPUs Ray never gave it (Ray leaves a
    node's GPUs visible to an actor that asked for none) and load onto GPU 0 of whatever node it landed on."""
    gpus = resources.gpus_per_replica
    device = model.device if model.device != "auto" else automatic_device(gpus, cluster_gpus)
    if gpus is None:
        gpus = 1.0 if device == "cuda" else 0.0
    return device, gpus


def automatic_device(gpus_per_replica: float | None, cluster_gpus: Callable[[], float]) -> str:
    """What device = "auto" means for this job: cuda when each replica gets a GPU, the job's own
    gpus_per_replica or, unset, one per replica whenever the cluster has GPUs; else cpu, said here once."""
    if gpus_per_replica is not None:
        return "cuda" if gpus_per_replica > 0 else "cpu"
    if cluster_gpus() > 0:
        return "cuda"
    log.warning("device = \"auto\" found no GPU in the cluster: the model replicas run on CPU")
    return "cpu"


def needs_routes(spec: JobSpec) -> bool:
    routing = spec.routing
    return routing.text_layer or routing.ocr_engine == "tesseract" or routing.dedup


def job_stages(spec: JobSpec, derived: Derived, dedup_registry=None) -> list[Stage]:
    """The stages of `spec`, in order. `dedup_registry`: the run's registry actor (routing.dedup)."""
    if spec.routing.dedup and dedup_registry is None:
        raise SpecError("routing.dedup needs the run's dedup registry and the driver's join: run the job with "
                        "`scriptorium run`, or start one with pipeline.routes.dedup.start_registry")
    cpus = spec.resources.cpus_per_preprocess_task
    meter = Meter(spec.run_id, spec.resources.metrics)  # the model stage makes its own from the same two
    stages = [Stage(
        "render", RenderPages,
        dict(render=derived.render, storage=spec.storage, document_window=document_window(spec.tasks),
             page_rows=any(t.scope == "page" for t in spec.tasks), meter=meter),
        rows_per_call=1,  # one document per call; its pages stream out a few at a time
        num_cpus=cpus, rows_per_block=DOCUMENTS_PER_RENDER_TASK,
    )]
    if needs_routes(spec):
        stages.append(Stage("route", RoutePages, dict(tasks=spec.tasks, routing=spec.routing, registry=dedup_registry,
                                                      meter=meter),
                            num_cpus=cpus))
    if not spec.needs_model:
        return stages + [Stage("answer", AnswerWithoutModel, dict(tasks=spec.tasks, run_id=spec.run_id), num_cpus=cpus)]
    batch = derived.pages_per_batch
    continuous = spec.model.engine == "continuous"
    stages += [
        Stage("preprocess", PreprocessPages, dict(settings=derived.image_settings, meter=meter), num_cpus=cpus),
        Stage(
            "generate", GenerateAnswersContinuously if continuous else GenerateAnswers,
            dict(model=derived.model, image_settings=derived.image_settings, prompts=derived.prompts,
                 resources=spec.resources, run_id=spec.run_id, batch_size=batch),
            rows_per_call=batch, num_cpus=spec.resources.cpus_per_replica, num_gpus=derived.gpus_per_replica,
            replicas=spec.resources.num_replicas,
            # Two blocks at once per replica. The continuous engine's step is async: both run on its event
            # loop and feed one engine, so the next block's pages fill the slots the last one's finished
            # pages free. The static step runs each in a thread: one block's crops are decompressed and
            # encoded while the other's batches decode (GenerateAnswers.answer).
            concurrent_calls=2,
            # Ray Data hands an actor whole blocks, and a CPU task emits its pages as one block until that
            # block reaches target_max_block_size (128 MiB): a small job, or a run of small pages, would all
            # go to one replica while the others idle. Blocks of one model batch spread the pages over
            # every replica on every node.
            rows_per_block=batch,
        ),
    ]
    if derived.prompts.schemas:
        stages.append(Stage("extract", ParseExtractions, dict(tasks=spec.tasks, schemas=derived.prompts.schemas),
                            rows_per_call=batch, num_cpus=cpus, schema=results_schema(spec, derived)))
    return stages


def results_schema(spec: JobSpec, derived: Derived) -> pa.Schema:
    """The schema of the rows a job writes: the result columns, and an extract task's typed column each."""
    return ExtractionTypes.of(spec.tasks, derived.prompts.schemas).result_schema()


def stage_named(stages: list[Stage], name: str) -> Stage:
    """The stage called `name` in a job's `stages`: render, route, preprocess, generate or answer, extract."""
    for stage in stages:
        if stage.name == name:
            return stage
    raise KeyError(f"no stage {name!r} in this job's stages: {', '.join(s.name for s in stages)}")


def stages_until(stages: list[Stage], name: str) -> list[Stage]:
    """The stages of a job up to and including the one called `name` (up to "preprocess": what runs on CPUs
    before the model)."""
    last = stage_named(stages, name)
    return stages[: next(i for i, stage in enumerate(stages) if stage is last) + 1]
