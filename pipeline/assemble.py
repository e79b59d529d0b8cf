"""Assemble the Ray Data graph. Reads like the system's shape:

    planned inputs -> pages (read + render/decode) -> routes (CPU, optional) -> preprocess (CPU)
                   -> generate (model actors) -> results

A job whose every task is Tesseract OCR has no model stage: routes answer everything on CPU.

Resources are declared where each stage is built, from the job spec: CPU tasks for rendering and
preprocessing, an actor pool with one model replica per actor (and `num_gpus` per replica on GPU
clusters) for generation. The code never assumes a GPU exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from connectors.storage import StorageOptions
from jobs.spec import JobSpec
from pipeline.generate import Idefics2Generator
from pipeline.pages import RenderPages
from pipeline.preprocess import ImageSettings, PreprocessPages
from pipeline.prompts import PromptBook, document_window
from pipeline.render_size import render_settings
from pipeline.routes import RoutedResults, RoutePages


DOCUMENTS_PER_RENDER_TASK = 4


@dataclass
class StageResources:
    replicas: int
    gpus_per_replica: float
    cpus_per_replica: float
    cpus_per_task: float


def stage_resources(spec: JobSpec) -> StageResources:
    r = spec.resources
    gpus = r.gpus_per_replica
    if gpus is None:
        gpus = 1.0 if spec.model.device == "cuda" else 0.0
    return StageResources(r.num_replicas, gpus, r.cpus_per_replica, r.cpus_per_preprocess_task)


def build_dataset(
    plan: ray.data.Dataset,
    spec: JobSpec,
    image_settings: ImageSettings,
    prompts: PromptBook,
    storage: StorageOptions,
    dedup_registry=None,
) -> ray.data.Dataset:
    res = stage_resources(spec)
    render = render_settings(spec.render, image_settings)  # what the model can use (render_size.py)
    # A plan file holds up to 200 documents and Ray Data runs one task per block, so without this a job
    # of fewer than 200 documents would render on a single core. Blocks of a few documents let every
    # CPU in the cluster render; the repartition streams.
    plan = plan.repartition(target_num_rows_per_block=DOCUMENTS_PER_RENDER_TASK)
    pages = plan.map_batches(
        RenderPages(render, storage, document_window=document_window(spec.tasks),
                    page_rows=any(t.scope == "page" for t in spec.tasks)),
        batch_size=1,  # one document per call; its pages stream out a few at a time
        batch_format="pyarrow",
        num_cpus=res.cpus_per_task,
    )
    routing = spec.routing
    if routing.text_layer or routing.ocr_engine == "tesseract" or routing.dedup:
        pages = pages.map_batches(
            RoutePages(spec.tasks, routing, dedup_registry),
            batch_size=4,
            batch_format="pyarrow",
            num_cpus=res.cpus_per_task,
        )
    if not spec.needs_model:
        return pages.map_batches(RoutedResults(spec.tasks, spec.run_id), batch_size=4, batch_format="pyarrow",
                                 num_cpus=res.cpus_per_task)
    preprocessed = pages.map_batches(
        PreprocessPages(image_settings),
        batch_size=4,
        batch_format="pyarrow",
        num_cpus=res.cpus_per_task,
    )
    # Ray Data hands an actor whole blocks, and a CPU task emits its pages as one block until that block
    # reaches target_max_block_size (128 MiB): a small job, or a run of small pages, would all go to one
    # replica while the others idle. Blocks of one model batch spread the pages over every replica on
    # every node; the repartition streams (no shuffle, nothing materialized).
    pages_per_batch = spec.resources.pages_per_batch(on_gpu=res.gpus_per_replica > 0)
    preprocessed = preprocessed.repartition(target_num_rows_per_block=pages_per_batch)
    return preprocessed.map_batches(
        Idefics2Generator,
        fn_constructor_kwargs=dict(
            model_spec=spec.model,
            image_settings=image_settings,
            prompts=prompts,
            run_id=spec.run_id,
            batch_size=pages_per_batch,
            max_batch_pixels=spec.resources.max_batch_pixels,
            max_batch_tokens=spec.resources.max_batch_tokens,
        ),
        batch_size=pages_per_batch,
        batch_format="pyarrow",
        # Two blocks in flight per replica: while one batch generates, the next one's blocks are already
        # fetched to the replica's node, so the GPU does not wait for the object store between batches.
        compute=ray.data.ActorPoolStrategy(size=res.replicas, max_tasks_in_flight_per_actor=2),
        num_gpus=res.gpus_per_replica,
        num_cpus=res.cpus_per_replica,
        # Ray Data's actor pools default to max_restarts=-1 and max_task_retries=-1: a replica that dies
        # (OOM, CUDA error, killed) is restarted and its batch retried, so no page is lost with it.
    )
