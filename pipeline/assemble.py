"""Assemble the Ray Data graph. Reads like the system's shape:

    planned inputs -> pages (read + render/decode) -> preprocess (CPU) -> generate (model actors) -> results

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
from pipeline.pages import RenderPages, RenderSettings
from pipeline.preprocess import ImageSettings, PreprocessPages
from pipeline.prompts import PromptPlan


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
    plans: list[PromptPlan],
    storage: StorageOptions,
) -> ray.data.Dataset:
    res = stage_resources(spec)
    render = RenderSettings(
        longest_edge=spec.render.longest_edge or image_settings.longest_edge,
        max_pixels=spec.render.max_pixels,
        max_pages=spec.render.max_pages,
        timeout_s=spec.render.timeout_s,
    )
    pages = plan.map_batches(
        RenderPages(render, storage),
        batch_size=1,  # one document per call; its pages stream out a few at a time
        batch_format="pyarrow",
        num_cpus=res.cpus_per_task,
    )
    preprocessed = pages.map_batches(
        PreprocessPages(image_settings),
        batch_size=4,
        batch_format="pyarrow",
        num_cpus=res.cpus_per_task,
    )
    return preprocessed.map_batches(
        Idefics2Generator,
        fn_constructor_kwargs=dict(
            model_spec=spec.model,
            image_settings=image_settings,
            plans=plans,
            run_id=spec.run_id,
            batch_size=spec.resources.batch_size,
            max_batch_pixels=spec.resources.max_batch_pixels,
        ),
        batch_size=spec.resources.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=res.replicas),
        num_gpus=res.gpus_per_replica,
        num_cpus=res.cpus_per_replica,
        max_restarts=-1,  # a replica that dies (OOM, CUDA error, killed) is restarted...
        max_task_retries=-1,  # ...and its batch is retried on a live replica
    )
